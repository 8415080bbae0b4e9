"""Fine-tuning throughput against pretraining throughput on the same model (issue 15).

CPU:  python benchmarks/sft.py --out benchmarks/results/sft.json
GPU:  python benchmarks/sft.py --presets smollm-360m --seq-length 2048 --micro-batch-size 4 --bf16 \
          --iters 20 --out benchmarks/results/sft_gpu.json

For each preset, in alternating order over ``--rounds`` rounds, one process runs
``megatron_growloop.pretrain`` on the embedded corpus (``GPTDataset``) and one runs
``megatron_growloop.finetune`` on reasoning-primitive examples (``va_code_d1,va_code_d2``,
packed sequences with block-diagonal attention masks, loss on answers only), and with
``--sft-packing pad`` for reference.  Same model, sequence length, micro/global batch,
precision, freshly initialised weights; the median step time over iterations after
``--warmup``.  ``tokens/s`` counts sequence positions (what the model computes);
``example tokens/s`` only positions holding example tokens (padding excluded) and
``answer tokens/s`` only targets with loss.  The target: SFT positions/s >= 0.9 x pretraining's
(masking and packing must not cost).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import ROOT, env, median_step_time, print_table, write_json


def run(module: str, args, nproc: int = 1):
    with tempfile.TemporaryDirectory() as d:
        metrics = Path(d) / "m.jsonl"
        cmd = ([sys.executable, "-m", module] if nproc == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", module])
        proc = subprocess.run(cmd + args + ["--metrics-file", str(metrics)], env=env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        sft_line = next((l for l in proc.stdout.splitlines() if l.startswith("fine-tuning on")), None)
        return [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()], sft_line


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["small", "smollm-135m"])
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=512, help="fine-tuning examples (generated primitives)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for preset in a.presets:
        common = ["--model-preset", preset, "--seq-length", str(a.seq_length), "--micro-batch-size",
                  str(a.micro_batch_size), "--train-iters", str(a.iters), "--log-interval", str(a.iters),
                  "--lr-warmup-iters", "0", "--seed", "1"] + (["--bf16"] if a.bf16 else [])
        sft = common + ["--sft-tasks", "va_code_d1,va_code_d2", "--sft-examples", str(a.examples)]
        kinds = {
            "pretrain": ("megatron_growloop.pretrain", common),
            "sft pack": ("megatron_growloop.finetune", sft + ["--sft-packing", "pack"]),
            "sft pad": ("megatron_growloop.finetune", sft + ["--sft-packing", "pad"]),
        }
        times = {k: [] for k in kinds}
        info = {}
        for r in range(a.rounds):
            order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
            for k in order:
                module, args = kinds[k]
                rec, line = run(module, args, a.nproc)
                times[k].append(median_step_time(rec, a.warmup))
                if line:
                    info[k] = line
                print(f"{preset} round {r} {k}: step {times[k][-1]:.4f}s", flush=True)
        positions = a.micro_batch_size * a.nproc * a.seq_length  # global batch = micro batch x DP
        base = statistics.median(times["pretrain"])
        for k in kinds:
            st = statistics.median(times[k])
            row = {"preset": preset, "run": k, "step_s": st, "tokens/s": positions / st,
                   "ratio_vs_pretrain": base / st,
                   "per_round_ratio": [b / t for b, t in zip(times["pretrain"], times[k])]}
            if k != "pretrain":
                stats = _stats(info.get(k, ""))
                row["fill"] = stats.get("fill")
                row["example tokens/s"] = positions * stats["fill"] / st if stats.get("fill") else None
                row["answer tokens/s"] = (positions * stats["answer_fraction"] / st
                                          if stats.get("answer_fraction") else None)
                row["sft_setup"] = info.get(k)
            rows.append(row)
    cols = ["preset", "run", "step_s", "tokens/s", "ratio_vs_pretrain", "fill", "example tokens/s", "answer tokens/s"]
    print_table(rows, cols)
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    write_json(a.out, {"device": device, "args": vars(a), "rows": rows})


def _stats(line: str):
    """Fill and answer fraction from the fine-tuning start-up line."""
    m = re.search(r"(\d+) (?:packed|padded) sequences of (\d+) tokens, ([\d.]+)% filled, (\d+) answer tokens", line)
    if not m:
        return {}
    seqs, seq, fill, answers = int(m.group(1)), int(m.group(2)), float(m.group(3)) / 100, int(m.group(4))
    return {"fill": fill, "answer_fraction": answers / (seqs * seq)}


if __name__ == "__main__":
    main()
