"""SDPA against megatron-core's unfused attention: training step time and peak memory (issue 13).

    python benchmarks/attention_backends.py --out benchmarks/results/attention_backends_cpu.json

For every preset and sequence length, one training process per backend (``--attention-backend
sdpa`` and ``unfused``; everything else identical: fp32, ``--mock-data``, micro batch 1, vocab
49152), the two back to back.  Each process builds the real trainer and times
``Trainer.train_step``: step time is the median of the steps after ``--warmup``.  Memory on CPU:

* ``peak_GiB``: the process's peak RSS (model, gradients, optimizer states and activations);
* ``act_GiB``: that peak minus the RSS after the first step (when the optimizer states exist and
  the step's activations are freed): what the forward/backward of a step adds at its peak.

glibc keeps freed blocks in its arenas, which would hide the second number; each process runs
with ``MALLOC_MMAP_THRESHOLD_=65536`` (every block of 64 KiB or more is mapped and unmapped on
free), for both backends alike.  On a GPU the two numbers come from ``max_memory_allocated``
and ``memory_allocated``.  The table gives SDPA/unfused ratios.

Targets (docs/benchmarks.md): at sequence 2048 peak memory <= 0.5x and step time <= 0.8x; no
regression at 256.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import psutil
import torch

from common import ROOT, env, print_table, write_json


def _argv(preset: str, seq: int, backend: str, a) -> list:
    return ["--model-preset", preset, "--mock-data", "--vocab-size", "49152", "--seq-length", str(seq),
            "--max-position-embeddings", str(max(seq, 2048)), "--micro-batch-size", str(a.micro_batch_size),
            "--train-iters", "1000", "--log-interval", "1000", "--lr-warmup-iters", "0",
            "--attention-backend", backend] + (["--bf16"] if a.bf16 else []) + a.extra


def one(argv: list, iters: int, warmup: int) -> dict:
    """In this process: build the trainer for ``argv``, run ``iters`` steps, measure."""
    sys.path.insert(0, str(ROOT))
    from megatron_growloop import platform as mplatform
    from megatron_growloop.pretrain import build_trainer, parse_pretrain_args

    mplatform.setup()
    cuda = torch.cuda.is_available()
    trainer = build_trainer(parse_pretrain_args(argv, world_size=1))
    trainer.setup()
    times, loss, after_first = [], None, 0
    for i in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = trainer.train_step()["loss"]
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        trainer.state.iteration += 1
        if i == 0:
            after_first = torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": statistics.median(times[warmup:] or times[-1:]), "all_s": times, "peak_GiB": peak / 2**30,
            "act_GiB": (peak - after_first) / 2**30, "loss": float(loss), "threads": torch.get_num_threads()}


def measure(preset: str, seq: int, backend: str, a) -> dict:
    e = env()
    e["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(_argv(preset, seq, backend, a)),
                           "--iters", str(a.iters), "--warmup", str(a.warmup)],
                          env=e, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{preset} seq {seq} {backend} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


COLUMNS = ["preset", "seq", "sdpa_step_s", "unfused_step_s", "step_ratio", "sdpa_peak_GiB", "unfused_peak_GiB",
           "peak_ratio", "sdpa_act_GiB", "unfused_act_GiB", "act_ratio"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["small", "smollm-135m"])
    p.add_argument("--seqs", nargs="+", type=int, default=[256, 1024, 2048])
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--extra", nargs="*", default=[])
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON argv
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(one(json.loads(a.one), a.iters, a.warmup)), flush=True)
        return
    rows = []
    for preset in a.presets:
        for seq in a.seqs:
            sdpa = measure(preset, seq, "sdpa", a)
            unfused = measure(preset, seq, "unfused", a)
            rows.append({"preset": preset, "seq": seq, "sdpa_step_s": sdpa["step_s"], "unfused_step_s": unfused["step_s"],
                         "step_ratio": sdpa["step_s"] / unfused["step_s"], "sdpa_peak_GiB": sdpa["peak_GiB"],
                         "unfused_peak_GiB": unfused["peak_GiB"], "peak_ratio": sdpa["peak_GiB"] / unfused["peak_GiB"],
                         "sdpa_act_GiB": sdpa["act_GiB"], "unfused_act_GiB": unfused["act_GiB"],
                         "act_ratio": sdpa["act_GiB"] / unfused["act_GiB"], "threads": sdpa["threads"],
                         "sdpa_all_s": sdpa["all_s"], "unfused_all_s": unfused["all_s"], "sdpa_loss": sdpa["loss"], "unfused_loss": unfused["loss"]})
            print_table(rows[-1:], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    write_json(a.out, {"device": device, "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
