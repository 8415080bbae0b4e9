"""The measurements of ``benchmarks/gpu_check.sh``, one function per item (issue 13).

    python benchmarks/gpu_items.py ITEM --out FILE.json [--dry-run | --smoke]

Items (``ITEMS``; add one by writing ``item_<name>(ctx) -> dict`` and registering it):

* ``mfu``      (a) bf16 training throughput and MFU of ``smollm-360m`` and ``smollm-1.7b`` at sequence
               2048 on the SDPA path (peak 989 TFLOP/s dense bf16, H100/H200);
* ``loop``     (b) ``Loop(4-4x4-4)`` against the untied 24-layer model at 1.7B width: step-time ratio;
* ``growth``   (c) a LIDAS growth step against a training step;
* ``generate`` (d) cached against uncached greedy generation of a looped model (same tokens?);
* ``sync``     (e) ``torch.cuda.set_sync_debug_mode("warn")`` over 3 training steps: host syncs.

``--dry-run`` builds every command line and parses it with the real argument parser (so a flag
that does not exist, or a preset that does not fit, fails here, on CPU, for free) and writes the
plan without running anything.  ``--smoke`` runs the item at toy sizes (tiny preset, a few
steps), which also works on CPU: it exercises the measuring code itself.  Every item writes one
JSON object: ``{"item", "status": "ok"|"dry-run"|"failed", "seconds", ...measurements}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 (the reference; accounting.PEAK_FLOPS agrees)
MOCK = ["--mock-data", "--vocab-size", "49152", "--tokenizer-type", "ByteTokenizer", "--lr", "1e-4",
        "--lr-warmup-iters", "0", "--lr-decay-style", "constant"]


@dataclass
class Ctx:
    dry_run: bool
    smoke: bool
    log: Callable[[str], None]

    @property
    def cuda(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def size(self, full, smoke):
        return smoke if self.smoke else full


def parse(argv: List[str]):
    """The pretrain argument parser's verdict on ``argv`` (one process)."""
    from megatron_growloop.pretrain import parse_pretrain_args

    return parse_pretrain_args(argv, world_size=1)


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(trainer, n: int) -> List[float]:
    out = []
    for _ in range(n):
        synchronize()
        t0 = time.perf_counter()
        trainer.train_step()
        synchronize()
        out.append(time.perf_counter() - t0)
        trainer.state.iteration += 1
        trainer.state.consumed_train_samples += trainer.args.global_batch_size
    return out


def trainer_for(argv: List[str]):
    from megatron_growloop.pretrain import build_trainer

    t = build_trainer(parse(argv))
    t.setup()
    return t


# ------------------------------------------------------------------------------------------ (a)
def item_mfu(ctx: Ctx) -> dict:
    from common import run_pretrain

    presets = ctx.size([("smollm-360m", 8), ("smollm-1.7b", 4)], [("tiny", 2)])
    seq, iters, warm = ctx.size(2048, 128), ctx.size(12, 3), ctx.size(4, 1)
    rows = []
    for preset, mbs in presets:
        argv = ["--model-preset", preset, "--seq-length", str(seq), "--max-position-embeddings", str(max(seq, 2048)),
                "--micro-batch-size", str(mbs), "--train-iters", str(iters), "--log-interval", str(iters),
                "--attention-backend", "sdpa"] + (["--bf16"] if not ctx.smoke else []) + MOCK
        if ctx.dry_run:
            parse(argv)
            rows.append({"preset": preset, "argv": argv})
            continue
        rec = run_pretrain(argv, nproc=1, timeout=600)
        steady = rec[warm:] if len(rec) > warm else rec[-1:]
        step = statistics.median(r["step_time_s"] for r in steady)
        flops = statistics.median(b["training_flops"] - a["training_flops"] for a, b in zip(rec, rec[1:]))
        tokens = rec[-1]["tokens_per_iteration"]
        rows.append({"preset": preset, "seq": seq, "micro_batch": mbs, "step_s": step, "tokens_per_s": tokens / step,
                     "tflops": flops / step / 1e12, "mfu": flops / step / PEAK_BF16,
                     "peak_mem_GiB": max(r["peak_memory_bytes"] for r in rec) / 2**30, "loss": rec[-1]["loss"]})
        ctx.log(f"mfu {rows[-1]}")
    return {"rows": rows, "peak_flops": PEAK_BF16, "target": "smollm-1.7b MFU >= 0.40"}


# ------------------------------------------------------------------------------------------ (b)
def item_loop(ctx: Ctx) -> dict:
    seq, mbs = ctx.size(2048, 64), ctx.size(4, 2)
    base = ["--model-preset", ctx.size("smollm-1.7b", "tiny"), "--seq-length", str(seq), "--max-position-embeddings",
            str(max(seq, 2048)), "--micro-batch-size", str(mbs), "--train-iters", "100", "--log-interval", "1000"] \
        + (["--bf16"] if not ctx.smoke else []) + MOCK
    looped = base + ["--num-layers", "12", "--loop", "4-4x4-4"]
    untied = base + ["--num-layers", "24"]
    if ctx.dry_run:
        parse(looped), parse(untied)
        return {"argv_looped": looped, "argv_untied": untied}
    t_loop, t_untied = trainer_for(looped), trainer_for(untied)
    for t in (t_loop, t_untied):
        timed_steps(t, ctx.size(2, 1))
    a, b = [], []
    for _ in range(ctx.size(6, 2)):  # alternate, so both see the same machine state
        a += timed_steps(t_loop, 1)
        b += timed_steps(t_untied, 1)
    ratio = statistics.median(a) / statistics.median(b)
    return {"looped_step_s": statistics.median(a), "untied_step_s": statistics.median(b), "ratio": ratio,
            "looped_all": a, "untied_all": b, "effective_depth": t_loop.unwrapped.effective_depth,
            "target": "ratio <= 1.03"}


