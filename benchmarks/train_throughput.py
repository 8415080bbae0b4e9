"""Training throughput and peak memory per model preset (issue: foundation benchmark).

CPU:  python benchmarks/train_throughput.py --out benchmarks/results/train_throughput_cpu.json
GPU:  python benchmarks/train_throughput.py --presets smollm-360m smollm-1.7b --bf16 --seq-length 2048 \
          --micro-batch-size 8 --iters 20 --out benchmarks/results/train_throughput_gpu.json

Prints tokens/s, TFLOP/s per device (model FLOPs, see megatron_growloop/accounting.py), MFU where the
device peak is known (GPU), step time and peak memory (CUDA max allocated, or process peak RSS on CPU).
Random tokens (--mock-data) so the data pipeline is not measured.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from common import median_step_time, print_table, run_pretrain, steady, write_json


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "smollm-135m"])
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--extra", nargs="*", default=[], help="extra pretrain flags")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for preset in a.presets:
        args = ["--model-preset", preset, "--mock-data", "--vocab-size", "49152", "--seq-length", str(a.seq_length),
                "--micro-batch-size", str(a.micro_batch_size), "--train-iters", str(a.iters), "--log-interval",
                str(a.iters), "--lr-warmup-iters", "0"] + (["--bf16"] if a.bf16 else []) + a.extra
        rec = run_pretrain(args, nproc=a.nproc)
        st = median_step_time(rec, a.warmup)
        tokens = rec[-1]["tokens_per_iteration"]
        flops_per_iter = statistics.median(
            r2["training_flops"] - r1["training_flops"] for r1, r2 in zip(rec, rec[1:])
        ) if len(rec) > 1 else rec[0]["training_flops"]
        tflops = flops_per_iter / st / a.nproc / 1e12
        peak = None
        if torch.cuda.is_available():
            from megatron_growloop.accounting import device_peak_flops

            peak = device_peak_flops(torch.cuda.get_device_name())
        rows.append({
            "preset": preset,
            "seq": a.seq_length,
            "tokens/iter": tokens,
            "step_s": st,
            "tokens/s": tokens / st,
            "TFLOP/s/dev": tflops,
            "MFU": (tflops * 1e12 / peak) if peak else None,
            "peak_mem_GiB": max(r["peak_memory_bytes"] for r in rec) / 2**30,
            "final_loss": rec[-1]["loss"],
        })
    cols = ["preset", "seq", "tokens/iter", "step_s", "tokens/s", "TFLOP/s/dev", "MFU", "peak_mem_GiB"]
    print_table(rows, cols)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    write_json(a.out, {"device": device, "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
