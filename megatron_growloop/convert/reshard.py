"""Re-save a training checkpoint as written by another TP/PP layout (model + optimizer).

    torchrun --nproc_per_node 4 -m megatron_growloop.convert reshard --load CK --out CK2 \\
        --target-tensor-parallel-size 2 --target-pipeline-model-parallel-size 2

torch_dist checkpoints already load at any TP/PP (megatron reshards on load) when the
distributed optimizer's state is in model space (``--dist-ckpt-optim-fully-reshardable``;
the default ``dp_reshardable`` state loads only at the TP/PP it was written with).  This
command makes the re-partitioning explicit: the target ranks build the model and optimizer
at the target layout (:func:`~megatron_growloop.training.factory.build_stack`), load model,
optimizer state and counters through megatron's ``dist_checkpointing`` and save them again,
the optimizer ``fully_reshardable``.  The LR-scheduler state, the counters and
``growloop.json`` are carried over unchanged (only ``parallel`` changes); the per-rank
RNG state cannot be re-partitioned and is the target ranks' freshly seeded one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict

import torch.distributed as dist
from megatron.core import dist_checkpointing

from ..errors import UsageError
from ..model.arch import Arch
from ..model.implementation import Implementation
from ..model.parallel import ParallelLayout
from ..training import checkpointing
from ..training.factory import OptimizerSettings, build_stack
from ..training.initialize import init_distributed
from .hf_io import check_new_output


class _FrozenScheduler:
    """Saves a scheduler state dict verbatim."""

    def __init__(self, state: Dict[str, Any]):
        self._state = state

    def state_dict(self) -> Dict[str, Any]:
        return self._state


def _saved_dtype(ckpt_dir: str) -> str:
    """``fp32``/``bf16``/``fp16``: the precision the checkpoint's weights were trained in."""
    meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    emb = meta.get("embedding.word_embeddings.weight")
    name = str(getattr(emb, "dtype", "")).replace("torch.", "")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(name, "fp32")


def reshard(
    load: str,
    out: str,
    target_tensor_parallel_size: int = 1,
    target_pipeline_model_parallel_size: int = 1,
    use_distributed_optimizer: bool = False,
) -> str:
    """Run under ``torchrun`` with a world size divisible by TP x PP; returns the new ``iter_*`` dir."""
    tp, pp = int(target_tensor_parallel_size), int(target_pipeline_model_parallel_size)
    meta = checkpointing.read_metadata(load)
    ckpt_dir = meta["_dir"]
    if not meta.get("arch"):
        raise UsageError(f"checkpoint {ckpt_dir!r} has no architecture record (arch) in growloop.json")
    arch = Arch.from_meta(meta["arch"])
    arch.check_parallel(tp, pp, what="target")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise UsageError(
            f"reshard to TP {tp} x PP {pp} needs a world size divisible by {tp * pp} (torchrun --nproc_per_node "
            f"{tp * pp} -m megatron_growloop.convert reshard ...); this run has {world} process(es)"
        )
    out_path = check_new_output(out)
    iteration = int(meta.get("iteration", 0))
    init_distributed(tp, pp)
    has_opt = bool(meta.get("has_optimizer", False))
    stack = build_stack(arch, ParallelLayout(tp, pp), Implementation(dtype=_saved_dtype(ckpt_dir)),
                        OptimizerSettings(use_distributed_optimizer=use_distributed_optimizer))
    loaded = checkpointing.load_checkpoint(ckpt_dir, stack.chunks, stack.optimizer, load_rng=False)
    if not loaded["loaded_optimizer"]:
        stack.optimizer.reload_model_params()

    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    sched = common.get("opt_param_scheduler") if has_opt else None
    keep = {k: v for k, v in meta.items() if not k.startswith("_")}
    for k in ("format_version", "iteration", "parallel", "has_optimizer", "optimizer_sharding"):
        keep.pop(k, None)
    keep["resharded_from"] = {"dir": str(Path(ckpt_dir).resolve()), "parallel": meta.get("parallel")}

    rank0 = dist.get_rank() == 0
    tmp = out_path.parent / f".{out_path.name}.tmp-reshard"
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        checkpointing.save_checkpoint(
            str(tmp), iteration, stack.chunks,
            stack.optimizer if has_opt else None,
            _FrozenScheduler(sched) if sched is not None else None,
            common=common.get("growloop") or {},
            metadata=keep,
            optimizer_format="fully_reshardable",  # the re-partitioned checkpoint loads at any layout
        )
        if rank0:
            tok = Path(ckpt_dir) / "tokenizer"
            if tok.is_dir():
                shutil.copytree(tok, tmp / checkpointing.iter_dir_name(iteration) / "tokenizer")
                # Point the copied metadata at the copied tokenizer.
                meta_path = tmp / checkpointing.iter_dir_name(iteration) / checkpointing.META_NAME
                m = json.loads(meta_path.read_text())
                if (m.get("tokenizer") or {}).get("model") and Path(m["tokenizer"]["model"]).name == "tokenizer":
                    m["tokenizer"]["model"] = str(out_path.resolve() / checkpointing.iter_dir_name(iteration) / "tokenizer")
                    meta_path.write_text(json.dumps(m, indent=2, sort_keys=True, default=str))
            if out_path.exists():
                out_path.rmdir()
            os.replace(tmp, out_path)
    except BaseException:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return str(out_path / checkpointing.iter_dir_name(iteration))
