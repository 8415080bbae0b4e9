"""Exact parameter mapping between Hugging Face ``LlamaForCausalLM`` and megatron-core ``GPTModel``.

Pure tensor functions (no process groups, no models).  Every function is an exact
re-arrangement (views, ``cat``, ``split``), so HF -> megatron -> HF reproduces each
tensor bitwise.

Per transformer layer (``nh`` query heads, ``ng`` key/value groups, ``hd`` head dim,
``qpg = nh // ng`` query heads per group)::

    HF (model.layers.{i}.)            megatron-core (decoder.layers.{i}.)
    self_attn.{q,k,v}_proj.weight  -> self_attention.linear_qkv.weight
                                      = per group g: [q heads of g (qpg*hd rows); k_g (hd); v_g (hd)]
    self_attn.o_proj.weight        -> self_attention.linear_proj.weight
    mlp.{gate,up}_proj.weight      -> mlp.linear_fc1.weight = [gate; up]
    mlp.down_proj.weight           -> mlp.linear_fc2.weight
    input_layernorm.weight         -> local: input_layernorm.weight
                                      TE:    self_attention.linear_qkv.layer_norm_weight
    post_attention_layernorm.weight-> local: pre_mlp_layernorm.weight
                                      TE:    mlp.linear_fc1.layer_norm_weight

plus ``model.embed_tokens`` -> ``embedding.word_embeddings`` and ``lm_head`` ->
``output_layer`` (both zero-padded to the padded vocabulary), ``model.norm`` ->
``decoder.final_layernorm``.  ``TE`` names are also the keys of megatron's
distributed checkpoints for *both* specs (the local spec renames its norms when it
builds its sharded state dict), with all layers stacked along a leading axis
(``decoder.layers.<te name>`` of shape ``[num_layers, ...]``): naming ``"dist"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import UsageError

NAMINGS = ("local", "te", "dist")

# HF per-layer names (relative to ``model.layers.{i}.``).
HF_Q, HF_K, HF_V, HF_O = (f"self_attn.{p}_proj.weight" for p in "qkvo")
HF_GATE, HF_UP, HF_DOWN = "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"
HF_IN_NORM, HF_POST_NORM = "input_layernorm.weight", "post_attention_layernorm.weight"
HF_LAYER_KEYS = (HF_Q, HF_K, HF_V, HF_O, HF_GATE, HF_UP, HF_DOWN, HF_IN_NORM, HF_POST_NORM)
HF_EMBED, HF_FINAL_NORM, HF_LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# megatron per-layer names (relative to ``decoder.layers.{i}.``).
MC_QKV = "self_attention.linear_qkv.weight"
MC_PROJ = "self_attention.linear_proj.weight"
MC_FC1 = "mlp.linear_fc1.weight"
MC_FC2 = "mlp.linear_fc2.weight"
NORM_NAMES = {
    "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
    "te": ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
}
NORM_NAMES["dist"] = NORM_NAMES["te"]
MC_EMBED, MC_FINAL_NORM, MC_OUTPUT = (
    "embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
)
LAYER_PREFIX = "decoder.layers."


def _check_naming(naming: str) -> None:
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; choose one of {NAMINGS}")


@dataclass(frozen=True)
class LlamaShape:
    """Tensor shapes of a Llama-family decoder."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def hf_layer_shapes(self) -> Dict[str, Tuple[int, ...]]:
        h, hd = self.hidden_size, self.head_dim
        return {
            HF_Q: (self.num_attention_heads * hd, h),
            HF_K: (self.num_query_groups * hd, h),
            HF_V: (self.num_query_groups * hd, h),
            HF_O: (h, self.num_attention_heads * hd),
            HF_GATE: (self.ffn_hidden_size, h),
            HF_UP: (self.ffn_hidden_size, h),
            HF_DOWN: (h, self.ffn_hidden_size),
            HF_IN_NORM: (h,),
            HF_POST_NORM: (h,),
        }

    def hf_shapes(self, tied: bool) -> Dict[str, Tuple[int, ...]]:
        """Every HF tensor name of this model with its shape."""
        out = {HF_EMBED: (self.vocab_size, self.hidden_size), HF_FINAL_NORM: (self.hidden_size,)}
        if not tied:
            out[HF_LM_HEAD] = (self.vocab_size, self.hidden_size)
        for i in range(self.num_layers):
            for k, s in self.hf_layer_shapes().items():
                out[f"model.layers.{i}.{k}"] = s
        return out


