"""The measurements of ``benchmarks/gpu_check.sh``, one function per item (issue 13).

    python benchmarks/gpu_items.py ITEM --out FILE.json [--dry-run | --smoke]

Items (``ITEMS``; add one by writing ``item_<name>(ctx) -> dict`` and registering it):

* ``mfu``      (a) bf16 training throughput and MFU of ``smollm-360m`` and ``smollm-1.7b`` at sequence
               2048 on the SDPA path (peak 989 TFLOP/s dense bf16, H100/H200);
* ``loop``     (b) ``Loop(4-4x4-4)`` against the untied 24-layer model at 1.7B width: step-time ratio;
* ``growth``   (c) a LIDAS growth step against a training step;
* ``generate`` (d) cached against uncached greedy generation of a looped model (same tokens?);
* ``sync``     (e) ``torch.cuda.set_sync_debug_mode("warn")`` over 3 training steps: host syncs.

(f) the GPU-only checks of issue 12 and the planner's peak check (issue 17); each has a ``pass``
verdict and states its criterion:

* ``cudagraph`` (f1) ``--cuda-graph-impl local`` (megatron-core's own CUDA graphs, captured by its
                schedules after ``--cuda-graph-warmup-steps``) on the local spec, bf16: the losses
                equal the eager run's within relative 1e-3 (graphs replay the eager kernels, so
                bitwise equality is expected and reported); a refusal is recorded as its one line.
                The eager run's output also gives (f4): the start-up line names ``impl local,
                attention sdpa, bf16`` and, on the GPU, the Transformer Engine fallback warning;
* ``resume``    (f2) a distributed checkpoint saved on the GPU (``--use-distributed-optimizer``,
                the default ``dp_reshardable`` optimizer format) resumes exactly: the losses after
                resuming from iteration 2 equal the uninterrupted run's (bitwise);
* ``fusions``   (f3) megatron-core's ``torch.compile``-built bias-SwiGLU and bias-dropout-add fusions
                are on by default on CUDA, and the losses equal the ``--no-bias-swiglu-fusion
                --no-bias-dropout-fusion`` run's within relative 1e-2 (bf16 rounding);
* ``plan``      (f5) ``python -m megatron_growloop.plan.gpu_check <the mfu item's flags>``: the
                planner's predicted peak against ``max_memory_allocated`` of the ``mfu`` item's runs
                (ratio measured/predicted; it reads ``mfu.json`` beside its own output).

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
def mfu_runs(ctx: Ctx) -> List[tuple]:
    """(preset, micro batch, pretrain argv) of the ``mfu`` item's runs (the ``plan`` item plans them)."""
    presets = ctx.size([("smollm-360m", 8), ("smollm-1.7b", 4)], [("tiny", 2)])
    seq, iters = ctx.size(2048, 128), ctx.size(12, 3)
    return [(preset, mbs, ["--model-preset", preset, "--seq-length", str(seq), "--max-position-embeddings",
                           str(max(seq, 2048)), "--micro-batch-size", str(mbs), "--train-iters", str(iters),
                           "--log-interval", str(iters), "--attention-backend", "sdpa"]
             + (["--bf16"] if not ctx.smoke else []) + MOCK) for preset, mbs in presets]


def item_mfu(ctx: Ctx) -> dict:
    from common import run_pretrain

    seq, warm = ctx.size(2048, 128), ctx.size(4, 1)
    rows = []
    for preset, mbs, argv in mfu_runs(ctx):
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
                     "peak_mem_GiB": max(r["peak_memory_bytes"] for r in rec) / 2**30, "loss": rec[-1]["loss"],
                     "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rec), "argv": argv})
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


