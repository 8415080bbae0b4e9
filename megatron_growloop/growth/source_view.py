"""Loading a deeper model from a shallower checkpoint: the *source view* and the dedup loader.

A torch_dist checkpoint stores every decoder-layer tensor of a homogeneous
``TransformerBlock`` as one global tensor whose axis 0 is the global layer
index (``decoder.layers.<param>``, shape ``[L, ...]``); megatron-core derives
the shard of each layer from ``sharded_offsets = [(0, layer_index, L)]``.
Optimizer tensors in a model-space format (``fully_reshardable``) reuse the
model parameter's sharding (``optimizer.state.exp_avg.decoder.layers.<param>``).

The *source view* of a freshly built model at the new depth is its ordinary
sharded state dict with each decoder layer's entries regenerated with the
offsets of its *source* layer in the old model: new layer ``g`` asks for slice
``src[g]`` of the old ``[L_old, ...]`` tensors.  Handing that view to
``optimizer.sharded_state_dict(view, is_loading=True)`` re-maps the optimizer
state the same way (megatron's optimizers look up each parameter's sharding
in the model state dict they are given).  Several new layers on one rank may
read the same old layer; torch's loader rejects overlapping requests, so
:class:`DedupLoadStrategy` loads each distinct shard once and hands out copies.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Sequence, Tuple

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

LAYER_PREFIX = "decoder.layers."


def source_view_sharded_state_dict(model, src: Sequence[int], old_num_layers: int, metadata=None) -> Dict[str, Any]:
    """``model.sharded_state_dict()`` in which new decoder layer ``g`` reads old layer ``src[g]``.

    ``model`` is this pipeline stage's (unwrapped) GPT model at the new depth; ``src`` is the
    global new -> old layer map (length = new ``num_layers``).  Everything that is not a decoder
    layer (embedding, final norm, output layer) is requested unchanged.
    """
    decoder = model.decoder
    if len(src) != decoder.config.num_layers:
        raise ValueError(f"source map has {len(src)} entries but the model has {decoder.config.num_layers} layers")
    if any(not 0 <= s < old_num_layers for s in src):
        raise ValueError(f"source map {list(src)} refers to layers outside 0..{old_num_layers - 1}")
    full = model.sharded_state_dict(metadata=metadata)
    sd = {k: v for k, v in full.items() if not k.startswith(LAYER_PREFIX)}
    for local, layer in enumerate(decoder.layers):
        g = layer.layer_number - 1  # global index in the new model
        prefix = f"{LAYER_PREFIX}{local}."
        lsd = layer.sharded_state_dict(prefix, [(0, int(src[g]), int(old_num_layers))], metadata)
        replace_prefix_for_sharding(lsd, prefix, LAYER_PREFIX)
        sd.update(lsd)
    if set(sd) != set(full):
        missing = sorted(set(full) ^ set(sd))[:5]
        raise RuntimeError(f"source view does not cover the model's state dict (differences: {missing})")
    return sd


def shard_identity(x) -> Tuple:
    """What makes two shard requests the same: key, offsets, shapes, flattened range."""
    if isinstance(x, ShardedTensor):
        fr = x.flattened_range
        fr = None if fr is None else (fr.start, fr.stop)
        return ("t", x.key, tuple(x.global_offset), tuple(x.global_shape), tuple(x.local_shape), fr)
    if isinstance(x, ShardedObject):
        return ("o", x.key, tuple(x.global_offset), tuple(x.global_shape))
    return ("x", id(x))


class DedupLoadStrategy(TorchDistLoadShardedStrategy):
    """torch_dist loading where several requests may name the same shard.

    Each distinct ``(key, offset, shape, flattened range)`` is loaded once; every further
    request for it receives a copy.  Use with ``validate_access_integrity=False``.
    """

    def load(self, sharded_state_dict, checkpoint_dir):
        uniq: Dict[Tuple, str] = {}
        flat: Dict[str, Any] = {}
        index: Dict[int, str] = {}
        for x in nested_values(sharded_state_dict):
            ident = shard_identity(x)
            name = uniq.get(ident)
            if name is None:
                name = f"u{len(flat)}"
                uniq[ident] = name
                flat[name] = x
            index[id(x)] = name
        loaded = super().load(flat, checkpoint_dir)
        handed_out = set()

        def rebuild(obj):
            if isinstance(obj, dict):
                return {k: rebuild(v) for k, v in obj.items()}
            if isinstance(obj, list):
                return [rebuild(v) for v in obj]
            name = index[id(obj)]
            value = loaded[name]
            if name in handed_out:
                value = value.clone() if torch.is_tensor(value) else copy.deepcopy(value)
            handed_out.add(name)
            return value

        return rebuild(sharded_state_dict)
