"""Layout-independent initialization: initial weights that are a function of (seed, global
layer index, parameter name) only, so every TP/PP/DP layout starts from the weights one
process would have.

megatron-core initializes each rank's *shard* from that rank's RNG stream (the stream
depends on the TP rank, on the pipeline stage -- Megatron-LM seeds stage ``p`` with
``seed + 100 p`` -- and on the order modules are built), so two layouts start from different
weights and parity checks had to load a common checkpoint.  Here every parameter is
re-drawn after the model is built:

* the parameter's identity is its entry in the model's ``sharded_state_dict`` -- the
  layout-independent name a checkpoint uses (``decoder.layers.mlp.linear_fc1.weight``), the
  global layer index (the prepended axis), the global shape and this rank's offsets in it;
* a ``torch.Generator`` on the parameter's device, seeded with a hash of (seed, name, layer),
  draws the *full* tensor with the config's own init method (``init_method`` or, for the
  output projections, ``output_layer_init_method``; norms are ones, biases zeros), and the
  rank copies out its shard.

The cost is drawing each full tensor on every tensor-parallel rank that holds a shard of it
(``docs/reliability.md`` has the measurement at 1.7B).  Values depend on the device type (a CUDA
generator draws a different stream than the CPU one), not on the layout.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Dict, Iterator, Tuple

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from ..errors import UsageError

# Parameter names (the suffix of a sharded key) and their initial values.
_ONES_SUFFIXES = ("layer_norm_weight", "layernorm.weight", "norm.weight")
_OUTPUT_INIT_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")


def derive_seed(seed: int, key: str, layer: Tuple[int, ...]) -> int:
    """A 63-bit generator seed for one tensor: a hash of (seed, name, global layer index)."""
    digest = hashlib.sha256(f"{int(seed)}|{key}|{','.join(map(str, layer))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sharded_tensors(sd) -> Iterator:
    """Every ShardedTensor of a (nested) sharded state dict; factories are built (their pieces
    are views of the parameter)."""
    if isinstance(sd, dict):
        for v in sd.values():
            yield from sharded_tensors(v)
    elif isinstance(sd, (list, tuple)):
        for v in sd:
            yield from sharded_tensors(v)
    elif isinstance(sd, ShardedTensorFactory):
        yield from sharded_tensors(sd.build())
    elif isinstance(sd, ShardedTensor):
        yield sd


def _init_fn(key: str, config):
    name = key.rsplit(".", 1)[-1]
    if key.endswith(_ONES_SUFFIXES):
        return lambda t, g: t.fill_(1.0)
    if name == "bias" or key.endswith("_bias"):
        return lambda t, g: t.zero_()
    method = config.output_layer_init_method if key.endswith(_OUTPUT_INIT_SUFFIXES) else config.init_method
    return functools.partial(_apply_with_generator, method, key)


def _apply_with_generator(method, key: str, tensor: torch.Tensor, gen: torch.Generator) -> None:
    """Call a megatron init method (``partial(torch.nn.init.normal_, mean=..., std=...)`` and the
    like) with an explicit generator."""
    if isinstance(method, functools.partial) and method.func in (
        torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_,
        torch.nn.init.trunc_normal_, torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_,
    ):
        method(tensor, generator=gen)
        return
    raise UsageError(
        f"layout-independent initialization cannot draw {key} with its init method {method!r} "
        "(supported: torch.nn.init functions); pass --no-layout-independent-init"
    )


@torch.no_grad()
def initialize_layout_independent(model, seed: int) -> int:
    """Re-draw every parameter of ``model`` (one rank's chunk) as a function of (seed, name,
    global layer index); returns the number of elements drawn on this rank."""
    config = model.config
    sd = model.sharded_state_dict()
    params = {p.data_ptr() for p in model.parameters()}
    cache: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor] = {}
    drawn, covered = 0, set()
    for sh in sharded_tensors(sd):
        data = sh.data
        if not isinstance(data, torch.Tensor) or sh.flattened_range is not None:
            continue
        base = data if data._base is None else data._base
        if base.data_ptr() not in params and data.data_ptr() not in params:
            continue  # not a parameter (e.g. a buffer)
        k = sh.prepend_axis_num
        layer, offsets = tuple(sh.global_offset[:k]), tuple(sh.global_offset[k:])
        full_shape = tuple(sh.global_shape[k:])
        ident = (sh.key, layer)
        full = cache.get(ident)
        if full is None:
            cache.clear()  # pieces of one tensor (fused SwiGLU halves) come one after another
            full = torch.empty(full_shape, dtype=torch.float32, device=data.device)
            gen = torch.Generator(device=data.device)
            gen.manual_seed(derive_seed(seed, sh.key, layer))
            _init_fn(sh.key, config)(full, gen)
            drawn += full.numel()
            cache[ident] = full
        piece = full[tuple(slice(o, o + n) for o, n in zip(offsets, data.shape))]
        data.copy_(piece.to(data.dtype))
        covered.add(base.data_ptr())
    missed = [n for n, p in model.named_parameters() if p.data_ptr() not in covered]
    if missed:
        raise RuntimeError(f"layout-independent initialization: parameters outside the sharded state dict: {missed[:3]}")
    return drawn