# ------------------------------------------------------------------------------------------ (f)
def run_pretrain_logged(argv: List[str], timeout: int = 300):
    """One ``pretrain`` process: (records of ``--metrics-file``, its output, exit status)."""
    import subprocess

    from common import env

    with tempfile.TemporaryDirectory() as d:
        metrics = Path(d) / "m.jsonl"
        proc = subprocess.run([sys.executable, "-m", "megatron_growloop.pretrain"] + argv + ["--metrics-file", str(metrics)],
                              env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.exists() else []
    return records, proc.stdout + proc.stderr, proc.returncode


def last_error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def rel_diff(a: List[float], b: List[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)) if a and len(a) == len(b) else float("inf")


def small_bf16(ctx: Ctx, iters: int) -> List[str]:
    """A small bf16 run on the SDPA path (bf16 on CPU too, so --smoke takes the same code path)."""
    return ["--model-preset", ctx.size("smollm-135m", "tiny"), "--seq-length", str(ctx.size(1024, 64)),
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", str(iters), "--log-interval", "1",
            "--seed", "7", "--bf16", "--attention-backend", "sdpa"] + MOCK


def item_cudagraph(ctx: Ctx) -> dict:
    """(f1) --cuda-graph-impl local against eager; (f4) the eager run's start-up line."""
    from megatron_growloop.errors import UsageError

    eager = small_bf16(ctx, 6)
    graphs = eager + ["--cuda-graph-impl", "local", "--cuda-graph-warmup-steps", "2"]
    criterion = "losses equal the eager run's within relative 1e-3 (bitwise expected)"
    if ctx.dry_run:
        parse(eager)
        try:
            parse(graphs)
        except UsageError as exc:  # on a machine without CUDA: refused in one line
            if ctx.cuda or "needs a GPU" not in str(exc):
                raise
        return {"argv_eager": eager, "argv_graphs": graphs, "criterion": criterion}
    ref, out_eager, rc = run_pretrain_logged(eager)
    if rc != 0:
        raise RuntimeError(f"eager run failed: {out_eager[-3000:]}")
    startup = next((line for line in out_eager.splitlines() if line.startswith("model:")), "")
    want = ["impl local, attention sdpa, bf16"]
    warning_te = "warning: Transformer Engine is not importable: the local layer spec runs"
    startup_pass = all(w in startup for w in want) and (warning_te in out_eager or not ctx.cuda)
    got, out_graphs, rc = run_pretrain_logged(graphs)
    result = {"criterion": criterion, "eager_losses": [r["loss"] for r in ref],
              "startup": {"line": startup, "te_fallback_warning": warning_te in out_eager, "pass": startup_pass,
                          "criterion": f"names {want[0]!r}" + (" and warns of the TE fallback" if ctx.cuda else "")}}
    if rc != 0:
        refusal = last_error_line(out_graphs)
        result["refused"] = refusal
        result["pass"] = (not ctx.cuda) and "needs a GPU" in refusal  # refused on CPU is right; on a GPU it is the finding
        return result
    losses = [r["loss"] for r in got]
    diff = rel_diff(losses, result["eager_losses"])
    result.update(graph_losses=losses, max_rel_diff=diff, bitwise=losses == result["eager_losses"],
                  step_s_eager=statistics.median(r["step_time_s"] for r in ref[3:] or ref),
                  step_s_graphs=statistics.median(r["step_time_s"] for r in got[3:] or got))
    result["pass"] = diff <= 1e-3
    return result


def item_resume(ctx: Ctx) -> dict:
    """(f2) dp_reshardable distributed-optimizer checkpoint saved at iteration 2 resumes exactly."""
    base = small_bf16(ctx, 4) + ["--use-distributed-optimizer"]
    criterion = "losses of iterations 3-4 after resuming from iteration 2 equal the uninterrupted run's (bitwise)"
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "ck"
        straight = base + ["--save", str(ck), "--save-interval", "2"]
        resumed = base + ["--load", str(ck / "iter_0000002")]
        if ctx.dry_run:
            parse(straight), parse(base)
            return {"argv_straight": straight, "argv_resumed": resumed, "criterion": criterion}
        ref, out, rc = run_pretrain_logged(straight)
        if rc != 0:
            raise RuntimeError(f"uninterrupted run failed: {out[-3000:]}")
        meta = ck / "iter_0000002" / "growloop.json"
        fmt = json.loads(meta.read_text()).get("optimizer_sharding") if meta.exists() else None
        got, out, rc = run_pretrain_logged(resumed)
        if rc != 0:
            raise RuntimeError(f"resumed run failed: {out[-3000:]}")
    want = [r["loss"] for r in ref][2:]
    losses = [r["loss"] for r in got]
    return {"criterion": criterion, "straight_losses": [r["loss"] for r in ref], "resumed_losses": losses,
            "optimizer_format": fmt, "max_rel_diff": rel_diff(losses, want), "pass": losses == want}


def item_fusions(ctx: Ctx) -> dict:
    """(f3) megatron-core's compiled SwiGLU and bias-dropout-add: on by default with CUDA, equal to unfused."""
    import torch

    default = small_bf16(ctx, 5)
    unfused = default + ["--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"]
    criterion = "on by default with CUDA; losses equal the unfused run's within relative 1e-2 (bf16)"
    if ctx.dry_run:
        parse(default), parse(unfused)
        return {"argv_default": default, "argv_unfused": unfused, "criterion": criterion}
    out = {}
    for name, argv in (("default", default), ("unfused", unfused)):
        t = trainer_for(argv)
        cfg = t.config
        losses = [float(t.train_step()["loss"]) for _ in range(5)]
        out[name] = {"bias_activation_fusion": bool(cfg.bias_activation_fusion),
                     "bias_dropout_fusion": bool(cfg.bias_dropout_fusion), "losses": losses}
        del t
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    on = out["default"]["bias_activation_fusion"] and out["default"]["bias_dropout_fusion"]
    off = not (out["unfused"]["bias_activation_fusion"] or out["unfused"]["bias_dropout_fusion"])
    diff = rel_diff(out["default"]["losses"], out["unfused"]["losses"])
    return {"criterion": criterion, **out, "fused_by_default": on, "max_rel_diff": diff,
            "pass": (on or not ctx.cuda) and off and diff <= 1e-2}


def item_plan(ctx: Ctx, results_dir: Path) -> dict:
    """(f5) the planner's predicted peak against max_memory_allocated of the mfu item's runs."""
    from megatron_growloop.plan.gpu_check import compare, predicted_peak

    if ctx.dry_run:
        rows = []
        for preset, _, argv in mfu_runs(ctx):
            p = predicted_peak(argv)
            rows.append({"preset": preset, "predicted_peak_bytes": p["predicted_peak_bytes"], "plan_line": p["plan_line"]})
        return {"rows": rows}
    mfu = results_dir / "mfu.json"
    if not mfu.exists():
        raise RuntimeError(f"{mfu} is missing: the plan item compares with the mfu item's runs (run mfu first)")
    rows = []
    for row in json.loads(mfu.read_text()).get("rows", []):
        if "argv" not in row or "peak_memory_bytes" not in row:
            continue
        p = predicted_peak(row["argv"])
        rows.append({"preset": row["preset"], **compare(p, row["peak_memory_bytes"]), "predicted": p["predicted"],
                     "plan_line": p["plan_line"]})
    if not rows:
        raise RuntimeError("the mfu item recorded no runs")
    return {"rows": rows, "criterion": "ratio measured/predicted within [0.9, 1.15] on a GPU (a little above 1 expected: "
                                        "allocator rounding, cuBLAS workspace); on CPU the measurement is the "
                                        "process RSS and the ratio means nothing",
            "pass": all(0.9 <= r["ratio"] <= 1.15 for r in rows) if ctx.cuda else None}


ITEMS: Dict[str, Callable[..., dict]] = {
    "mfu": item_mfu,
    "loop": item_loop,
    "growth": item_growth,
    "generate": item_generate,
    "sync": item_sync,
    "cudagraph": item_cudagraph,
    "resume": item_resume,
    "fusions": item_fusions,
    "plan": item_plan,
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
        fn = ITEMS[a.item]
        result.update(fn(ctx, Path(a.out).parent) if fn is item_plan else fn(ctx))
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
