"""Bytes saved for the backward pass, per layer application and per pipeline-stage end.

Counted from what megatron-core 0.16.1's modules (and the torch ops they call) keep in
autograd's graph for one micro-batch of ``b`` sequences of ``s`` tokens on one
tensor-parallel rank (``T = s*b`` tokens; ``T_sp = T/TP`` with sequence parallelism, else
``T``).  ``e`` is the bytes of the params dtype, ``h`` hidden, ``kv`` head dim, ``n_q = heads/TP``,
``n_kv = max(groups/TP, 1)`` heads on the rank, ``f = ffn/TP``:

=========================  ===================================================================
RMSNorm (x2 per layer)     CPU: fp32 input copy, fp32 normalised tensor (``8h``) + fp32 rstd (4);
                           CUDA torch norm and TE's fused LayerNormLinear: input ``e*h`` + rstd 4
linear inputs              ``e*h*T_sp`` (qkv, fc1: the norm outputs; with SP megatron saves the
                           un-gathered shard), ``e*n_q*kv*T`` (proj), ``e*f*T`` (fc2)
RoPE (unfused)             cos and sin tables for q and k: ``4*s*kv*e``
core attention, unfused    q, k, v expanded to ``n_q`` heads ``3*e*n_q*kv*T``, the causal mask
                           ``s*s`` (bool), the fp32 softmax ``4*b*n_q*s*s`` and, in 16 bits, the
                           probabilities cast back ``e*b*n_q*s*s`` (``fusions/fused_softmax.py``)
core attention, flash      q, k, v ``e*(n_q + 2*n_kv)*kv*T`` and the fp32 log-sum-exp ``4*b*n_q*s``
core attention, SDPA       as flash (the local spec's default, model/attention.py; GQA native: k, v
                           not expanded); on CUDA also a copy of the kernel's output ``e*n_q*kv*T``
SwiGLU                     fc1 output ``2*e*f*T``; unfused also ``silu(gate)`` and ``up + 0`` (``2*e*f*T``)
=========================  ===================================================================

First stage: the token ids (int64, ``8*T``; with TP also a bool mask ``T``).  Last stage: the final norm, the output layer's
input, the cross entropy's fp32 softmax ``4*T*V/TP``, its target mask (bool) and masked targets
(int64), and the loss mask of the loss function (fp32).

Recomputation (megatron's ``transformer_block._checkpointed_forward`` and
``attention._checkpointed_attention_forward``):

* ``full``/``uniform`` with N: every chunk of N layer *applications* keeps only its input
  ``e*h*T_sp``; the RoPE table ``4*s*kv`` is passed to every chunk (one tensor for all chunks
  and micro-batches);
* ``full``/``block`` with N: the first N applications keep only their inputs;
* ``selective`` (megatron's default ``core_attn``): the core attention keeps q, k, v as passed
  in (``e*(n_q + 2*n_kv)*kv*T``) instead of its internals.

During the backward pass one recomputed unit (a chunk, or one core attention) is alive on top:
:func:`recompute_working_set`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..model.arch import Arch
from .kernels import Kernels


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch on one TP rank."""

    seq: int
    batch: int
    tp: int = 1
    sequence_parallel: bool = False

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    @property
    def tokens_sp(self) -> int:
        """Tokens of the sequence-sharded tensors (norm inputs, residual stream)."""
        return self.tokens // self.tp if self.sequence_parallel else self.tokens


