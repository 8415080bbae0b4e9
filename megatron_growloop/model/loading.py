"""Load a trained checkpoint as a model for inference, evaluation and analysis.

>>> from megatron_growloop.model.loading import load_model
>>> model, meta, tokenizer = load_model("runs/lidas", loop_repeats=None, repeat_blocks=["8:12:2"])

Works in a plain Python process (a one-process gloo/nccl group is created) and
under ``torchrun`` at any TP/PP (initialise with
:func:`megatron_growloop.training.initialize.init_distributed` first; the
checkpoint is resharded on load).  Logits come back gathered over TP.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from megatron.core import dist_checkpointing, parallel_state

from .. import platform
from ..errors import UsageError
from ..looping.spec import LoopSpec, RepeatBlock
from .config import build_transformer_config
from .gpt import GrowLoopGPTModel, build_model


def arch_namespace(arch: Dict[str, Any], tp: int, pp: int, transformer_impl: str = "local", **extra) -> SimpleNamespace:
    """An args-like namespace for :func:`build_transformer_config` from checkpoint metadata."""
    ns = SimpleNamespace(
        num_layers=arch["num_layers"],
        hidden_size=arch["hidden_size"],
        num_attention_heads=arch["num_attention_heads"],
        num_query_groups=arch["num_query_groups"],
        ffn_hidden_size=arch["ffn_hidden_size"],
        kv_channels=arch["kv_channels"],
        seq_length=arch["seq_length"],
        max_position_embeddings=arch["max_position_embeddings"],
        rotary_base=arch["rotary_base"],
        rope_scaling=arch.get("rope_scaling", False),
        rope_scaling_factor=arch.get("rope_scaling_factor", 8.0),
        norm_epsilon=arch["norm_epsilon"],
        init_method_std=arch.get("init_method_std", 0.02),
        untie_embeddings_and_output_weights=arch.get("untie_embeddings_and_output_weights", False),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        transformer_impl=transformer_impl,
        loop=arch.get("loop"),
        repeat_block=(),
        bf16=False,
        fp16=False,
    )
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns


def build_inference_model(
    arch: Dict[str, Any],
    loop: Optional[str] = None,
    repeat_blocks: Sequence[str] = (),
    transformer_impl: str = "local",
    bf16: bool = False,
    parallel_output: bool = False,
    stage_sizes="__auto__",
    initialize: bool = True,
    to_device: bool = True,
) -> GrowLoopGPTModel:
    """Build this rank's part of the model described by ``arch``, in eval mode.

    Weights are randomly initialised (``initialize=False`` skips that when every parameter
    is overwritten next, as in conversion); ``to_device`` moves the model to the GPU when
    there is one."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if arch["num_attention_heads"] % tp:
        raise UsageError(f"TP size {tp} does not divide the model's {arch['num_attention_heads']} attention heads")
    if arch["padded_vocab_size"] % tp:
        raise UsageError(f"TP size {tp} does not divide the model's padded vocabulary {arch['padded_vocab_size']}")
    ns = arch_namespace(arch, tp, pp, transformer_impl, bf16=bf16)
    ns.loop = loop
    ns.repeat_block = tuple(repeat_blocks)
    config = build_transformer_config(ns, stage_sizes=stage_sizes)
    config.perform_initialization = initialize
    model = build_model(
        config,
        vocab_size=arch["padded_vocab_size"],
        max_sequence_length=arch["max_position_embeddings"],
        rotary_base=arch["rotary_base"],
        share_embeddings_and_output_weights=not arch.get("untie_embeddings_and_output_weights", False),
        transformer_impl=transformer_impl,
        rope_scaling=bool(arch.get("rope_scaling", False)),
        rope_scaling_factor=float(arch.get("rope_scaling_factor", 8.0)),
        parallel_output=parallel_output,
    )
    if to_device and platform.has_cuda():
        model.cuda(torch.cuda.current_device())
    model.eval()
    return model


def load_model(
    ckpt: str,
    loop_repeats: Optional[int] = None,
    repeat_blocks: Sequence[str] = (),
    transformer_impl: str = "local",
    bf16: bool = False,
    tokenizer: bool = True,
) -> Tuple[GrowLoopGPTModel, Dict[str, Any], Any]:
    """``(model, metadata, tokenizer)`` for a checkpoint directory (a ``--save`` dir or ``iter_*``).

    ``loop_repeats`` changes k of a looped model; ``repeat_blocks`` (``"S:E:R"``) repeats
    blocks of the effective-depth axis of any model.
    """
    from ..training import checkpointing
    from ..training.initialize import init_distributed

    if not parallel_state.model_parallel_is_initialized():
        init_distributed(1, 1)
    meta = checkpointing.read_metadata(ckpt)
    arch = meta["arch"]
    loop = arch.get("loop")
    if loop_repeats is not None:
        if not loop:
            raise UsageError(f"--loop-repeats {loop_repeats}: checkpoint {ckpt!r} has no loop (use --repeat-block)")
        loop = str(LoopSpec.parse(loop).with_repeats(int(loop_repeats)))
    blocks = [str(RepeatBlock.parse(b)) for b in repeat_blocks]
    model = build_inference_model(arch, loop, blocks, transformer_impl, bf16)
    sd = model.sharded_state_dict()
    try:
        loaded = dist_checkpointing.load({"model": sd}, meta["_dir"])
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot load model weights from {meta['_dir']!r}: {type(exc).__name__}: {exc}") from None
    model.load_state_dict(loaded["model"], strict=True)
    tok = None
    if tokenizer and meta.get("tokenizer"):
        from ..data.tokenizer import build_tokenizer

        tok_type, tok_model = checkpointing.tokenizer_source(meta)
        if tok_type:
            tok = build_tokenizer(tok_type, tok_model)
    return model, meta, tok
