"""Benchmark: randomized recurrence against a fixed k, and truncated against full backprop.

    OMP_NUM_THREADS=1 python benchmarks/recurrence.py [--loop 2-2x4-2] [--hidden 128 256]

* **Step time** (target: randomized / fixed <= 1.05).  Three trainers of ``Loop(e-L×m-d)``
  with the real stack (megatron-core DDP with overlapped grad reduce, the Megatron optimizer,
  ``--mock-data``) live in one process and their steps alternate: k fixed at the mean m,
  k ~ uniform(mean m) and k ~ poisson-lognormal(mean m), each drawn per step by the
  controller exactly as in training (``before_step``/``after_step`` around ``train_step``).
  A drawn sequence's sample mean differs from m, so the raw ratio of mean step times mixes
  the noise of the draw into the comparison.  Step time is affine in k, so the script fits
  ``t = a + b k`` to the randomized variant's steps (switching k, re-learning DDP counts and
  any other overhead of randomization land in ``a``) and reports ``(a + b m) / t_fixed``: the
  step time of randomized-k training at mean k against fixed k at the same mean.  On CPU the
  clock is process CPU time (one thread); ``--rounds`` fresh processes, medians over rounds.
  ``--backprop-depth n`` runs all three with truncated backprop.
* **Memory**: for k = ``--memory-k``, one process per backprop depth n (and full backprop):
  activation memory = distinct non-parameter tensors autograd saves in one step, and the
  peak (CUDA max allocated, or the process's peak RSS on CPU).

Prints tables and writes JSON (``--out``).
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
VARIANTS = ("fixed", "uniform", "poisson-lognormal")


def _argv(ns, loop: str) -> list:
    return [
        "--mock-data", "--vocab-size", str(ns.vocab), "--tokenizer-type", "ByteTokenizer", "--loop", loop,
        "--hidden-size", str(ns.hidden), "--num-attention-heads", str(ns.heads), "--num-query-groups", str(ns.groups),
        "--ffn-hidden-size", str(ns.hidden * 11 // 4), "--seq-length", str(ns.seq),
        "--max-position-embeddings", str(ns.seq), "--micro-batch-size", str(ns.mbs),
        "--train-iters", "100000", "--log-interval", "100000", "--lr", "1e-4", "--overlap-grad-reduce",
        "--seed", str(ns.seed),
    ]


def _trainer(argv):
    from megatron_growloop.pretrain import build_trainer, parse_pretrain_args

    trainer = build_trainer(parse_pretrain_args(argv, world_size=1))
    trainer.setup()
    return trainer


def _step(trainer) -> float:
    """One training step as the trainer's loop runs it (controllers around ``train_step``);
    returns its model FLOPs."""
    a = trainer.args
    for c in trainer.controllers:
        c.before_step(trainer)
    trainer.train_step()
    m = trainer.unwrapped
    flops = trainer.arch.shape.training_flops_per_token(m.effective_depth, a.seq_length, m.backward_depth)
    trainer.state.iteration += 1
    for c in trainer.controllers:
        c.after_step(trainer)
    return float(flops) * a.global_batch_size * a.seq_length


def worker_time(ns) -> dict:
    import torch

    from megatron_growloop import platform
    from megatron_growloop.looping.spec import LoopSpec

    spec = LoopSpec.parse(ns.loop)
    m = spec.repeats
    depth = ["--loop-backprop-depth", str(ns.backprop_depth)] if ns.backprop_depth else []
    flags = {
        "fixed": ["--loop-repeats-dist", "fixed"] + depth,
        "uniform": ["--loop-repeats-dist", "uniform", "--loop-repeats-mean", str(m)] + depth,
        "poisson-lognormal": ["--loop-repeats-dist", "poisson-lognormal", "--loop-repeats-mean", str(m),
                              "--loop-repeats-max", str(ns.max_repeats or 3 * m)] + depth,
    }
    trainers = {v: _trainer(_argv(ns, ns.loop) + flags[v]) for v in VARIANTS}
    cuda = platform.has_cuda()
    clock = time.perf_counter if cuda else time.process_time
    for _ in range(ns.warmup):
        for tr in trainers.values():
            _step(tr)
    times = {v: [] for v in VARIANTS}
    flops = {v: [] for v in VARIANTS}
    ks = {v: [] for v in VARIANTS}
    for i in range(ns.steps):
        for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
            tr = trainers[v]
            if cuda:
                torch.cuda.synchronize()
            t0 = clock()
            f = _step(tr)
            if cuda:
                torch.cuda.synchronize()
            times[v].append(clock() - t0)
            flops[v].append(f)
            ks[v].append(tr.controllers[-1].last_repeats)
    out = {"clock": "wall" if cuda else "process CPU time", "device": "cuda" if cuda else "cpu", "mean": m}
    for v in VARIANTS:
        out[v] = {
            "mean_step_time_s": statistics.mean(times[v]),
            "mean_k": statistics.mean(ks[v]),
            "ks": ks[v],
            "step_times_s": times[v],
            "step_flops": flops[v],
        }
        if len(set(ks[v])) > 1:
            fit = statistics.linear_regression(ks[v], times[v])
            out[v].update(fit_intercept_s=fit.intercept, fit_slope_s=fit.slope,
                          step_time_at_mean_s=fit.intercept + fit.slope * m)
        else:
            out[v]["step_time_at_mean_s"] = statistics.mean(times[v])
    return out


def worker_memory(ns) -> dict:
    import resource

    import torch

    from megatron_growloop import platform
    from megatron_growloop.looping.spec import LoopSpec

    loop = str(LoopSpec.parse(ns.loop).with_repeats(ns.memory_k))
    extra = ["--loop-backprop-depth", str(ns.backprop_depth)] if ns.backprop_depth else []
    trainer = _trainer(_argv(ns, loop) + extra)
    cuda = platform.has_cuda()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        _step(trainer)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "backprop_depth": ns.backprop_depth,
        "k": ns.memory_k,
        "effective_depth": trainer.unwrapped.effective_depth,
        "backward_depth": trainer.unwrapped.backward_depth,
        "activation_bytes": saved_activation_bytes(trainer),
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "max allocated (CUDA)" if cuda else "peak RSS of the process (CPU)",
    }


def _run_worker(ns, mode: str, hidden: int, backprop_depth=None) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--hidden", str(hidden)]
    for k in ("loop", "heads", "groups", "seq", "mbs", "vocab", "steps", "warmup", "seed", "memory_k", "max_repeats"):
        v = getattr(ns, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    if backprop_depth:
        cmd += ["--backprop-depth", str(backprop_depth)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loop", default="2-2x4-2", help="the model; its k is the mean m")
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-repeats", type=int, default=None, help="poisson-lognormal cap (default 3 x mean)")
    p.add_argument("--backprop-depth", type=int, default=None, help="time all variants with truncated backprop")
    p.add_argument("--memory-k", type=int, default=8)
    p.add_argument("--memory-depths", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recurrence.json"))
    p.add_argument("--worker", choices=["time", "memory"], default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        import warnings

        warnings.filterwarnings("ignore")
        ns.hidden = ns.hidden[0]
        print(json.dumps(worker_time(ns) if ns.worker == "time" else worker_memory(ns)))
        return {}

    rows, mem_rows = [], []
    for hidden in ns.hidden:
        rounds = [_run_worker(ns, "time", hidden, ns.backprop_depth) for _ in range(ns.rounds)]
        row = {"hidden": hidden, "rounds": rounds, "clock": rounds[0]["clock"], "device": rounds[0]["device"]}
        for v in VARIANTS:
            row[v] = {key: statistics.median(r[v][key] for r in rounds)
                      for key in ("mean_step_time_s", "step_time_at_mean_s", "mean_k")}
        for v in VARIANTS[1:]:
            row[f"{v}_raw_step_time_ratio"] = statistics.median(
                r[v]["mean_step_time_s"] / r["fixed"]["mean_step_time_s"] for r in rounds)
            row[f"{v}_step_time_ratio_at_mean"] = statistics.median(
                r[v]["step_time_at_mean_s"] / r["fixed"]["mean_step_time_s"] for r in rounds)
        rows.append(row)
        full = _run_worker(ns, "memory", hidden)
        for n in ns.memory_depths:
            x = _run_worker(ns, "memory", hidden, n)
            mem_rows.append({"hidden": hidden, **x, "activation_ratio": x["activation_bytes"] / full["activation_bytes"],
                             "peak_ratio": x["peak_memory_bytes"] / full["peak_memory_bytes"]})
        mem_rows.append({"hidden": hidden, **full, "activation_ratio": 1.0, "peak_ratio": 1.0})

    n_txt = f", backprop depth {ns.backprop_depth}" if ns.backprop_depth else ", full backprop"
    print(f"Loop({ns.loop}): k fixed at the mean vs drawn per step; seq {ns.seq}, micro batch {ns.mbs}, vocab "
          f"{ns.vocab}{n_txt}, {rows[0]['device']}, {ns.steps} alternating steps, median over {ns.rounds} rounds "
          f"({rows[0]['clock']})")
    print(f"{'hidden':>6} {'variant':>18} {'drawn mean k':>12} {'mean step ms':>12} {'raw ratio':>9} "
          f"{'step ms at mean k':>17} {'ratio at mean k':>15}")
    for r in rows:
        for v in VARIANTS:
            x = r[v]
            ratios = ("", "") if v == "fixed" else (f"{r[f'{v}_raw_step_time_ratio']:.3f}",
                                                   f"{r[f'{v}_step_time_ratio_at_mean']:.3f}")
            print(f"{r['hidden']:>6} {v:>18} {x['mean_k']:>12.2f} {x['mean_step_time_s'] * 1e3:>12.1f} "
                  f"{ratios[0]:>9} {x['step_time_at_mean_s'] * 1e3:>17.1f} {ratios[1]:>15}")
    print(f"\nmemory at k={ns.memory_k} (activations = tensors saved for backward; peak: "
          f"{mem_rows[0]['peak_memory_kind']})")
    print(f"{'hidden':>6} {'backprop n':>10} {'depth':>5} {'bwd depth':>9} {'act MiB':>8} {'act ratio':>9} "
          f"{'peak MiB':>8} {'peak ratio':>10}")
    for r in mem_rows:
        print(f"{r['hidden']:>6} {str(r['backprop_depth'] or 'full'):>10} {r['effective_depth']:>5} "
              f"{r['backward_depth']:>9} {r['activation_bytes'] / 2**20:>8.2f} {r['activation_ratio']:>9.3f} "
              f"{r['peak_memory_bytes'] / 2**20:>8.1f} {r['peak_ratio']:>10.3f}")
    ok = all(r[f"{v}_step_time_ratio_at_mean"] <= 1.05 for r in rows for v in VARIANTS[1:])
    print(f"randomized-k step time at mean k / fixed k <= 1.05: {'yes' if ok else 'NO'}")
    result = {"args": {k: v for k, v in vars(ns).items() if k != "worker"}, "step_time": rows, "memory": mem_rows}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {ns.out}")
    return result


if __name__ == "__main__":
    main()
