"""The planner against measurement, side by side (the table of docs/scaling.md).

    python benchmarks/plan_accuracy.py [--no-growth] [--out benchmarks/results/plan_accuracy.json]

* parameters: the planner's total against the model megatron-core builds on the meta device;
* activations: the planner's per-rank activation figure against the peak bytes of the tensors
  autograd saves in one training step (``megatron_growloop.plan.measure``), CPU, one rank;
* pipeline: per (TP rank, PP stage) of a gloo TP2 x PP2 run through megatron-core's 1F1B schedule
  (``tests/plan_activation_ranks.py``; the saved tensors, without the stage outputs the schedule keeps);
* growth: the planner's transfer buffer against the largest buffer the growth transfer held in a
  real LIDAS run on gloo (4 ranks; ``tests/plan_growth_probe.py``), worst rank per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

ACTIVATION_CASES = [
    # (label, preset, overrides, dtype, recompute)
    ("tiny", "tiny", {}, "fp32", {}),
    ("tiny", "tiny", {}, "bf16", {}),
    ("small", "small", {}, "fp32", {}),
    ("small", "small", {}, "bf16", {"recompute_granularity": "selective"}),
    ("small", "small", {}, "bf16", {"recompute_granularity": "full", "recompute_method": "uniform",
                                    "recompute_num_layers": 1}),
    ("tiny Loop(1-2x3-1)", "tiny", {"loop": "1-2x3-1"}, "fp32", {}),
    ("small Loop(2-2x2-2)", "small", {"num_layers": 6, "loop": "2-2x2-2"}, "bf16",
     {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}),
    ("small, LIDAS stage at 4 layers", "small", {"num_layers": 4}, "fp32", {"recompute_granularity": "selective"}),
]


def _recompute_name(rc: dict) -> str:
    g = rc.get("recompute_granularity")
    if g == "full":
        return f"full/{rc['recompute_method']}/{rc['recompute_num_layers']}"
    return g or "none"


def params_rows():
    from megatron_growloop.plan.params import unique_params
    from megatron_growloop.training.initialize import init_distributed
    from plan_models import build, preset_arch

    init_distributed(1, 1)
    rows = []
    for preset in ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "llama3.1-70b"):
        arch = preset_arch(preset)
        model, _ = build(arch, meta=True)
        rows.append({"preset": preset, "planned": unique_params(arch),
                     "measured": sum(p.numel() for p in model.parameters())})
    return rows


def activation_rows():
    from test_plan_activations import _measure, _planned
    from plan_models import preset_arch

    rows = []
    for label, preset, over, dtype, rc in ACTIVATION_CASES:
        arch = preset_arch(preset, vocab=257, **over)
        measured = _measure(arch, dtype, rc)["peak"]
        planned = _planned(arch, dtype, rc)
        rows.append({"model": label, "dtype": dtype, "recompute": _recompute_name(rc), "planned": planned,
                     "measured": measured, "rel_error": planned / measured - 1})
    return rows


def pipeline_rows():
    from conftest import _env, _free_port
    from test_plan_activations import PARALLEL_CASES

    from megatron_growloop.model.implementation import Implementation
    from megatron_growloop.model.parallel import ParallelLayout
    from megatron_growloop.plan import RunSetup, plan_run
    from plan_models import preset_arch

    rows = []
    for case, (preset, over, rc) in sorted(PARALLEL_CASES.items()):
        arch = preset_arch(preset, tp=2, vocab=257, **over)
        with tempfile.TemporaryDirectory() as d:
            env = _env()
            env["PYTHONPATH"] = str(ROOT / "tests") + ":" + env["PYTHONPATH"]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                   str(_free_port()), str(ROOT / "tests" / "plan_activation_ranks.py"), "2", "2", "0", "3", "2",
                   json.dumps(arch.to_meta()), json.dumps(rc), str(Path(d) / "p.json")]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            measured = json.loads((Path(d) / "p.json").read_text())
        plan = plan_run(RunSetup(arch, ParallelLayout(tp=2, pp=2), Implementation(transformer_impl="local", **rc),
                                 dp=1, micro_batch_size=2, global_batch_size=6, device="cpu"))
        for st in plan.stages:
            rows.append({"case": case, "pp_rank": st.pp_rank, "in_flight": st.in_flight,
                         "planned": st.activations - st.pipeline_buffers,
                         "measured": [measured[f"{t},{st.pp_rank}"] for t in range(2)]})
    return rows


def growth_rows():
    from conftest import _env, _free_port
    from test_plan_growth import BASE, CASES

    from megatron_growloop.plan.cli import main as plan_main

    rows = []
    for case, extra in sorted(CASES.items()):
        flags = BASE + extra
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                   str(_free_port()), str(ROOT / "tests" / "plan_growth_probe.py"), d, *flags]
            proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            measured = [json.loads((Path(d) / f"transfer_rank{r}.json").read_text()) for r in range(4)]
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            plan = plan_main(flags + ["--gpus", "4", "--plan-device", "cpu", "--transformer-impl", "local", "--json"])
        pp = int(extra[1])
        for i, step in enumerate(plan["growth_steps"]):
            worst = max(range(4), key=lambda r: measured[r][i]["bytes"])
            rows.append({"run": case, "step": f"{step['from_layers']} -> {step['to_layers']}",
                         "transfer": measured[worst][i]["transfer"], "rank": worst,
                         "planned": step["per_rank"][worst // (4 // pp)]["transfer_bytes"],
                         "measured": measured[worst][i]["bytes"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-growth", action="store_true", help="skip the 4-rank gloo runs (pipeline and growth)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_accuracy.json"))
    a = p.parse_args(argv)
    result = {"params": params_rows(), "activations": activation_rows(),
              "pipeline": [] if a.no_growth else pipeline_rows(),
              "growth": [] if a.no_growth else growth_rows()}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| preset | planner | megatron-core (meta device) |\n| --- | ---: | ---: |")
    for r in result["params"]:
        print(f"| `{r['preset']}` | {r['planned']:,} | {r['measured']:,} |")
    print("\n| model | dtype | recompute | planner MiB | measured MiB | difference |\n| --- | --- | --- | ---: | ---: | ---: |")
    for r in result["activations"]:
        print(f"| {r['model']} | {r['dtype']} | {r['recompute']} | {r['planned'] / 2**20:.3f} | "
              f"{r['measured'] / 2**20:.3f} | {100 * r['rel_error']:+.2f}% |")
    if result["pipeline"]:
        print("\n| TP2 x PP2, 3 micro-batches | stage | in flight | planner MiB | measured MiB (TP rank 0, 1) |"
              "\n| --- | ---: | ---: | ---: | ---: |")
        for r in result["pipeline"]:
            print(f"| small, {r['case']} | {r['pp_rank']} | {r['in_flight']} | {r['planned'] / 2**20:.3f} | "
                  + ", ".join(f"{m / 2**20:.3f}" for m in r["measured"]) + " |")
    if result["growth"]:
        print("\n| run | growth step | transfer | rank | planner bytes | measured bytes |\n| --- | --- | --- | ---: | ---: | ---: |")
        for r in result["growth"]:
            print(f"| {r['run']} | {r['step']} | {r['transfer']} | {r['rank']} | {r['planned']:,} | {r['measured']:,} |")
    return result


if __name__ == "__main__":
    main()
