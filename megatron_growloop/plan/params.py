"""Exact parameter tensors of one (tensor-parallel rank, pipeline stage) of the model.

Pure counting, no torch: the tensors megatron-core 0.16.1's ``GPTModel`` creates for this
project's Llama layer (``get_gpt_layer_local_spec`` / ``..._with_transformer_engine_spec``;
``megatron/core/models/gpt/gpt_model.py``, ``transformer/attention.py``,
``transformer/mlp.py``, ``tensor_parallel/layers.py``), per rank:

* first stage: ``embedding.word_embeddings.weight`` ``[V/TP, h]`` (``V`` the padded vocabulary);
* per unique layer of the stage: two RMSNorm weights ``[h]`` (replicated over TP; the TE spec
  fuses them into ``linear_qkv``/``linear_fc1`` as ``layer_norm_weight``, same size), the fused
  GQA projection ``linear_qkv`` ``[(heads + 2*groups)*kv/TP, h]``, ``linear_proj``
  ``[h, heads*kv/TP]``, ``linear_fc1`` ``[2*ffn/TP, h]`` (gate and up) and ``linear_fc2`` ``[h, ffn/TP]``;
  no biases;
* last stage: ``decoder.final_layernorm.weight`` ``[h]`` and ``output_layer.weight`` ``[V/TP, h]``,
  which exists when the embeddings are untied *or* when they are tied and the last stage is not
  the first (megatron keeps a copy of the word embeddings there, ``shared_embedding``).

A looped model stores only its unique layers; which unique layers a stage holds comes from
:meth:`~megatron_growloop.model.parallel.ParallelLayout.stage_sizes` (balanced layer applications).
Every TP rank of a stage holds the same number of parameters (all splits are exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, lcm
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import UsageError
from ..model.arch import Arch


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: Tuple[int, ...]
    shared_embedding: bool = False
    """megatron's ``shared_embedding`` attribute: the DDP gives the tensor its own bucket."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _split(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise UsageError(f"TP {tp} does not divide the model's {what} ({n})")
    return n // tp


def layer_tensors(arch: Arch, tp: int, prefix: str = "", te_names: bool = False) -> List[ParamTensor]:
    """The parameters of one transformer layer on one TP rank, in ``named_parameters`` order."""
    h, kv = arch.hidden_size, arch.kv_channels
    qkv = _split((arch.num_attention_heads + 2 * arch.num_query_groups) * kv, tp, "query/key/value width")
    proj_in = _split(arch.num_attention_heads * kv, tp, "attention width")
    ffn = _split(arch.ffn_hidden_size, tp, "feed-forward size")
    if te_names:  # TE's LayerNormLinear registers its norm weight first (order only moves DDP padding)
        return [
            ParamTensor(prefix + "self_attention.linear_proj.weight", (h, proj_in)),
            ParamTensor(prefix + "self_attention.linear_qkv.layer_norm_weight", (h,)),
            ParamTensor(prefix + "self_attention.linear_qkv.weight", (qkv, h)),
            ParamTensor(prefix + "mlp.linear_fc1.layer_norm_weight", (h,)),
            ParamTensor(prefix + "mlp.linear_fc1.weight", (2 * ffn, h)),
            ParamTensor(prefix + "mlp.linear_fc2.weight", (h, ffn)),
        ]
    return [  # SelfAttention builds linear_proj before linear_qkv
        ParamTensor(prefix + "input_layernorm.weight", (h,)),
        ParamTensor(prefix + "self_attention.linear_proj.weight", (h, proj_in)),
        ParamTensor(prefix + "self_attention.linear_qkv.weight", (qkv, h)),
        ParamTensor(prefix + "pre_mlp_layernorm.weight", (h,)),
        ParamTensor(prefix + "mlp.linear_fc1.weight", (2 * ffn, h)),
        ParamTensor(prefix + "mlp.linear_fc2.weight", (h, ffn)),
    ]


def stage_tensors(arch: Arch, tp: int, pp: int, pp_rank: int, stage_sizes: Optional[Sequence[int]],
                  te_names: bool = False) -> List[ParamTensor]:
    """Every parameter tensor of pipeline stage ``pp_rank`` on one TP rank, in the order of
    ``GPTModel.named_parameters()`` (the order megatron's DDP lays out its buffers in)."""
    sizes = list(stage_sizes) if stage_sizes is not None else [arch.num_layers]
    if len(sizes) != pp or sum(sizes) != arch.num_layers:
        raise UsageError(f"stage sizes {sizes} do not place {arch.num_layers} layers on {pp} pipeline stages")
    first, last = pp_rank == 0, pp_rank == pp - 1
    vocab = _split(arch.padded_vocab_size, tp, "padded vocabulary")
    h = arch.hidden_size
    out: List[ParamTensor] = []
    tied_copy = arch.tied and not first and last
    if first:
        out.append(ParamTensor("embedding.word_embeddings.weight", (vocab, h), shared_embedding=arch.tied and pp > 1))
    for i in range(sizes[pp_rank]):
        # megatron numbers a stage's layers from 0 (decoder.layers.<local>.*)
        out.extend(layer_tensors(arch, tp, f"decoder.layers.{i}.", te_names))
    if last:
        out.append(ParamTensor("decoder.final_layernorm.weight", (h,)))
        if not arch.tied or tied_copy:
            out.append(ParamTensor("output_layer.weight", (vocab, h), shared_embedding=tied_copy))
    return out


