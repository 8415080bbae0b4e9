"""From the architecture record to megatron-core's ``TransformerConfig``.

:class:`GrowLoopConfig` is ``TransformerConfig`` plus the order of layer applications:
``num_layers`` counts unique layers; ``loop`` and ``repeat_blocks`` (inference-time
repetition) define the schedule.  :func:`build_transformer_config` is the one
translation of (:class:`~.arch.Arch`, :class:`~.parallel.ParallelLayout`,
:class:`~.implementation.Implementation`) into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from .. import platform
from ..errors import UsageError
from ..looping.spec import LoopSpec, RepeatBlock, build_schedule, layout_from_stage_sizes
from .arch import Arch
from .implementation import Implementation
from .parallel import ParallelLayout


@dataclass
class GrowLoopConfig(TransformerConfig):
    """``TransformerConfig`` with the schedule of layer applications."""

    loop: Optional[LoopSpec] = None
    """The loop over the unique layers, or None for a plain model."""

    repeat_blocks: Tuple[RepeatBlock, ...] = field(default_factory=tuple)
    """Inference-time repetitions applied on top of the loop (effective-depth positions)."""

    loop_backprop_depth: Optional[int] = None
    """Training: gradients flow through only the last n applications of the recurrent block
    (``--loop-backprop-depth``); None: through all of them."""

    def schedule(self) -> List[int]:
        return build_schedule(self.num_layers, self.loop, self.repeat_blocks)

    def no_grad_positions(self) -> Optional[Tuple[int, int]]:
        """Effective-depth positions that run without autograd (truncated backprop), or None."""
        if self.loop is None or self.repeat_blocks:
            return None
        return self.loop.no_grad_positions(self.loop_backprop_depth)

    @property
    def backward_depth(self) -> int:
        """Layer applications whose backward pass computes a gradient (model FLOPs)."""
        if self.no_grad_positions() is None:
            return self.effective_depth
        return self.loop.backward_depth(self.loop_backprop_depth)

    @property
    def effective_depth(self) -> int:
        return len(self.schedule())


def looped(arch: Arch, repeat_blocks: Sequence[RepeatBlock] = ()) -> bool:
    """Whether some layer runs more than once per step (a loop or a repeat block)."""
    return arch.loop is not None or bool(repeat_blocks)


def build_transformer_config(
    arch: Arch,
    layout: ParallelLayout = ParallelLayout(),
    impl: Implementation = Implementation(),
    repeat_blocks: Sequence[RepeatBlock] = (),
    initialize: bool = True,
) -> GrowLoopConfig:
    """The megatron-core config of ``arch`` at ``layout``, run as ``impl``.

    ``initialize=False`` skips random initialisation (every parameter is overwritten next,
    as in conversion)."""
    blocks = tuple(RepeatBlock.parse(str(b)) for b in repeat_blocks)
    stage_sizes = layout.stage_sizes(arch, blocks)
    kw = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_method_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        sequence_parallel=layout.sequence_parallel,
        use_cpu_initialization=not platform.has_cuda(),
        perform_initialization=initialize,
        calculate_per_token_loss=True,
        loop=arch.loop,
        repeat_blocks=blocks,
        **impl.config_kwargs(looped=looped(arch, blocks)),
    )
    if stage_sizes is not None:
        kw["pipeline_model_parallel_layout"] = layout_from_stage_sizes(stage_sizes)
    try:
        return GrowLoopConfig(**kw)
    except (AssertionError, ValueError) as exc:
        raise UsageError(f"invalid model configuration: {exc}") from None