# ------------------------------------------------------------------------------------------ (c)
def item_growth(ctx: Ctx) -> dict:
    start, block = ctx.size(16, 2), ctx.size(8, 2)
    argv = ["--model-preset", ctx.size("smollm-360m", "tiny"), "--num-layers", str(start), "--seq-length",
            str(ctx.size(2048, 64)), "--micro-batch-size", str(ctx.size(4, 2)), "--train-iters", "1000",
            "--log-interval", "1000", "--grow-method", "lidas", "--grow-block-size", str(block),
            "--grow-final-layers", str(start + block), "--grow-iters", "500"] + (["--bf16"] if not ctx.smoke else []) + MOCK
    if ctx.dry_run:
        parse(argv)
        return {"argv": argv}
    t = trainer_for(argv)
    (grower,) = t.controllers
    timed_steps(t, ctx.size(2, 1))
    before = statistics.median(timed_steps(t, ctx.size(5, 2)))
    synchronize()
    t0 = time.perf_counter()
    parts = grower.grow(t, [0])
    synchronize()
    total = time.perf_counter() - t0
    first_after = timed_steps(t, 1)[0]  # includes the rebuilt model's first-step costs
    after = statistics.median(timed_steps(t, ctx.size(5, 2)))
    return {"depth_before": start, "depth_after": start + block, "step_s_before": before, "step_s_after": after,
            "first_step_after_s": first_after, "growth_s": total, "growth_parts_s": parts,
            "growth_over_step_before": total / before, "growth_over_step_after": total / after,
            "target": "growth <= 5 step times"}


# ------------------------------------------------------------------------------------------ (d)
def item_generate(ctx: Ctx) -> dict:
    import torch

    from megatron_growloop.model.arch import Arch

    loop, new, prompt_len = "4-4x4-4", ctx.size(64, 8), 16
    arch = Arch(num_layers=12, hidden_size=ctx.size(960, 64), num_attention_heads=ctx.size(15, 4),
                num_query_groups=ctx.size(5, 2), ffn_hidden_size=ctx.size(2560, 176), kv_channels=ctx.size(64, 16),
                seq_length=2048, max_position_embeddings=2048, padded_vocab_size=49152, init_method_std=0.05,
                loop=loop)
    if ctx.dry_run:
        return {"arch": arch.to_meta(), "new_tokens": new}
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_growloop.model.generate import greedy_generate
    from megatron_growloop.model.gpt import build_inference_model
    from megatron_growloop.training.initialize import init_distributed

    init_distributed(1, 1)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0, force_reset_rng=True)
    model = build_inference_model(arch)
    dev = next(model.parameters()).device
    prompt = torch.randint(0, 49152, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(dev)
    out, times = {}, {}
    for cache in (True, False):
        greedy_generate(model, prompt, 4, use_cache=cache)  # warm-up
        synchronize()
        t0 = time.perf_counter()
        out[cache] = greedy_generate(model, prompt, new, use_cache=cache)
        synchronize()
        times[cache] = time.perf_counter() - t0
    same = bool(torch.equal(out[True], out[False]))
    diverge = None if same else int((out[True] != out[False]).nonzero()[0, 1]) - prompt_len
    return {"loop": loop, "effective_depth": model.effective_depth, "dtype": "fp32", "new_tokens": new,
            "cached_tok_per_s": new / times[True], "uncached_tok_per_s": new / times[False],
            "speedup": times[False] / times[True], "same_tokens": same, "first_divergent_new_token": diverge}


# ------------------------------------------------------------------------------------------ (e)
def item_sync(ctx: Ctx) -> dict:
    import torch

    argv = ["--model-preset", ctx.size("smollm-360m", "tiny"), "--seq-length", str(ctx.size(2048, 64)),
            "--micro-batch-size", str(ctx.size(4, 2)), "--train-iters", "100", "--log-interval", "1000"] \
        + (["--bf16"] if not ctx.smoke else []) + MOCK
    if ctx.dry_run:
        parse(argv)
        return {"argv": argv}
    t = trainer_for(argv)
    timed_steps(t, 2)
    if not torch.cuda.is_available():
        return {"status_note": "no CUDA: sync debug mode not applicable", "host_syncs": None}
    sites: Dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            timed_steps(t, 3)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        sites[key] = sites.get(key, 0) + 1
    return {"steps": 3, "host_syncs": len(syncs), "per_step": len(syncs) / 3,
            "sites": dict(sorted(sites.items(), key=lambda kv: -kv[1]))}


ITEMS: Dict[str, Callable[[Ctx], dict]] = {
    "mfu": item_mfu,
    "loop": item_loop,
    "growth": item_growth,
    "generate": item_generate,
    "sync": item_sync,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("item", choices=sorted(ITEMS))
    p.add_argument("--out", required=True, help="JSON file to write")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="build and parse the command lines only")
    mode.add_argument("--smoke", action="store_true", help="toy sizes (runs on CPU too)")
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{a.item}] {msg}", flush=True)

    ctx = Ctx(dry_run=a.dry_run, smoke=a.smoke, log=log)
    t0 = time.perf_counter()
    result = {"item": a.item, "mode": "dry-run" if a.dry_run else "smoke" if a.smoke else "full"}
    try:
        if not a.dry_run:
            from megatron_growloop import platform

            platform.setup()
        result.update(ITEMS[a.item](ctx))
        result["status"] = "dry-run" if a.dry_run else "ok"
    except Exception as exc:  # recorded, so that the other items still run
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    result["seconds"] = time.perf_counter() - t0
    if not a.dry_run:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str))
    log(f"{result['status']} in {result['seconds']:.1f}s -> {a.out}")
    return 0 if result["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
