"""Benchmark: the layout planner's --search for Llama-3.1-70B on 1024 GPUs (target: < 10 s on CPU).

    python benchmarks/plan_search.py [--repeats 5] [--out benchmarks/results/plan_search.json]

Runs the command a user runs, in a fresh process each time, and reports the median wall time of
the whole command (interpreter start, imports, parsing, search, printing), plus the time of the
search itself measured in-process.  No model is built: the planner only counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLAGS = ["--model-preset", "llama3.1-70b", "--bf16", "--gpus", "1024", "--micro-batch-size", "1",
         "--global-batch-size", "1024", "--use-distributed-optimizer", "--overlap-grad-reduce",
         "--overlap-param-gather", "--search"]
TARGET_S = 10.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_search.json"))
    a = p.parse_args(argv)
    from benchmarks.common import env

    walls, out = [], None
    for _ in range(a.repeats):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "megatron_growloop.plan", *FLAGS, "--json"], env=env(),
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        walls.append(time.perf_counter() - t)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        out = json.loads(proc.stdout)
    from megatron_growloop.plan.cli import main as plan_main

    inner = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        _quiet(plan_main, FLAGS + ["--json"])
        inner.append(time.perf_counter() - t)
    best = out["best"]
    result = {
        "command": "python -m megatron_growloop.plan " + " ".join(FLAGS),
        "repeats": a.repeats,
        "wall_s_median": statistics.median(walls), "wall_s": walls,
        "in_process_s_median": statistics.median(inner),
        "layouts_evaluated": len(out["layouts"]), "layouts_fitting": sum(l["fits"] for l in out["layouts"]),
        "best": {k: best[k] for k in ("tp", "pp", "dp", "sequence_parallel", "recompute", "peak_gb", "step_time_s")},
        "target_s": TARGET_S, "target_met": statistics.median(walls) < TARGET_S,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"--search 70B / 1024 GPUs: {result['layouts_evaluated']} layouts ({result['layouts_fitting']} fit); "
          f"command wall time median {result['wall_s_median']:.2f} s over {a.repeats} runs "
          f"(search in-process {result['in_process_s_median']:.3f} s); target < {TARGET_S:g} s: "
          f"{'met' if result['target_met'] else 'NOT met'}; best {result['best']}")
    return result


def _quiet(fn, argv):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(argv)


if __name__ == "__main__":
    main()