def count(tensors: Sequence[ParamTensor]) -> int:
    return sum(t.numel for t in tensors)


def unique_params(arch: Arch) -> int:
    """Parameters of the whole model (TP=PP=1): what a single-rank megatron-core build holds."""
    return count(stage_tensors(arch, 1, 1, 0, None))


@dataclass(frozen=True)
class BufferLayout:
    """Where megatron-core DDP's contiguous buffer places each parameter, and its buckets."""

    params: Tuple[Tuple[str, int, int], ...]
    """``(name, start, end)`` element offsets of every parameter."""
    buckets: Tuple[Tuple[int, int], ...]
    """``(start, end)`` of every bucket (padded to a multiple of lcm(DP, 128) with the distributed optimizer)."""
    numel: int
    numel_unpadded: int

    def dp_ranges(self, dp: int, dp_rank: int) -> Dict[str, Tuple[int, int]]:
        """With the distributed optimizer: the ``[lo, hi)`` elements of each parameter (within the
        parameter) that data-parallel rank ``dp_rank`` owns -- each bucket is split into ``dp``
        equal slices (``DistributedOptimizer._build_model_gbuf_range``)."""
        out = {}
        for b_start, b_end in self.buckets:
            size = (b_end - b_start) // dp
            lo_r, hi_r = b_start + dp_rank * size, b_start + (dp_rank + 1) * size
            for name, p_start, p_end in self.params:
                if b_start <= p_start < b_end:
                    lo, hi = max(p_start, lo_r), min(p_end, hi_r)
                    if lo < hi:
                        out[name] = (lo - p_start, hi - p_start)
        return out


def buffer_layout(tensors: Sequence[ParamTensor], dp: int, distributed_optimizer: bool,
                  bucket_size: Optional[int]) -> BufferLayout:
    """megatron-core DDP's contiguous grad (and, with the distributed optimizer, param) buffer for
    these parameters (one dtype).

    Follows ``_ParamAndGradBuffer.__init__`` (``megatron/core/distributed/param_and_grad_buffer.py``):
    parameters in reverse order; with the distributed optimizer every parameter starts at a
    multiple of 64 elements and every bucket ends at a multiple of lcm(DP, 128); a
    ``shared_embedding`` parameter gets a bucket of its own; ``bucket_size`` is None unless
    ``--overlap-grad-reduce`` (then ``max(4e7, 1e6 * DP)``, ``distributed_data_parallel.py``).
    """
    def pad(n: int, d: int) -> int:
        return int(ceil(n / d) * d)

    div = lcm(dp, 128)
    start = bucket_start = in_bucket = unpadded = end = 0
    params, buckets = [], []
    for t in reversed(list(tensors)):
        if distributed_optimizer:
            start = pad(start, 64)
        new_bucket = t.shared_embedding and distributed_optimizer
        if new_bucket and in_bucket:
            unpadded += start - bucket_start
            start = pad(start, div) if distributed_optimizer else start
            buckets.append((bucket_start, start))
            bucket_start, in_bucket = start, 0
        end = start + t.numel
        params.append((t.name, start, end))
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or new_bucket:
            unpadded += end - bucket_start
            start = pad(end, div) if distributed_optimizer else end
            buckets.append((bucket_start, start))
            bucket_start, in_bucket = start, 0
        else:
            start = end
    if in_bucket:
        unpadded += end - bucket_start
        end = pad(end, div) if distributed_optimizer else end
        buckets.append((bucket_start, end))
    else:
        end = bucket_start
    return BufferLayout(tuple(params), tuple(buckets), end, unpadded)


def grad_buffer_numel(tensors: Sequence[ParamTensor], dp: int, distributed_optimizer: bool,
                      bucket_size: Optional[int]) -> Tuple[int, int]:
    """``(numel, numel_unpadded)`` of megatron-core DDP's contiguous buffer (:func:`buffer_layout`)."""
    layout = buffer_layout(tensors, dp, distributed_optimizer, bucket_size)
    return layout.numel, layout.numel_unpadded
