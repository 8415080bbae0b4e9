"""Optimizer state that megatron-core's own methods do not cover: torch Adam under the
DistributedOptimizer, and the distributed optimizer's state without gathering it.

megatron-core 0.16.1 assumes Transformer Engine/Apex FusedAdam (step kept in the param
groups).  With ``torch.optim.Adam`` underneath -- CPU, or a GPU without TE/Apex -- two
things break when a distributed-optimizer checkpoint (``fully_reshardable`` or
``dp_reshardable``) is loaded (resume, and growth through a checkpoint):

* ``DistributedOptimizer.state_dict()`` (called by ``sharded_state_dict(..., is_loading=True)``)
  asserts that every parameter already has a ``step``; a freshly built optimizer has none;
* ``load_parameter_state_from_fully_reshardable`` copies *every* inner state entry, ``step``
  included, from tensors that carry no ``step`` (``KeyError``), and ``load_state_dict`` hands
  all parameters one shared ``step`` tensor that torch Adam then increments once per
  parameter per step (wrong bias correction after resume).

Both helpers are no-ops when megatron-core uses a fused optimizer.

:func:`local_optimizer_state` / :func:`load_local_optimizer_state` give growth the
distributed optimizer's state as this rank's *shards* of the model-space tensors
(``(model param, range within it) -> fp32 param, exp_avg, exp_avg_sq``) without the
all-gather over data-parallel ranks that every megatron model-space format does at 0.16.1
(``fully_reshardable`` gathers everything; ``fully_sharded_model_space`` is refused by
``ShardedTensor.validate_metadata_integrity``).  They use the DistributedOptimizer's
``gbuf_ranges`` and ``_get/_set_main_param_and_optimizer_states``, the same internals its
model-space formats use (named in ``tests/test_megatron_private_hooks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.optimizer import distrib_optimizer as _do

ADAM_STATES = ("param", "exp_avg", "exp_avg_sq")


def ensure_optimizer_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer zero Adam state so it can be loaded into.

    Without Transformer Engine/Apex, megatron-core's ``DistributedOptimizer`` wraps
    ``torch.optim.Adam`` and its ``state_dict()`` (called by ``sharded_state_dict(...,
    is_loading=True)``) asserts that every parameter has a ``step``; a fresh optimizer has
    none.  Allocating the state (step 0, zero moments) leaves parameters untouched; loading
    then overwrites it in place.
    """

    if _do.HAVE_APEX_OR_TE or optimizer is None:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, _do.DistributedOptimizer) or not isinstance(inner, torch.optim.Adam):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["step"] = torch.tensor(0.0)
                    inner.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def load_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict`` that also works for a DistributedOptimizer over torch Adam.

    megatron-core 0.16.1 restores a DistributedOptimizer (``fully_reshardable`` or
    ``dp_reshardable``) by copying every entry of the inner state (including torch Adam's
    ``step``) from the loaded tensors, which carry no ``step`` -- a ``KeyError`` unless
    Transformer Engine/Apex FusedAdam is used.  Here the per-parameter ``step`` (already
    restored from the saved param groups) is set aside while the parameter state is copied
    in, and each parameter gets its own ``step`` tensor.
    """

    opts = getattr(optimizer, "chained_optimizers", None)
    if _do.HAVE_APEX_OR_TE or opts is None:
        optimizer.load_state_dict(state_dict)
        return
    for opt, sd in zip(opts, _per_optimizer(opts, state_dict)):
        if not (isinstance(opt, _do.DistributedOptimizer) and isinstance(sd, dict) and "param_state" in sd):
            opt.load_state_dict(sd)
            continue
        sd = dict(sd)
        param_state = sd.pop("param_state")
        kind = sd.pop("param_state_sharding_type")
        loaders = {
            "fully_reshardable": opt.load_parameter_state_from_fully_reshardable,
            "dp_reshardable": opt.load_parameter_state_from_dp_reshardable,
        }
        if kind not in loaders:
            raise NotImplementedError(f"distributed optimizer state of type {kind!r}")
        opt.load_state_dict(sd)  # param groups, step, grad scaler
        with torch.no_grad():  # dp_reshardable's loader copies into leaf params without it
            _without_steps(opt, lambda: loaders[kind](param_state))
    if len(opts) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()


def _per_optimizer(opts, state_dict) -> List[Any]:
    if len(opts) == 1:
        return [state_dict]
    return [v for _, v in sorted(state_dict.items())] if isinstance(state_dict, dict) else list(state_dict)


def _without_steps(opt, load_params: Callable[[], None]) -> None:
    """Run ``load_params`` with torch Adam's per-parameter ``step`` set aside (megatron copies
    every inner state entry and would look for a ``step`` the loaded tensors lack), then give
    every parameter its *own* step tensor: megatron hands all parameters one shared tensor,
    which torch Adam would increment once per parameter per step."""
    inner = opt.optimizer
    steps = {p: st.pop("step") for p, st in inner.state.items() if "step" in st}
    try:
        load_params()
    finally:
        for p, step in steps.items():
            inner.state[p]["step"] = step.detach().clone()


# ------------------------------------------------------------------------------ DP-local state
@dataclass
class LocalOptimizerState:
    """An optimizer's state for a growth step, without gathering over data-parallel ranks.

    ``common``: each chained optimizer's ``state_dict()`` (param groups, step, grad scaler).
    ``shards``: for a distributed optimizer, ``(chain index, sharded metadata of the model
    param, start, stop, {"param", "exp_avg", "exp_avg_sq": flat tensor})`` -- this rank's range
    of every parameter it owns.  ``sharded``: for other optimizers, their model-space sharded
    state dict (each rank holds its own TP/PP shard anyway)."""

    common: List[Dict[str, Any]] = field(default_factory=list)
    shards: List[Tuple[int, Any, int, int, Dict[str, torch.Tensor]]] = field(default_factory=list)
    sharded: Dict[Any, Any] = field(default_factory=dict)


def _param_metadata(model_sharded_state_dict) -> Dict[torch.Tensor, Any]:
    """Model parameter -> its ShardedTensor/ShardedTensorFactory (what megatron's model-space
    formats match optimizer state with)."""
    return {x.data: x for x in nested_values(model_sharded_state_dict)
            if isinstance(x, (ShardedTensor, ShardedTensorFactory))}


def _distopt_ranges(opt) -> Iterator[Tuple[torch.Tensor, int, int]]:
    """``(model param, start, stop)``: the range of each parameter this DP rank's shard holds."""
    for gbuf_range_maps in opt.gbuf_ranges:
        for per_bucket in gbuf_range_maps.values():
            for gbuf_range_map in per_bucket:
                for model_param, range_map in gbuf_range_map["param_map"].items():
                    r = range_map["param"]
                    yield model_param, r.start, r.end


