"""Work-arounds for megatron-core 0.16.1 paths that only break without TE/apex fused Adam.

With Transformer Engine or apex installed (the usual GPU setup) megatron-core's distributed
optimizer uses FusedAdam, which keeps the step count in the param groups.  Without them it
falls back to ``torch.optim.AdamW``, which keeps a per-parameter ``step`` tensor, and loading a
``fully_reshardable`` checkpoint then fails in
``DistributedOptimizer._set_main_param_and_optimizer_states`` (it copies every state key,
``step`` included, from a dict that deliberately omits ``step``; ``load_state_dict`` has
already set ``step`` from the param groups -- as one tensor object shared by all parameters,
which torch's AdamW would then increment once per parameter).  :func:`apply` makes that copy
skip the missing key and gives each parameter its own step tensor.  Idempotent; a no-op when megatron-core uses a fused optimizer.
"""

from __future__ import annotations

_APPLIED = False


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.optimizer import distrib_optimizer as dopt

    _APPLIED = True
    if dopt.HAVE_APEX_OR_TE:
        return
    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            missing = [k for k in state if k not in tensors and k != "param"]
            if missing == ["step"]:
                # load_state_dict gave every parameter the *same* step tensor object; torch's
                # AdamW increments it in place per parameter, so give each its own copy.
                state["step"] = state["step"].detach().clone()
                main_param.detach().copy_(tensors["param"])
                for k, v in tensors.items():
                    if k != "param":
                        state[k].copy_(v)
                return
        return original(self, model_param, tensors)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
