"""Shared helpers of the planner tests: architectures of the presets and megatron-core builds."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_growloop.model.arch import Arch, pad_vocab_size
from megatron_growloop.model.gpt import build_model
from megatron_growloop.model.implementation import Implementation
from megatron_growloop.model.parallel import ParallelLayout
from megatron_growloop.model.presets import get_preset


def preset_arch(name: str, tp: int = 1, vocab: int = None, **changes) -> Arch:
    """The architecture ``pretrain --model-preset NAME`` builds (vocabulary: the preset's, padded for TP)."""
    p = get_preset(name)
    args = SimpleNamespace(
        num_layers=p.num_layers, hidden_size=p.hidden_size, num_attention_heads=p.num_attention_heads,
        num_query_groups=p.num_query_groups, ffn_hidden_size=p.ffn_hidden_size, kv_channels=p.kv_channels,
        seq_length=p.seq_length, max_position_embeddings=p.max_position_embeddings, rotary_base=p.rotary_base,
        rope_scaling=p.rope_scaling, rope_scaling_factor=p.rope_scaling_factor, norm_epsilon=p.norm_epsilon,
        init_method_std=p.init_method_std, untie_embeddings_and_output_weights=not p.tie_embeddings,
        make_vocab_size_divisible_by=128, loop=None,
    )
    for k, v in changes.items():
        setattr(args, k, v)
    return Arch.from_args(args, pad_vocab_size(vocab or p.vocab_size, 128, tp))


def build(arch: Arch, tp: int = 1, pp: int = 1, meta: bool = False, sequence_parallel: bool = False,
          bf16: bool = False, **recompute):
    """``(model, config)``: this rank's megatron-core model of ``arch`` (the project's builder, local
    spec), optionally on the meta device (nothing allocated)."""
    impl = Implementation(transformer_impl="local", dtype="bf16" if bf16 else "fp32", **recompute)
    layout = ParallelLayout(tp=tp, pp=pp, sequence_parallel=sequence_parallel)
    if meta:
        with torch.device("meta"):
            model = build_model(arch, layout, impl, initialize=False, to_device=False)
    else:
        model = build_model(arch, layout, impl)
    return model, model.config
