"""The local (no Transformer Engine) layer spec: megatron-core's, with torch's fused kernels.

Starts from megatron-core's ``get_gpt_layer_local_spec(normalization="RMSNorm")``
(``megatron/core/models/gpt/gpt_layer_specs.py``) and swaps two modules:

* the core attention: :class:`~.attention.SDPAttention` (``--attention-backend sdpa``, the
  default) or megatron-core's ``DotProductAttention`` (``--attention-backend unfused``);
* the norms -- both per-layer norms and the block's final norm -- :class:`~.fusions.RMSNorm`
  (``F.rms_norm``, sequence parallel) in place of ``WrappedTorchNorm``.

Neither swap changes a parameter name, so checkpoints load across backends and specs.
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from .attention import SDPAttention
from .fusions import RMSNorm
from .implementation import Implementation
from .linear import ColumnParallelLinear, RowParallelLinear


def local_layer_spec(impl: Implementation) -> ModuleSpec:
    """One transformer layer of the local spec for ``impl`` (its attention backend)."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    # the same linear layers with a plain F.linear when decoding at TP=1 (model/linear.py)
    sub.self_attention.submodules.linear_qkv = ColumnParallelLinear
    sub.self_attention.submodules.linear_proj = RowParallelLinear
    sub.mlp.submodules.linear_fc1 = ColumnParallelLinear
    sub.mlp.submodules.linear_fc2 = RowParallelLinear
    if impl.core_attention == "sdpa":
        sub.self_attention.submodules.core_attention = SDPAttention
    return spec


def local_block_spec(impl: Implementation, config, vp_stage=None) -> TransformerBlockSubmodules:
    """This pipeline stage's block: ``local_layer_spec`` per unique layer and an RMSNorm final norm.

    megatron-core's ``TransformerBlock`` turns a layer spec into this itself, but with its own
    choice of final norm (``WrappedTorchNorm`` without apex); giving the block submodules keeps
    every norm of the model the same module."""
    layer = local_layer_spec(impl)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=RMSNorm
    )
