"""SDPA against megatron-core's unfused attention: training step time and peak memory (issue 13).

    python benchmarks/attention_backends.py --out benchmarks/results/attention_backends_cpu.json

For every preset and sequence length, one pretraining process per backend (``--attention-backend
sdpa`` and ``unfused``; everything else identical: fp32, ``--mock-data``, micro batch 1, vocab
49152), the two run back to back.  Step time: median of the iterations after ``--warmup``;
peak memory: the process's peak RSS on CPU (model, optimizer and activations), CUDA's
``max_memory_allocated`` on a GPU.  The table gives SDPA/unfused ratios.

Targets (docs/benchmarks.md): at sequence 2048 peak memory <= 0.5x and step time <= 0.8x; no
regression at 256.
"""

from __future__ import annotations

import argparse
import platform

import torch

from common import median_step_time, print_table, run_pretrain, write_json


def measure(preset: str, seq: int, backend: str, a) -> dict:
    args = ["--model-preset", preset, "--mock-data", "--vocab-size", "49152", "--seq-length", str(seq),
            "--max-position-embeddings", str(max(seq, 2048)), "--micro-batch-size", str(a.micro_batch_size),
            "--train-iters", str(a.iters), "--log-interval", str(a.iters), "--lr-warmup-iters", "0",
            "--attention-backend", backend] + (["--bf16"] if a.bf16 else []) + a.extra
    rec = run_pretrain(args, nproc=1)
    return {"step_s": median_step_time(rec, a.warmup), "peak_GiB": max(r["peak_memory_bytes"] for r in rec) / 2**30,
            "loss": rec[-1]["loss"]}


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
    a = p.parse_args()
    rows = []
    for preset in a.presets:
        for seq in a.seqs:
            sdpa = measure(preset, seq, "sdpa", a)
            unfused = measure(preset, seq, "unfused", a)
            rows.append({"preset": preset, "seq": seq, "sdpa_step_s": sdpa["step_s"], "unfused_step_s": unfused["step_s"],
                         "step_ratio": sdpa["step_s"] / unfused["step_s"], "sdpa_peak_GiB": sdpa["peak_GiB"],
                         "unfused_peak_GiB": unfused["peak_GiB"], "peak_ratio": sdpa["peak_GiB"] / unfused["peak_GiB"],
                         "sdpa_loss": sdpa["loss"], "unfused_loss": unfused["loss"]})
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["preset", "seq", "sdpa_step_s", "unfused_step_s", "step_ratio", "sdpa_peak_GiB",
                       "unfused_peak_GiB", "peak_ratio"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    write_json(a.out, {"device": device, "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