# ------------------------------------------------------------------------------ vocabulary
def pad_vocab(weight: torch.Tensor, padded: int) -> torch.Tensor:
    """Append zero rows up to ``padded`` rows (returns ``weight`` itself when no padding)."""
    n = weight.shape[0]
    if padded < n:
        raise UsageError(f"padded vocabulary {padded} is smaller than the vocabulary {n}")
    if padded == n:
        return weight
    return torch.cat([weight, weight.new_zeros((padded - n,) + tuple(weight.shape[1:]))], dim=0)


def unpad_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The first ``vocab_size`` rows (the padding rows are dropped)."""
    if weight.shape[0] < vocab_size:
        raise UsageError(f"embedding has {weight.shape[0]} rows, fewer than the vocabulary {vocab_size}")
    return weight[:vocab_size]


# ------------------------------------------------------------------------------ attention / MLP
def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: LlamaShape) -> torch.Tensor:
    """Megatron's fused QKV weight: rows interleaved per query group ``[q_g; k_g; v_g]``."""
    ng, hd, h = shape.num_query_groups, shape.head_dim, q.shape[-1]
    qpg = shape.queries_per_group
    fused = torch.cat(
        [q.reshape(ng, qpg * hd, h), k.reshape(ng, hd, h), v.reshape(ng, hd, h)], dim=1
    )
    return fused.reshape(ng * (qpg + 2) * hd, h)


def qkv_from_mcore(qkv: torch.Tensor, shape: LlamaShape) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`qkv_to_mcore`: ``(q, k, v)`` in HF layout."""
    ng, hd, h = shape.num_query_groups, shape.head_dim, qkv.shape[-1]
    qpg = shape.queries_per_group
    grouped = qkv.reshape(ng, (qpg + 2) * hd, h)
    q, k, v = torch.split(grouped, [qpg * hd, hd, hd], dim=1)
    return (
        q.reshape(ng * qpg * hd, h).contiguous(),
        k.reshape(ng * hd, h).contiguous(),
        v.reshape(ng * hd, h).contiguous(),
    )


def fc1_to_mcore(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Megatron's gated-MLP input weight ``[gate; up]`` (TP-agnostic global layout)."""
    return torch.cat([gate, up], dim=0)


