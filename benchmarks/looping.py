"""Benchmark: a looped model against the untied model of the same width and effective depth.

    python benchmarks/looping.py [--loop 4-4x4-4] [--hidden 128 256] [--rounds 3] [--steps 10]

For each width, ``Loop(e-L×k-d)`` (e+L+d unique layers) and the untied model with
e+L·k+d layers are trained with the real stack (megatron-core DDP, the Megatron
optimizer, per-token loss, ``--mock-data``).

* Time: both models live in one process and their steps alternate (looped, untied,
  untied, looped, ...), so that both see the same machine state; ``--rounds`` fresh
  processes.  Reported: median time of a full training step and of forward+backward
  alone, per variant and as looped/untied ratio (median over rounds).  On CPU the clock
  is the process's CPU time (one thread), which other processes competing for the cores
  distort far less than wall time; on GPU it is wall time with synchronisation.
* Memory: one process per variant.  Parameter memory = weights + fp32 grad buffer +
  Adam states, counted from the live tensors; activation memory = distinct non-parameter
  tensors autograd saves for backward in one step; peak = CUDA max allocated (GPU) or
  the process's peak RSS (CPU; includes the Python/torch runtime).

Prints a table and writes JSON (``--out``).  Target: looped/untied step time <= 1.03;
parameter memory in proportion to the unique layers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import saved_activation_bytes  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
VARIANTS = ("looped", "untied")


def _trainer(ns, variant: str):
    from megatron_growloop.looping.spec import LoopSpec
    from megatron_growloop.pretrain import build_trainer, parse_pretrain_args

    argv = [
        "--mock-data", "--vocab-size", str(ns.vocab), "--tokenizer-type", "ByteTokenizer",
        "--hidden-size", str(ns.hidden), "--num-attention-heads", str(ns.heads), "--num-query-groups", str(ns.groups),
        "--ffn-hidden-size", str(ns.ffn or (ns.hidden * 11 // 4)), "--seq-length", str(ns.seq),
        "--max-position-embeddings", str(ns.seq), "--micro-batch-size", str(ns.mbs),
        "--train-iters", str(2 * (ns.warmup + ns.steps) + 2), "--log-interval", "1000", "--lr", "1e-4",
    ]
    if variant == "looped":
        argv += ["--loop", ns.loop]
    else:
        argv += ["--num-layers", str(LoopSpec.parse(ns.loop).effective_depth)]
    if ns.recompute:
        argv += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    trainer = build_trainer(parse_pretrain_args(argv, world_size=1))
    trainer.setup()
    return trainer


def _param_memory(trainer) -> int:
    import torch

    params = list(trainer.unwrapped.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.main_grad.numel() * p.main_grad.element_size() for p in params)
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for st in opt.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def worker_time(ns) -> dict:
    """Both variants in this process, steps alternating; medians per variant."""
    import torch

    from megatron_growloop import platform

    trainers = {v: _trainer(ns, v) for v in VARIANTS}
    cuda = platform.has_cuda()
    clock = time.perf_counter if cuda else time.process_time

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return clock() - t0

    def fwd_bwd(tr):
        for m in tr.model:
            m.zero_grad_buffer()
        tr._fwd_bwd(tr.train_iter, forward_only=False)

    for _ in range(ns.warmup):
        for tr in trainers.values():
            tr.train_step()
    step = {v: [] for v in VARIANTS}
    fb = {v: [] for v in VARIANTS}
    for i in range(ns.steps):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
        for v in order:
            step[v].append(timed(trainers[v].train_step))
        for v in order:
            fb[v].append(timed(lambda: fwd_bwd(trainers[v])))
    return {
        "clock": "wall" if cuda else "process CPU time",
        "device": "cuda" if cuda else "cpu",
        **{f"{v}_step_time_s": statistics.median(step[v]) for v in VARIANTS},
        **{f"{v}_fwd_bwd_time_s": statistics.median(fb[v]) for v in VARIANTS},
    }


def worker_memory(ns) -> dict:
    import resource

    import torch

    from megatron_growloop import platform

    trainer = _trainer(ns, ns.variant)
    cuda = platform.has_cuda()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(ns.warmup):  # Adam state is allocated lazily
        trainer.train_step()
    for _ in range(3):
        trainer.train_step()
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = trainer.unwrapped
    return {
        "variant": ns.variant,
        "unique_layers": trainer.arch.num_layers,
        "effective_depth": model.effective_depth,
        "unique_parameters": sum(p.numel() for p in model.parameters()),
        "param_memory_bytes": _param_memory(trainer),
        "activation_bytes": saved_activation_bytes(trainer),
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "max allocated (CUDA)" if cuda else "peak RSS of the process (CPU)",
    }


def _run_worker(ns, mode: str, hidden: int, variant: str = "") -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--hidden", str(hidden)]
    if variant:
        cmd += ["--variant", variant]
    for k in ("loop", "heads", "groups", "seq", "mbs", "vocab", "steps", "warmup"):
        cmd += [f"--{k}", str(getattr(ns, k))]
    if ns.ffn:
        cmd += ["--ffn", str(ns.ffn)]
    if ns.recompute:
        cmd += ["--recompute"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loop", default="4-4x4-4")
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--ffn", type=int, default=None, help="default: 11/4 x hidden")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--recompute", action="store_true", help="full activation recomputation (uniform, 1 layer)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "looping.json"))
    p.add_argument("--worker", choices=["time", "memory"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        import warnings

        warnings.filterwarnings("ignore")
        ns.hidden = ns.hidden[0]
        print(json.dumps(worker_time(ns) if ns.worker == "time" else worker_memory(ns)))
        return {}

    from megatron_growloop.looping.spec import LoopSpec

    spec = LoopSpec.parse(ns.loop)
    rows = []
    for hidden in ns.hidden:
        rounds = [_run_worker(ns, "time", hidden) for _ in range(ns.rounds)]
        mem = {v: _run_worker(ns, "memory", hidden, v) for v in VARIANTS}
        row = {"hidden": hidden, "rounds": rounds, "clock": rounds[0]["clock"], "device": rounds[0]["device"]}
        for v in VARIANTS:
            row[v] = dict(mem[v])
            for key in ("step_time_s", "fwd_bwd_time_s"):
                row[v][key] = statistics.median(r[f"{v}_{key}"] for r in rounds)
        for key in ("step_time_s", "fwd_bwd_time_s"):
            row[key.replace("_s", "_ratio")] = statistics.median(
                r[f"looped_{key}"] / r[f"untied_{key}"] for r in rounds
            )
        lo, un = row["looped"], row["untied"]
        row["step_time_ratio_per_round"] = [r["looped_step_time_s"] / r["untied_step_time_s"] for r in rounds]
        row["unique_layer_ratio"] = lo["unique_layers"] / un["unique_layers"]
        row["unique_parameter_ratio"] = lo["unique_parameters"] / un["unique_parameters"]
        row["param_memory_ratio"] = lo["param_memory_bytes"] / un["param_memory_bytes"]
        row["activation_ratio"] = lo["activation_bytes"] / un["activation_bytes"]
        row["peak_memory_ratio"] = lo["peak_memory_bytes"] / un["peak_memory_bytes"]
        rows.append(row)

    print(f"Loop({spec}) vs untied {spec.effective_depth} layers; seq {ns.seq}, micro batch {ns.mbs}, vocab {ns.vocab}, "
          f"{rows[0]['device']}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}"
          f"{', full recompute' if ns.recompute else ''}; times: median of {ns.steps} alternating steps, "
          f"median over {ns.rounds} rounds ({rows[0]['clock']})")
    print(f"peak memory: {rows[0]['looped']['peak_memory_kind']}; param MiB = weights + fp32 grads + Adam states; "
          "act MiB = tensors saved for backward")
    print(f"{'hidden':>6} {'model':>8} {'uniq.layers':>11} {'depth':>5} {'uniq.params':>11} {'param MiB':>9} "
          f"{'act MiB':>8} {'peak MiB':>8} {'step ms':>8} {'fwd+bwd ms':>10}")
    for r in rows:
        for v in VARIANTS:
            x = r[v]
            print(f"{r['hidden']:>6} {v:>8} {x['unique_layers']:>11} {x['effective_depth']:>5} "
                  f"{x['unique_parameters']:>11,} {x['param_memory_bytes'] / 2**20:>9.2f} "
                  f"{x['activation_bytes'] / 2**20:>8.2f} {x['peak_memory_bytes'] / 2**20:>8.1f} "
                  f"{x['step_time_s'] * 1e3:>8.1f} {x['fwd_bwd_time_s'] * 1e3:>10.1f}")
        print(f"{r['hidden']:>6} {'ratio':>8} {r['unique_layer_ratio']:>11.3f} {'':>5} "
              f"{r['unique_parameter_ratio']:>11.3f} {r['param_memory_ratio']:>9.3f} {r['activation_ratio']:>8.3f} "
              f"{r['peak_memory_ratio']:>8.3f} {r['step_time_ratio']:>8.3f} {r['fwd_bwd_time_ratio']:>10.3f}")
    verdict = all(r["step_time_ratio"] <= 1.03 for r in rows)
    ratios = ", ".join(f"{r['step_time_ratio']:.3f}" for r in rows)
    print(f"looped/untied step-time ratio <= 1.03: {'yes' if verdict else 'NO'} ({ratios})")
    result = {
        "benchmark": "looping",
        "loop": str(spec),
        "config": {k: v for k, v in vars(ns).items() if k not in ("worker", "variant")},
        "rows": rows,
        "target_step_time_ratio": 1.03,
        "meets_target": verdict,
        "command": " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:]),
    }
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
