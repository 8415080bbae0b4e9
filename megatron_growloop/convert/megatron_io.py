"""The megatron side: a one-process group, building the TP=1/PP=1 model, reading
model tensors of a distributed checkpoint without building a model."""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import UsageError
from ..model.arch import Arch
from ..model.gpt import GrowLoopGPTModel, build_inference_model
from ..training import ckpt_validate
from ..training.checkpointing import resolve_load_dir
from ..training.initialize import init_distributed

MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def ensure_single_process() -> None:
    """A one-rank process group with TP=PP=1 (created when absent).

    Conversion builds the whole model in one process and lets megatron reshard on
    load; it refuses to run inside a multi-rank job."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise UsageError(
            "checkpoint conversion runs in a single process (python -m megatron_growloop.convert ...), not under torchrun"
        )
    if (
        not parallel_state.model_parallel_is_initialized()
        or parallel_state.get_tensor_model_parallel_world_size() != 1
        or parallel_state.get_pipeline_model_parallel_world_size() != 1
    ):
        init_distributed(1, 1)


def build_single_rank_model(arch: Arch) -> GrowLoopGPTModel:
    """The whole model (TP=PP=1, fp32, local spec, on the CPU) with *uninitialised*
    weights: every parameter is overwritten by the converter."""
    return build_inference_model(arch, initialize=False, to_device=False)


def load_model_tensors(ckpt_dir: str) -> Dict[str, torch.Tensor]:
    """Every model tensor of a torch_dist checkpoint as one global tensor, in the
    distributed-checkpoint naming (layers stacked; see :mod:`.mapping`).

    Independent of the TP/PP the checkpoint was saved with and of the layer spec;
    optimizer state is not read.  ``ckpt_dir``: a save directory or one ``iter_*`` directory."""
    ckpt_dir = str(resolve_load_dir(ckpt_dir)[0])
    ensure_single_process()
    try:
        meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
        request = {k: v for k, v in meta.items() if k.startswith(MODEL_KEY_PREFIXES)}
        if not request:
            raise UsageError(f"checkpoint {ckpt_dir!r} holds no model tensors")
        loaded = ckpt_validate.checked_load(request, ckpt_dir, what="model tensors of",
                                            validate_access_integrity=False)
    except UsageError:
        raise
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - torch DCP raises many kinds
        raise UsageError(f"cannot read model tensors of {ckpt_dir!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
