"""Core attention for megatron-core's local spec on ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` (``megatron/core/transformer/dot_product_attention.py``)
materialises the ``s x s`` score matrix of every head (``baddbmm`` into a global buffer,
``masked_fill``, softmax, ``bmm``): O(s^2) memory and no flash kernel.  Where Transformer Engine
is absent -- CPU machines, plain PyTorch containers, the lent GPU machine -- that is the attention
that runs.  :class:`SDPAttention` is the same module (it subclasses ``DotProductAttention``: same
constructor, same partition sizes, same softmax scale, same dropout module, no parameters or
extra state, hence the same checkpoint keys) with the score/softmax/context part replaced by
torch's fused kernel, which picks flash/memory-efficient/cuDNN kernels on a GPU and the
flash-style CPU kernel on a CPU.

Semantics follow ``DotProductAttention`` exactly:

* the mask: with no ``attention_mask`` a causal module is causal whenever the query has more
  than one position, and unmasked for a single query position (decoding with a KV cache);
  a given boolean mask (``True`` = masked out, megatron's ``attention_mask_func``) replaces
  the causal mask.  One generalisation: when the query is shorter than the keys (a prompt
  chunk appended to a KV cache) the causal mask is aligned bottom-right, where
  ``DotProductAttention`` asserts ``sq == sk``;
* the scale: ``softmax_scale`` (1/sqrt(d) by default, or the config's), including the
  ``apply_query_key_layer_scaling`` split (the parent divides the scale by the layer number and
  multiplies it back inside the softmax; the product is what matters);
* grouped-query attention: the kernel's native ``enable_gqa`` (no copy of keys and values);
* dropout on the attention probabilities, drawn inside megatron's model-parallel RNG tracker
  unless sequence parallelism is on, as the parent does.

Features the fused kernel cannot express -- an off-by-one/learnable softmax offset, sliding
windows -- run the parent's unfused forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

# megatron-core mask types whose "no explicit mask" meaning is causal
_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


def causal_mask(sq: int, sk: int, device) -> Optional[torch.Tensor]:
    """Boolean ``[sq, sk]`` mask, True = attend, of a causal query block ending at the last key.

    None when ``sq == sk`` (the kernel's own ``is_causal`` is cheaper)."""
    if sq == sk:
        return None
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril_(sk - sq)


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` computed by ``F.scaled_dot_product_attention``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        coeff = self.scale_mask_softmax.scale
        # the parent applies softmax_scale/coeff in the matmul and coeff inside the softmax
        self.sdpa_scale = float(self.softmax_scale * (coeff if coeff is not None else 1.0))
        self.unfused_only = (
            self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if self.unfused_only:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        assert packed_seq_params is None, "packed sequences need Transformer Engine attention"
        assert attention_bias is None, "attention bias is not supported by the local spec"
        sq, b, np_, hn = query.shape
        sk = key.size(0)
        # [s, b, heads, d] -> [b, heads, s, d] (views; the kernels accept these strides)
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        mask, is_causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask
        elif self.attn_mask_type in _CAUSAL and sq > 1:
            mask = causal_mask(sq, sk, q.device)
            is_causal = mask is None
        dropout_p = self.attention_dropout.p if self.training else 0.0
        kwargs = dict(attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.sdpa_scale,
                      enable_gqa=k.size(1) != np_)
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