def _heads(arch: Arch, tp: int):
    n_q = arch.num_attention_heads // tp
    n_kv = max(arch.num_query_groups // tp, 1)
    return n_q, n_kv


def norm_bytes_per_token(arch: Arch, k: Kernels) -> int:
    if k.spec == "local" and k.device == "cpu":
        return 8 * arch.hidden_size + 4
    return k.act_bytes * arch.hidden_size + 4


def _qkv_inputs_bytes(arch: Arch, k: Kernels, mb: MicroBatch) -> int:
    """q and k after RoPE (new tensors) and v, a view that keeps the whole fused qkv output alive."""
    n_q, n_kv = _heads(arch, mb.tp)
    return k.act_bytes * arch.kv_channels * mb.tokens * ((n_q + n_kv) + (n_q + 2 * n_kv))


def _sdpa_output_copy_bytes(arch: Arch, k: Kernels, mb: MicroBatch) -> int:
    """SDPA's output saved apart from the projection's input: on CPU the kernel writes it in the
    query's layout, so ``[s, b, heads*kv]`` is a view of it (measured); CUDA's flash kernel writes
    ``[b, s, heads, kv]``, which the reshape copies (from the kernel's layout; not yet measured)."""
    return 0 if k.device == "cpu" else k.act_bytes * (arch.num_attention_heads // mb.tp) * arch.kv_channels * mb.tokens


def core_attention_bytes(arch: Arch, k: Kernels, mb: MicroBatch) -> int:
    e, s, b, kv = k.act_bytes, mb.seq, mb.batch, arch.kv_channels
    n_q, _ = _heads(arch, mb.tp)
    if k.attention == "flash":
        return _qkv_inputs_bytes(arch, k, mb) + 4 * b * n_q * s
    if k.attention == "sdpa":
        return _qkv_inputs_bytes(arch, k, mb) + 4 * b * n_q * s + _sdpa_output_copy_bytes(arch, k, mb)
    scores = b * n_q * s * s
    return 3 * e * n_q * kv * mb.tokens + s * s + 4 * scores + (e * scores if e < 4 else 0)


def attention_inputs_bytes(arch: Arch, k: Kernels, mb: MicroBatch) -> int:
    """What selective recomputation's checkpoint keeps: q, k, v as passed (v keeps the fused
    qkv output alive) and a 4-byte int32 argument."""
    return _qkv_inputs_bytes(arch, k, mb) + 4


def layer_bytes(arch: Arch, k: Kernels, mb: MicroBatch, selective: bool = False) -> int:
    """Saved bytes of one layer application (no full recomputation)."""
    e, h, kv = k.act_bytes, arch.hidden_size, arch.kv_channels
    n_q, _ = _heads(arch, mb.tp)
    f = arch.ffn_hidden_size // mb.tp
    T, Ts = mb.tokens, mb.tokens_sp
    total = 2 * norm_bytes_per_token(arch, k) * Ts
    total += 2 * e * h * Ts + e * n_q * kv * T + e * f * T  # linear inputs: qkv, fc1 | proj, fc2
    if not k.rope_fused:
        total += 4 * e * mb.seq * kv
    total += attention_inputs_bytes(arch, k, mb) if selective else core_attention_bytes(arch, k, mb)
    total += 2 * e * f * T + (0 if k.swiglu_fused else 2 * e * f * T)
    return total


def rope_table_bytes(arch: Arch, mb: MicroBatch, applications: int, rc: "Recompute") -> int:
    """The fp32 RoPE table every full-recomputation checkpoint keeps: one tensor for the whole stage
    and every micro-batch (``RotaryEmbedding.forward`` is ``lru_cache``-d)."""
    return 4 * mb.seq * arch.kv_channels if rc.granularity == "full" and applications else 0


def embedding_bytes(mb: MicroBatch) -> int:
    """The token ids; with TP the vocabulary-parallel embedding saves its masked ids and the
    out-of-range mask (bool) instead (``tensor_parallel/layers.py``)."""
    return 8 * mb.tokens + (mb.tokens if mb.tp > 1 else 0)


def head_bytes(arch: Arch, k: Kernels, mb: MicroBatch) -> int:
    """Final norm, output layer input, cross entropy and loss mask (last stage)."""
    T, Ts = mb.tokens, mb.tokens_sp
    vocab = arch.padded_vocab_size // mb.tp
    return (norm_bytes_per_token(arch, k) * Ts + k.act_bytes * arch.hidden_size * Ts
            + 4 * T * vocab + T + 8 * T + 4 * T)


@dataclass(frozen=True)
class Recompute:
    granularity: Optional[str] = None
    method: Optional[str] = None
    num_layers: Optional[int] = None

    @classmethod
    def of(cls, impl) -> "Recompute":
        return cls(impl.recompute_granularity, impl.recompute_method, impl.recompute_num_layers)

    def checkpointed_units(self, applications: int) -> int:
        """How many checkpointed chunks a stage with this many applications has (full only)."""
        if self.granularity != "full" or not applications:
            return 0
        n = max(int(self.num_layers or 1), 1)
        if self.method == "block":
            return min(n, applications)
        return -(-applications // n)


def stage_stored_bytes(arch: Arch, k: Kernels, mb: MicroBatch, applications: int, first: bool, last: bool,
                       rc: Recompute) -> int:
    """Bytes a stage keeps for one micro-batch between its forward and backward pass."""
    e = k.act_bytes
    one = layer_bytes(arch, k, mb, selective=rc.granularity == "selective")
    total = 0
    if rc.granularity == "full" and applications:
        n = max(int(rc.num_layers or 1), 1)
        chunk_input = e * arch.hidden_size * mb.tokens_sp
        if rc.method == "block":
            ck = min(n, applications)
            total += ck * chunk_input + (applications - ck) * one
        else:
            total += rc.checkpointed_units(applications) * chunk_input
        total += rope_table_bytes(arch, mb, applications, rc)
    else:
        total += applications * one
    if first:
        total += embedding_bytes(mb)
    if last:
        total += head_bytes(arch, k, mb)
    return total


def _mlp_side_bytes(arch: Arch, k: Kernels, mb: MicroBatch) -> int:
    """What a layer's backward frees before it reaches its core attention: the MLP half
    (norm, fc1 input, SwiGLU, fc2 input) and the attention projection's input."""
    e, f = k.act_bytes, arch.ffn_hidden_size // mb.tp
    n_q, _ = _heads(arch, mb.tp)
    T, Ts = mb.tokens, mb.tokens_sp
    return (norm_bytes_per_token(arch, k) * Ts + e * arch.hidden_size * Ts + e * f * T
            + 2 * e * f * T + (0 if k.swiglu_fused else 2 * e * f * T) + e * n_q * arch.kv_channels * T)


def _norm_keeps_its_input(k: Kernels) -> bool:
    """Whether the first norm of a layer saves its input tensor itself (the CPU composite in 16
    bits saves an fp32 copy instead); a recomputed chunk then shares its stored input."""
    return not (k.spec == "local" and k.device == "cpu" and k.act_bytes < 4)


def stage_peak_bytes(arch: Arch, k: Kernels, mb: MicroBatch, applications: int, first: bool, last: bool,
                     rc: Recompute) -> int:
    """The most bytes one micro-batch's saved tensors occupy at any time of its forward and
    backward pass on this stage, recomputation included.

    The backward pass runs from the loss backwards and frees each node's tensors as it goes, so
    a recomputed unit is alive only once everything after it has been freed: the head, and for
    ``block`` recomputation every non-checkpointed application; selective recomputation of the
    last layer's core attention starts after its MLP half is done."""
    stored = stage_stored_bytes(arch, k, mb, applications, first, last, rc)
    if not applications or rc.granularity not in ("full", "selective"):
        return stored
    head = head_bytes(arch, k, mb) if last else 0
    shared = k.act_bytes * arch.hidden_size * mb.tokens_sp if _norm_keeps_its_input(k) else 0
    if rc.granularity == "selective":
        working = core_attention_bytes(arch, k, mb)
        if k.attention == "flash":  # recomputed from the kept q, k, v: only the log-sum-exp is new
            working = 4 * mb.batch * (arch.num_attention_heads // mb.tp) * mb.seq
        elif k.attention == "sdpa":  # the log-sum-exp and the kernel's output
            working = core_attention_bytes(arch, k, mb) - _qkv_inputs_bytes(arch, k, mb) \
                + k.act_bytes * (arch.num_attention_heads // mb.tp) * arch.kv_channels * mb.tokens
        during = stored - head - _mlp_side_bytes(arch, k, mb) + working
    else:
        one = layer_bytes(arch, k, mb)
        n = max(int(rc.num_layers or 1), 1)
        if rc.method == "block":
            ck = min(n, applications)
            during = stored - head - (applications - ck) * one + one - shared
        else:
            chunk = applications - (rc.checkpointed_units(applications) - 1) * n  # the last chunk
            during = stored - head + chunk * one - shared
    return max(stored, during)
