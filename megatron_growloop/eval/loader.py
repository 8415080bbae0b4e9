"""Loading models for evaluation (checkpoints or Hugging Face directories) and
describing their block structure for results and plots."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch.distributed as dist
from megatron.core import parallel_state

from ..convert import hf_to_mcore
from ..errors import UsageError
from ..looping.spec import RepeatBlock, block_boundaries
from ..model.implementation import Implementation
from ..paths import cache_dir
from ..training.inference import load_model
from ..training.initialize import init_distributed


def init_parallel(tp: int = 1, pp: int = 1) -> None:
    """Start the process group (plain process or torchrun) with TP x PP model parallelism."""


    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or pp < 1:
        raise UsageError(f"tensor/pipeline parallel sizes must be >= 1, got TP={tp} PP={pp}")
    if world % (tp * pp):
        raise UsageError(f"world size {world} is not divisible by TP x PP = {tp}x{pp}")
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() == tp
                and parallel_state.get_pipeline_model_parallel_world_size() == pp):
            return
    init_distributed(tp, pp)


def hf_checkpoint(hf_dir: str) -> str:
    """A megatron checkpoint converted from the Hugging Face directory ``hf_dir`` (cached).

    Uses :func:`megatron_growloop.convert.hf_to_mcore`; the conversion is keyed by the
    directory's path and its files' sizes and modification times, and reused afterwards.
    Conversion runs in a single process: inside a multi-rank job it runs in a child
    process.
    """
    src = Path(hf_dir)
    if not src.is_dir() or not (src / "config.json").exists():
        raise UsageError(f"--hf {hf_dir!r} is not a Hugging Face model directory (no config.json)")
    stamp = "|".join(f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in sorted(src.iterdir()) if p.is_file())
    key = hashlib.md5(f"{src.resolve()}|{stamp}".encode()).hexdigest()[:16]
    out = cache_dir() / "eval_hf" / key
    if (out / "latest_checkpointed_iteration.txt").exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    try:
        if dist.is_initialized() and dist.get_world_size() > 1:
            code = "import sys; from megatron_growloop.convert import hf_to_mcore; hf_to_mcore(sys.argv[1], sys.argv[2])"
            proc = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True)
            if proc.returncode != 0 and not (out / "latest_checkpointed_iteration.txt").exists():
                last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
                raise UsageError(f"converting --hf {hf_dir!r} failed: {last}")
        else:
            hf_to_mcore(str(src), str(out))
    except UsageError:
        if not (out / "latest_checkpointed_iteration.txt").exists():  # not just lost a race
            raise
    return str(out)


def load_for_eval(
    load: Optional[str] = None,
    hf: Optional[str] = None,
    loop_repeats: Optional[int] = None,
    repeat_blocks: Sequence[str] = (),
    tp: int = 1,
    pp: int = 1,
    transformer_impl: str = "local",
    bf16: bool = False,
):
    """``(model, metadata, tokenizer)`` of a checkpoint (``load``) or HF directory (``hf``)."""
    if bool(load) == bool(hf):
        raise UsageError("give exactly one of --load CHECKPOINT or --hf HF_DIR")
    for b in repeat_blocks:
        RepeatBlock.parse(b, what="--repeat-block")
    if hf and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        ckpt = hf_checkpoint(hf)  # converts in this process before the parallel state is set up
        init_parallel(tp, pp)
    else:
        init_parallel(tp, pp)
        ckpt = load if load else _hf_checkpoint_on_all_ranks(hf)
    impl = Implementation(transformer_impl=transformer_impl, dtype="bf16" if bf16 else "fp32")
    model, meta, tok = load_model(ckpt, loop_repeats=loop_repeats, repeat_blocks=list(repeat_blocks), impl=impl)
    if tok is None:
        raise UsageError(f"checkpoint {ckpt!r} records no tokenizer; cannot evaluate text tasks")
    meta = dict(meta)
    meta["_source"] = {"load": load, "hf": hf}
    return model, meta, tok


def _hf_checkpoint_on_all_ranks(hf: str) -> str:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [None]
        if dist.get_rank() == 0:
            try:
                box[0] = ("ok", hf_checkpoint(hf))
            except UsageError as exc:
                box[0] = ("error", str(exc))
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise UsageError(value)
        return value
    return hf_checkpoint(hf)


def describe_model(model, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a result file records about the evaluated model: schedule and block structure.

    ``boundaries`` are effective-depth positions where a loop / repeated block
    application starts or ends; ``grown_boundaries`` where the growth lineage changes
    (layers created by different growth steps).
    """
    meta = meta or {}
    cfg = model.config
    loop, reps = cfg.loop, list(cfg.repeat_blocks)
    info: Dict[str, Any] = {
        "num_layers": cfg.num_layers,
        "loop": str(loop) if loop else None,
        "repeat_blocks": [str(b) for b in reps],
        "schedule": list(model.schedule),
        "effective_depth": model.effective_depth,
        "boundaries": block_boundaries(cfg.num_layers, loop, reps),
        "source": meta.get("_source"),
        "checkpoint": meta.get("_dir"),
        "iteration": meta.get("iteration"),
    }
    growth = meta.get("growth") or None
    lineage = meta.get("lineage") or []
    if growth:
        info["growth"] = {k: growth.get(k) for k in ("method", "block_size", "start_depth", "final_depth")}
    if lineage and len(lineage) == cfg.num_layers:
        born = [int(l.get("born", 0)) for l in lineage]
        info["lineage_born"] = born
        info["grown_boundaries"] = [i for i in range(1, len(born)) if born[i] != born[i - 1]]
    return info


def model_label(info: Dict[str, Any]) -> str:
    parts = []
    if info.get("loop"):
        parts.append(f"Loop({info['loop']})")
    if info.get("growth") and info["growth"].get("method"):
        parts.append(f"{info['growth']['method'].upper()} B={info['growth'].get('block_size')}")
    if info.get("repeat_blocks"):
        parts.append("repeat " + ",".join(info["repeat_blocks"]))
    parts.append(f"{info['num_layers']} layers, effective depth {info['effective_depth']}")
    return ", ".join(parts)
