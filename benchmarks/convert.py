"""Benchmark: checkpoint conversion of SmolLM2-135M against a plain ``torch.save`` + ``torch.load``.

    python benchmarks/convert.py [--rounds 3] [--out benchmarks/results/convert.json]

Operations, each in a fresh process (imports done and, for the converters, the one-rank
process group created before timing; the HF input is the cached safetensors fixture
``megatron_growloop.convert.smollm2_hf_dir()``, 135M float32 parameters, 538 MB):

* ``baseline``: ``torch.save`` of the same tensors (the HF state dict, already in memory)
  to a file, then ``torch.load`` of it;
* ``hf-to-mcore``: :func:`megatron_growloop.convert.hf_to_mcore` (read safetensors, map,
  write a torch_dist checkpoint with megatron's ``dist_checkpointing``);
* ``mcore-to-hf``: :func:`megatron_growloop.convert.mcore_to_hf` (read the torch_dist
  model tensors, map back, write safetensors + config + tokenizer).

Rounds alternate the three operations to even out machine noise.  Reported per operation:
median wall time, median CPU time of the process *and its children* (megatron's
checkpoint writer forks helper processes; on a shared machine CPU time is the robust
number), and peak memory above the process's RSS before the operation (parent; plus the
largest child's peak RSS).  Target: conversion <= 3x the baseline in time and memory.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPS = ("baseline", "hf-to-mcore", "mcore-to-hf")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu(resource) -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def worker(op: str, work: Path, hf_dir: str, ckpt: str) -> dict:
    import resource
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if op == "baseline":
        from safetensors.torch import load_file

        tensors = load_file(str(Path(hf_dir) / "model.safetensors"))
        tensors = {k: v.clone() for k, v in tensors.items()}  # resident, like a model in memory
    else:
        import safetensors.torch  # noqa: F401  (imports are not part of the timed operation)

        from megatron_growloop import accounting  # noqa: F401
        from megatron_growloop.convert import exporter, importer  # noqa: F401
        from megatron_growloop.convert import hf_to_mcore, mcore_to_hf
        from megatron_growloop.convert.megatron_io import ensure_single_process
        from megatron_growloop.growth import operators  # noqa: F401
        from megatron_growloop.model import gpt, loading  # noqa: F401
        from megatron_growloop.training import checkpointing  # noqa: F401

        ensure_single_process()
    rss0 = _rss_bytes()
    cpu0, t0 = _cpu(resource), time.perf_counter()
    if op == "baseline":
        f = work / "tensors.pt"
        torch.save(tensors, str(f))
        back = torch.load(str(f), map_location="cpu", weights_only=True)
        assert len(back) == len(tensors)
    elif op == "hf-to-mcore":
        hf_to_mcore(hf_dir, str(work / "ckpt"))
    else:
        mcore_to_hf(ckpt, str(work / "hf"))
    wall, cpu = time.perf_counter() - t0, _cpu(resource) - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"op": op, "wall_s": wall, "cpu_s": cpu, "peak_over_start_bytes": max(0, peak - rss0),
            "peak_rss_bytes": peak, "child_peak_rss_bytes": child, "rss_at_start_bytes": rss0}


def run_one(op: str, hf_dir: str, ckpt: str, tmp_root: Path) -> dict:
    work = Path(tempfile.mkdtemp(dir=tmp_root, prefix=op + "-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", op, "--work", str(work), "--hf", hf_dir,
                               "--ckpt", ckpt], env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{op} failed:\n{proc.stderr[-3000:]}")
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hf", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        res = worker(ns.worker, Path(ns.work), ns.hf, ns.ckpt)
        print("RESULT " + json.dumps(res), flush=True)
        return res

    from megatron_growloop.convert import smollm2_hf_dir

    hf_dir = str(smollm2_hf_dir())
    tmp_root = Path(tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        # A checkpoint to export, converted once outside the timed runs (also warms the page cache).
        ckpt_dir = tmp_root / "ckpt"
        subprocess.run([sys.executable, "-m", "megatron_growloop.convert", "hf-to-mcore", "--hf", hf_dir,
                        "--out", str(ckpt_dir)], check=True, capture_output=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore"))
        runs = {op: [] for op in OPS}
        for _ in range(ns.rounds):
            for op in OPS:
                runs[op].append(run_one(op, hf_dir, str(ckpt_dir), tmp_root))
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    summary = {}
    for op in OPS:
        rs = runs[op]
        summary[op] = {
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "peak_over_start_mb": max(r["peak_over_start_bytes"] for r in rs) / 2**20,
            "child_peak_rss_mb": max(r["child_peak_rss_bytes"] for r in rs) / 2**20,
            "peak_rss_mb": max(r["peak_rss_bytes"] for r in rs) / 2**20,
        }
    base = summary["baseline"]
    for op in OPS:
        s = summary[op]
        s["wall_ratio"] = s["wall_s"] / base["wall_s"]
        s["cpu_ratio"] = s["cpu_s"] / base["cpu_s"]
        s["memory_ratio"] = s["peak_over_start_mb"] / base["peak_over_start_mb"]
    header = f"{'operation':<13} {'wall s':>8} {'cpu s':>8} {'x wall':>7} {'x cpu':>7} {'peak+ MB':>9} {'x mem':>6} {'child MB':>9}"
    print("SmolLM2-135M (float32, 538 MB of tensors), median of", ns.rounds, "rounds")
    print(header)
    print("-" * len(header))
    for op in OPS:
        s = summary[op]
        print(f"{op:<13} {s['wall_s']:8.2f} {s['cpu_s']:8.2f} {s['wall_ratio']:7.2f} {s['cpu_ratio']:7.2f} "
              f"{s['peak_over_start_mb']:9.0f} {s['memory_ratio']:6.2f} {s['child_peak_rss_mb']:9.0f}")
    result = {"benchmark": "convert", "model": "SmolLM2-135M-Instruct (float32)", "rounds": ns.rounds,
              "target": "conversion <= 3x torch.save+torch.load (time and memory)", "summary": summary, "runs": runs,
              "command": "python benchmarks/convert.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {ns.out}")
    return result


if __name__ == "__main__":
    main()
