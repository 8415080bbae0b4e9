"""Benchmark: cost of a growth step relative to a training step, and throughput after growth.

Runs a real :class:`~megatron_growloop.training.trainer.Trainer` in this process (or under
``torchrun`` for several ranks), grows it ``--grow-steps`` times (e.g. 4 -> 8 -> 12 -> 16
layers) and measures, per depth:

* the median training-step time of the *grown* model;
* the wall time of the growth step (save to scratch, rebuild, load through the source view);
* the median training-step time of a model *built at that depth* from scratch (same flags),
  so that "throughput after growth equals a model built at that depth" can be read off.

Targets (issue 4): a growth step costs <= 2 training-step times on CPU (<= 5 on GPU).

    python benchmarks/growth.py                              # CPU, tiny preset, 1 process
    torchrun --nproc_per_node 2 benchmarks/growth.py --use-distributed-optimizer

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _trainer(argv):
    from megatron_growloop.pretrain import build_trainer, parse_pretrain_args

    t = build_trainer(parse_pretrain_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1"))))
    t.setup()
    return t


def _step_times(t, n: int, warmup: int):
    """Wall and CPU (this process) seconds of ``n`` training steps after ``warmup`` untimed ones."""
    wall, cpu = [], []
    for i in range(warmup + n):
        t0, c0 = time.perf_counter(), time.process_time()
        t.train_step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        t.state.iteration += 1
        t.state.consumed_train_samples += t.args.global_batch_size
        if i >= warmup:
            wall.append(dt)
            cpu.append(dc)
    return statistics.median(wall), statistics.median(cpu)


def _median_over_ranks(x: float) -> float:
    import torch
    import torch.distributed as dist

    v = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)  # a step/growth is as slow as its slowest rank
    return float(v)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-preset", default="tiny")
    p.add_argument("--method", default="lidas", choices=["midas", "lidas", "stack"])
    p.add_argument("--start-layers", type=int, default=4)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--grow-steps", type=int, default=3)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--iters", type=int, default=8, help="timed steps per depth")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after (re)building")
    p.add_argument("--repeats", type=int, default=3, help="repeat the whole growth sequence; medians reported")
    p.add_argument("--grow-scratch-dir", default=None)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "growth.json"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more pretrain flags (e.g. parallelism)")
    a, unknown = p.parse_known_args(argv)
    extra = list(a.extra) + unknown

    final = a.start_layers + a.grow_steps * a.block_size
    per_stage = a.warmup + a.iters
    grow_iters = (a.grow_steps + 1) * per_stage * 4  # generous; growth is triggered by hand below
    base = ["--model-preset", a.model_preset, "--mock-data", "--vocab-size", "384", "--tokenizer-type",
            "ByteTokenizer", "--micro-batch-size", str(a.micro_batch_size), "--log-interval", "1000000",
            "--lr-decay-style", "constant", "--train-iters", str(grow_iters + 1)]
    if a.seq_length:
        base += ["--seq-length", str(a.seq_length)]
    if a.grow_scratch_dir:
        base += ["--grow-scratch-dir", a.grow_scratch_dir]
    base += extra

    import torch.distributed as dist

    depths = [a.start_layers + i * a.block_size for i in range(a.grow_steps + 1)]
    grown_steps = {d: [] for d in depths}
    growth = {d: [] for d in depths[1:]}
    fresh_steps = {d: [] for d in depths}
    cpu = {"grown": {d: [] for d in depths}, "fresh": {d: [] for d in depths}, "growth": {d: [] for d in depths}}
    for rep in range(a.repeats):
        t = _trainer(base + ["--num-layers", str(a.start_layers), "--grow-method", a.method,
                             "--grow-block-size", str(a.block_size), "--grow-final-layers", str(final),
                             "--grow-iters", str(grow_iters)])
        for i, d in enumerate(depths):
            if i:
                c0 = time.process_time()
                (grower,) = t.controllers
                times = grower.grow(t, [i - 1])
                cpu["growth"][d].append(_median_over_ranks(time.process_time() - c0))
                growth[d].append({k: _median_over_ranks(v) for k, v in times.items()})
            w, c = _step_times(t, a.iters, a.warmup)
            grown_steps[d].append(_median_over_ranks(w))
            cpu["grown"][d].append(_median_over_ranks(c))
        del t
        for d in depths:
            f = _trainer(base + ["--num-layers", str(d)])
            w, c = _step_times(f, a.iters, a.warmup)
            fresh_steps[d].append(_median_over_ranks(w))
            cpu["fresh"][d].append(_median_over_ranks(c))
            del f

    rank0 = dist.get_rank() == 0
    rows = []
    for i, d in enumerate(depths):
        row = {"depth": d, "step_s_grown": statistics.median(grown_steps[d]),
               "step_s_fresh": statistics.median(fresh_steps[d])}
        row["throughput_grown_over_fresh"] = row["step_s_fresh"] / row["step_s_grown"]
        row["cpu_step_s_grown"] = statistics.median(cpu["grown"][d])
        row["cpu_step_s_fresh"] = statistics.median(cpu["fresh"][d])
        row["cpu_throughput_grown_over_fresh"] = row["cpu_step_s_fresh"] / row["cpu_step_s_grown"]
        if i:
            g = growth[d]
            row["growth_s_first"] = g[0]["total_s"]  # includes this process' first checkpoint I/O
            for k in ("total_s", "save_s", "rebuild_s", "load_s"):
                row[f"growth_{k}"] = statistics.median(x[k] for x in g)
            prev = statistics.median(grown_steps[depths[i - 1]])
            row["growth_over_step_old"] = row["growth_total_s"] / prev
            row["growth_over_step_new"] = row["growth_total_s"] / row["step_s_grown"]
            row["cpu_growth_s"] = statistics.median(cpu["growth"][d])
            row["cpu_growth_over_step_old"] = row["cpu_growth_s"] / statistics.median(cpu["grown"][depths[i - 1]])
        rows.append(row)
    if rank0:
        hdr = (f"{'depth':>5} {'step ms grown':>13} {'step ms fresh':>13} {'thr grown/fresh':>15} "
               f"{'growth ms':>9} {'save':>6} {'rebuild':>7} {'load':>6} {'/step(old)':>10} {'/step(new)':>10} "
               f"{'cpu: thr g/f':>12} {'growth/step(old)':>16}")
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            line = f"{r['depth']:>5} {1e3 * r['step_s_grown']:>13.1f} {1e3 * r['step_s_fresh']:>13.1f} " \
                   f"{r['throughput_grown_over_fresh']:>15.3f}"
            if "growth_total_s" in r:
                line += (f" {1e3 * r['growth_total_s']:>9.0f} {1e3 * r['growth_save_s']:>6.0f} "
                         f"{1e3 * r['growth_rebuild_s']:>7.0f} {1e3 * r['growth_load_s']:>6.0f} "
                         f"{r['growth_over_step_old']:>10.2f} {r['growth_over_step_new']:>10.2f}")
            else:
                line += " " * 62
            line += f" {r['cpu_throughput_grown_over_fresh']:>12.3f}"
            if "cpu_growth_over_step_old" in r:
                line += f" {r['cpu_growth_over_step_old']:>16.2f}"
            print(line)
        print("wall-clock columns first; 'cpu:' columns use this process' CPU time (robust on a shared machine)")
        import torch

        out = {
            "benchmark": "growth",
            "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
            "world_size": dist.get_world_size(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "host": {"machine": _platform.machine(), "cpus": os.cpu_count(),
                     "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
            "settings": vars(a),
            "rows": rows,
            "targets": {"growth_over_step_cpu": 2.0, "growth_over_step_gpu": 5.0},
        }
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {a.json}")
    from megatron_growloop.training.initialize import teardown

    teardown()


if __name__ == "__main__":
    main()