def fc1_from_mcore(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if fc1.shape[0] % 2:
        raise UsageError(f"linear_fc1 weight has an odd number of rows ({fc1.shape[0]}); not a gated MLP")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


# ------------------------------------------------------------------------------ one layer
def hf_layer_to_mcore(hf: Mapping[str, torch.Tensor], shape: LlamaShape, naming: str = "local") -> Dict[str, torch.Tensor]:
    """One layer: HF names (relative to ``model.layers.{i}.``) -> megatron names (relative
    to ``decoder.layers.{i}.``) in ``naming`` ``local`` or ``te``/``dist``."""
    _check_naming(naming)
    in_norm, mlp_norm = NORM_NAMES[naming]
    return {
        in_norm: hf[HF_IN_NORM],
        MC_QKV: qkv_to_mcore(hf[HF_Q], hf[HF_K], hf[HF_V], shape),
        MC_PROJ: hf[HF_O],
        mlp_norm: hf[HF_POST_NORM],
        MC_FC1: fc1_to_mcore(hf[HF_GATE], hf[HF_UP]),
        MC_FC2: hf[HF_DOWN],
    }


def mcore_layer_to_hf(mc: Mapping[str, torch.Tensor], shape: LlamaShape, naming: str = "local") -> Dict[str, torch.Tensor]:
    """Inverse of :func:`hf_layer_to_mcore`."""
    _check_naming(naming)
    in_norm, mlp_norm = NORM_NAMES[naming]
    q, k, v = qkv_from_mcore(mc[MC_QKV], shape)
    gate, up = fc1_from_mcore(mc[MC_FC1])
    return {
        HF_Q: q,
        HF_K: k,
        HF_V: v,
        HF_O: mc[MC_PROJ],
        HF_GATE: gate,
        HF_UP: up,
        HF_DOWN: mc[MC_FC2],
        HF_IN_NORM: mc[in_norm],
        HF_POST_NORM: mc[mlp_norm],
    }


def mcore_layer_keys(naming: str) -> List[str]:
    _check_naming(naming)
    in_norm, mlp_norm = NORM_NAMES[naming]
    return [in_norm, MC_QKV, MC_PROJ, mlp_norm, MC_FC1, MC_FC2]


# ------------------------------------------------------------------------------ whole model
def hf_to_mcore_state_dict(
    hf: Mapping[str, torch.Tensor],
    shape: LlamaShape,
    padded_vocab: int,
    tied: bool,
    naming: str = "local",
) -> Dict[str, torch.Tensor]:
    """Whole model.  ``local``/``te``: per-layer keys ``decoder.layers.{i}.<name>``;
    ``dist``: the distributed-checkpoint form, layers stacked under ``decoder.layers.<name>``."""
    _check_naming(naming)
    out: Dict[str, torch.Tensor] = {
        MC_EMBED: pad_vocab(hf[HF_EMBED], padded_vocab),
        MC_FINAL_NORM: hf[HF_FINAL_NORM],
    }
    if not tied:
        out[MC_OUTPUT] = pad_vocab(hf[HF_LM_HEAD], padded_vocab)
    layers = []
    for i in range(shape.num_layers):
        pre = f"model.layers.{i}."
        layers.append(hf_layer_to_mcore({k: hf[pre + k] for k in HF_LAYER_KEYS}, shape, naming))
    if naming == "dist":
        for name in mcore_layer_keys(naming):
            out[LAYER_PREFIX + name] = torch.stack([l[name] for l in layers])
    else:
        for i, layer in enumerate(layers):
            for name, t in layer.items():
                out[f"{LAYER_PREFIX}{i}.{name}"] = t
    return out


def mcore_layers(mc: Mapping[str, torch.Tensor], num_layers: int, naming: str) -> List[Dict[str, torch.Tensor]]:
    """The per-layer dicts (relative names) of a megatron state dict in ``naming``."""
    _check_naming(naming)
    keys = mcore_layer_keys(naming)
    if naming == "dist":
        return [{k: mc[LAYER_PREFIX + k][i] for k in keys} for i in range(num_layers)]
    return [{k: mc[f"{LAYER_PREFIX}{i}.{k}"] for k in keys} for i in range(num_layers)]


def mcore_to_hf_state_dict(
    mc: Mapping[str, torch.Tensor],
    shape: LlamaShape,
    tied: bool,
    naming: str = "local",
    schedule: Optional[Sequence[int]] = None,
) -> Dict[str, torch.Tensor]:
    """Whole model back to HF names, vocabulary padding removed.

    ``shape.num_layers`` counts the *unique* megatron layers; ``schedule`` (unique-layer
    indices in application order, default the identity) unrolls a looped model into
    ``len(schedule)`` HF layers.  Repeated layers are independent copies.
    """
    layers = mcore_layers(mc, shape.num_layers, naming)
    schedule = list(range(shape.num_layers)) if schedule is None else list(schedule)
    out: Dict[str, torch.Tensor] = {
        HF_EMBED: unpad_vocab(mc[MC_EMBED], shape.vocab_size),
        HF_FINAL_NORM: mc[MC_FINAL_NORM],
    }
    if not tied:
        out[HF_LM_HEAD] = unpad_vocab(mc[MC_OUTPUT], shape.vocab_size)
    converted: Dict[int, Dict[str, torch.Tensor]] = {}
    for pos, idx in enumerate(schedule):
        if not 0 <= idx < shape.num_layers:
            raise UsageError(f"schedule position {pos} names layer {idx}; the model has {shape.num_layers}")
        first = idx not in converted
        if first:
            converted[idx] = mcore_layer_to_hf(layers[idx], shape, naming)
        for k, t in converted[idx].items():
            out[f"model.layers.{pos}.{k}"] = t if first else t.clone()
    return out
