"""Parameter and FLOPs accounting: the three axes of the paper's Fig. 1.

* *unique parameters* -- what the model stores (tied loop layers counted once);
* *inference FLOPs per token* -- a forward pass at the model's effective depth;
* *training FLOPs* -- 3x the forward work per trained token (forward + backward),
  summed over the run, following the depth the model had at each step (growth, a k
  drawn per step).  With truncated backprop through a loop (``--loop-backprop-depth``)
  only the applications that back-propagate a gradient count their backward (2x): the
  no-grad applications count 1x, and the zero-gradient backward through the prelude
  (``looping/truncation.py``) is not counted, like recomputation.

Conventions (PaLM App. B; Megatron-Core ``num_floating_point_operations`` before
its causal halving): a matmul of ``m x k`` by ``k x n`` is ``2mkn`` FLOPs; every
layer *application* costs its weight matmuls plus attention scores and the
weighted sum over the full ``seq_len`` context (``4 * seq * n_heads * head_dim``
per token forward); the LM head is counted once; embedding lookups, norms,
activations and softmax are not counted.  Activation recomputation is *not*
counted (this is model FLOPs, the basis of MFU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ArchShape:
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    kv_channels: int
    vocab_size: int
    gated: bool = True
    tied_embeddings: bool = True

    @classmethod
    def from_config(cls, config, vocab_size: int, tied: bool = True) -> "ArchShape":
        return cls(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups or config.num_attention_heads,
            ffn_hidden_size=config.ffn_hidden_size,
            kv_channels=config.kv_channels or config.hidden_size // config.num_attention_heads,
            vocab_size=vocab_size,
            gated=bool(getattr(config, "gated_linear_unit", True)),
            tied_embeddings=tied,
        )

    # ------------------------------------------------------------------ parameters
    @property
    def attn_dim(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_dim(self) -> int:
        return self.num_query_groups * self.kv_channels

    @property
    def layer_matmul_params(self) -> int:
        h = self.hidden_size
        attn = h * self.attn_dim + 2 * h * self.kv_dim + self.attn_dim * h
        mlp = (3 if self.gated else 2) * h * self.ffn_hidden_size
        return attn + mlp

    @property
    def layer_params(self) -> int:
        return self.layer_matmul_params + 2 * self.hidden_size  # two RMSNorm weights

    def unique_params(self, num_unique_layers: int) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tied_embeddings else emb
        return emb + head + num_unique_layers * self.layer_params + self.hidden_size

    # ------------------------------------------------------------------ FLOPs
    def layer_forward_flops_per_token(self, seq_len: int) -> int:
        return 2 * self.layer_matmul_params + 4 * seq_len * self.attn_dim

    def head_forward_flops_per_token(self) -> int:
        return 2 * self.hidden_size * self.vocab_size

    def forward_flops_per_token(self, depth: int, seq_len: int) -> int:
        """Inference FLOPs per token of a model applying ``depth`` layers."""
        return depth * self.layer_forward_flops_per_token(seq_len) + self.head_forward_flops_per_token()

    def training_flops_per_token(self, depth: int, seq_len: int, backward_depth: Optional[int] = None) -> int:
        """Forward over ``depth`` applications plus backward (2x forward) over the
        ``backward_depth`` that back-propagate a gradient (default: all) and the head."""
        backward = depth if backward_depth is None else backward_depth
        return self.forward_flops_per_token(depth, seq_len) + 2 * self.forward_flops_per_token(backward, seq_len)


def summary(config, vocab_size: int, tied: bool, seq_len: int, effective_depth: Optional[int] = None,
            backward_depth: Optional[int] = None) -> dict:
    """The numbers logs and checkpoint metadata report for a model (``backward_depth``: the
    applications that back-propagate, with truncated backprop through a loop)."""
    shape = ArchShape.from_config(config, vocab_size, tied)
    if effective_depth is None:  # a looped config knows its effective depth (applications)
        effective_depth = getattr(config, "effective_depth", None)
    depth = effective_depth if effective_depth is not None else config.num_layers
    return {
        "unique_layers": int(config.num_layers),
        "effective_depth": int(depth),
        "unique_parameters": int(shape.unique_params(config.num_layers)),
        "inference_flops_per_token": int(shape.forward_flops_per_token(depth, seq_len)),
        "training_flops_per_token": int(shape.training_flops_per_token(depth, seq_len, backward_depth)),
    }


# Peak dense throughput used for MFU (bf16 unless stated), by device name fragment.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "B200": 2250e12,
    "GB200": 2500e12,
}


def device_peak_flops(device_name: str, fp8: bool = False) -> Optional[float]:
    for key, peak in PEAK_FLOPS.items():
        if key in device_name:
            return peak * (2 if fp8 else 1)
    return None
