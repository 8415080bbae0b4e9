"""From command-line arguments to megatron-core's ``TransformerConfig``.

:class:`GrowLoopConfig` is ``TransformerConfig`` plus the loop description.
``num_layers`` always counts unique layers; ``loop`` (``"e-LxK-d"``) and
``repeat_blocks`` (``("S:E:R", ...)``) define the order of layer applications.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from ..errors import UsageError
from ..looping.spec import (
    LoopSpec,
    RepeatBlock,
    balanced_stage_sizes,
    build_schedule,
    layout_from_stage_sizes,
)

# Architecture fields a checkpoint records so that a model can be rebuilt from it.
ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "kv_channels",
    "seq_length",
    "max_position_embeddings",
    "rotary_base",
    "rope_scaling",
    "rope_scaling_factor",
    "norm_epsilon",
    "init_method_std",
    "untie_embeddings_and_output_weights",
    "padded_vocab_size",
    "loop",
)


@dataclass
class GrowLoopConfig(TransformerConfig):
    """``TransformerConfig`` with the schedule of layer applications."""

    loop: Optional[str] = None
    """Loop spec ``LxK`` or ``e-LxK-d`` over the unique layers, or None for a plain model."""

    repeat_blocks: Tuple[str, ...] = field(default_factory=tuple)
    """Inference-time repetitions ``S:E:R`` applied on top of the loop (effective positions)."""

    def loop_spec(self) -> Optional[LoopSpec]:
        return LoopSpec.parse(self.loop) if self.loop else None

    def repeat_block_specs(self) -> List[RepeatBlock]:
        return [RepeatBlock.parse(b) for b in self.repeat_blocks]

    def schedule(self) -> List[int]:
        return build_schedule(self.num_layers, self.loop_spec(), self.repeat_block_specs())

    @property
    def effective_depth(self) -> int:
        return len(self.schedule())


def stage_sizes_for(args, num_layers: int, loop: Optional[str]) -> Optional[List[int]]:
    """Unique layers per pipeline stage (None when PP=1)."""
    pp = args.pipeline_model_parallel_size
    if pp == 1:
        return None
    if getattr(args, "pipeline_model_parallel_layout", None):
        from ..looping.spec import stage_sizes_from_layout

        sizes = stage_sizes_from_layout(args.pipeline_model_parallel_layout, pp)
        if sum(sizes) != num_layers:
            raise UsageError(
                f"--pipeline-model-parallel-layout {args.pipeline_model_parallel_layout!r} places "
                f"{sum(sizes)} layers but the model has {num_layers}"
            )
        return sizes
    # balance layer applications, repeat blocks (inference) included, never cutting a block
    blocks = [RepeatBlock.parse(b) for b in (getattr(args, "repeat_block", None) or ())]
    schedule = build_schedule(num_layers, LoopSpec.parse(loop) if loop else None, blocks)
    return balanced_stage_sizes(schedule, num_layers, pp)


def _params_dtype(args) -> torch.dtype:
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return torch.float32


def build_transformer_config(
    args,
    num_layers: Optional[int] = None,
    loop: Optional[str] = "__args__",
    stage_sizes: Optional[Sequence[int]] = "__auto__",
) -> GrowLoopConfig:
    """The megatron-core config for the architecture and parallel layout in ``args``.

    ``num_layers``/``loop``/``stage_sizes`` override the values from ``args`` (growth
    rebuilds the model at a new depth with a new pipeline layout).
    """
    from ..platform import has_cuda

    num_layers = args.num_layers if num_layers is None else num_layers
    loop = getattr(args, "loop", None) if loop == "__args__" else loop
    if stage_sizes == "__auto__":
        stage_sizes = stage_sizes_for(args, num_layers, loop)
    dtype = _params_dtype(args)
    kw = dict(
        num_layers=num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=bool(getattr(args, "sequence_parallel", False)),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not has_cuda(),
        perform_initialization=True,
        calculate_per_token_loss=True,
        recompute_granularity=getattr(args, "recompute_granularity", None),
        recompute_method=getattr(args, "recompute_method", None)
        if getattr(args, "recompute_granularity", None) == "full"
        else None,
        recompute_num_layers=getattr(args, "recompute_num_layers", None)
        if getattr(args, "recompute_granularity", None) == "full"
        else None,
        loop=loop,
        repeat_blocks=tuple(getattr(args, "repeat_block", None) or ()),
    )
    if stage_sizes is not None:
        kw["pipeline_model_parallel_layout"] = layout_from_stage_sizes(stage_sizes)
    impl = getattr(args, "transformer_impl", "local")
    if impl == "transformer_engine":
        from megatron.core.transformer.enums import AttnBackend

        kw["attention_backend"] = AttnBackend[getattr(args, "attention_backend", "auto")]
        if getattr(args, "fp8_format", None):
            kw["fp8"] = args.fp8_format
            kw["fp8_recipe"] = getattr(args, "fp8_recipe", "delayed")
    else:
        from megatron.core.transformer.enums import AttnBackend

        kw["attention_backend"] = AttnBackend.local
    if getattr(args, "cuda_graph_impl", "none") not in (None, "none"):
        kw["cuda_graph_impl"] = args.cuda_graph_impl
    try:
        return GrowLoopConfig(**kw)
    except (AssertionError, ValueError) as exc:
        raise UsageError(f"invalid model configuration: {exc}") from None


def config_replace(config: GrowLoopConfig, **changes) -> GrowLoopConfig:
    """``dataclasses.replace`` that re-runs megatron's validation."""
    return dataclasses.replace(config, **changes)
