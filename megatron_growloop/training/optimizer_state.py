"""Loading Adam state into megatron-core's DistributedOptimizer without TE/Apex (torch Adam).

megatron-core 0.16.1 assumes Transformer Engine/Apex FusedAdam (step kept in the param
groups).  With ``torch.optim.Adam`` underneath -- CPU, or a GPU without TE/Apex -- two
things break when a ``fully_reshardable`` optimizer checkpoint is loaded (resume, and
every growth step):

* ``DistributedOptimizer.state_dict()`` (called by ``sharded_state_dict(..., is_loading=True)``)
  asserts that every parameter already has a ``step``; a freshly built optimizer has none;
* ``load_parameter_state_from_fully_reshardable`` copies *every* inner state entry, ``step``
  included, from tensors that carry no ``step`` (``KeyError``), and ``load_state_dict`` hands
  all parameters one shared ``step`` tensor that torch Adam then increments once per
  parameter per step (wrong bias correction after resume).

Both helpers are no-ops when megatron-core uses a fused optimizer.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import distrib_optimizer as _do


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

    megatron-core 0.16.1 restores a ``fully_reshardable`` DistributedOptimizer by copying
    every entry of the inner state (including torch Adam's ``step``) from the loaded
    tensors, which carry no ``step`` -- a ``KeyError`` unless Transformer Engine/Apex
    FusedAdam is used.  Here the per-parameter ``step`` (already restored from the saved
    param groups) is set aside while the parameter state is copied in, and each parameter
    gets its own ``step`` tensor.
    """

    opts = getattr(optimizer, "chained_optimizers", None)
    if _do.HAVE_APEX_OR_TE or opts is None:
        optimizer.load_state_dict(state_dict)
        return
    if len(opts) == 1:
        states = [state_dict]
    else:
        states = [v for _, v in sorted(state_dict.items())] if isinstance(state_dict, dict) else list(state_dict)
    for opt, sd in zip(opts, states):
        if not (isinstance(opt, _do.DistributedOptimizer) and isinstance(sd, dict)
                and sd.get("param_state_sharding_type") == "fully_reshardable"):
            opt.load_state_dict(sd)
            continue
        sd = dict(sd)
        param_state = sd.pop("param_state")
        sd.pop("param_state_sharding_type")
        opt.load_state_dict(sd)  # param groups, step, grad scaler
        inner = opt.optimizer
        steps = {p: st.pop("step") for p, st in inner.state.items() if "step" in st}
        try:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            # megatron hands every parameter the *same* step tensor, which torch Adam then
            # increments once per parameter per step; give each its own copy.
            for p, step in steps.items():
                inner.state[p]["step"] = step.detach().clone()
    if len(opts) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()