def local_optimizer_state(optimizer, model_sharded_state_dict) -> LocalOptimizerState:
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    out = LocalOptimizerState(common=[opt.state_dict() for opt in opts])
    meta = _param_metadata(model_sharded_state_dict)
    for i, opt in enumerate(opts):
        if not isinstance(opt, _do.DistributedOptimizer):
            out.sharded[i] = opt.sharded_state_dict(model_sharded_state_dict)
            continue
        for model_param, start, stop in _distopt_ranges(opt):
            tensors = opt._get_main_param_and_optimizer_states(model_param)
            out.shards.append((i, meta[model_param], start, stop, {k: tensors[k] for k in ADAM_STATES}))
    return out


def local_optimizer_request(optimizer, model_view) -> LocalOptimizerState:
    """What the (new) optimizer asks for: the same structure, with the model metadata taken
    from ``model_view`` (growth's source view) and no tensors."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    out = LocalOptimizerState()
    meta = _param_metadata(model_view)
    for i, opt in enumerate(opts):
        if not isinstance(opt, _do.DistributedOptimizer):
            out.sharded[i] = opt.sharded_state_dict(model_view, is_loading=True)
            continue
        for model_param, start, stop in _distopt_ranges(opt):
            out.shards.append((i, meta[model_param], start, stop, {"model_param": model_param}))
    return out


def load_local_optimizer_state(optimizer, request: LocalOptimizerState, common: List[Dict[str, Any]],
                               fetch: Callable[[Any, str, int, int], torch.Tensor],
                               sharded: Dict[Any, Any]) -> None:
    """Fill ``optimizer`` from a transferred :class:`LocalOptimizerState`: ``common`` param groups,
    ``fetch(metadata, state, start, stop)`` for each shard of ``request``, ``sharded`` (loaded
    sharded state dicts) for the other optimizers."""
    ensure_optimizer_state(optimizer)
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    by_opt: Dict[int, List] = {}
    for i, meta, start, stop, extra in request.shards:
        by_opt.setdefault(i, []).append((extra["model_param"], meta, start, stop))
    for i, opt in enumerate(opts):
        if i in sharded:
            load_optimizer_state(opt, sharded[i])
            continue
        opt.load_state_dict(common[i])

        @torch.no_grad()  # as megatron's own load_parameter_state_from_* methods
        def set_states(opt=opt, shards=by_opt.get(i, [])):
            for model_param, meta, start, stop in shards:
                opt._set_main_param_and_optimizer_states(
                    model_param, {k: fetch(meta, k, start, stop) for k in ADAM_STATES})

        _without_steps(opt, set_states)
    if len(opts) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()
