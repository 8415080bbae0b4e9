"""Training-FLOPs arithmetic of a growing run (pure functions).

A growing run trains stage ``i`` (depth ``d_i``) for ``T_i`` iterations, so its
training FLOPs per token follow the depth; the baseline is a model trained at
the final depth on the same tokens.  Per token, training costs
``3 * (depth * layer_forward + head_forward)`` (:mod:`megatron_growloop.accounting`):
the *depth-proportional part* (layers incl. attention) shrinks with depth, the
LM head does not.  For PROP-alpha with depths ``iB`` the depth-proportional
ratio over the growth phase is ``sum_i T_i * i / (k * T)``, which is
``(2k+1)/(3k)`` for PROP-1 with unrounded budgets.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Dict, Optional

from ..accounting import ArchShape
from .plan import GrowthPlan


def prop_closed_form(num_stages: int, alpha: int) -> Fraction:
    """Depth-proportional compute ratio of PROP-alpha with depths ``iB``, ``i = 1..k`` (unrounded)."""
    k = num_stages
    num = sum(Fraction(i) ** (alpha + 1) for i in range(1, k + 1))
    den = k * sum(Fraction(i) ** alpha for i in range(1, k + 1))
    return num / den


def depth_proportional_ratio(plan: GrowthPlan, total_iters: Optional[int] = None) -> Fraction:
    """Layer-applications of the growing run / those of the final-depth baseline.

    Over the growth phase (``total_iters=None``) or over ``total_iters >= plan.grow_iters``
    iterations, the ones after the growth phase being at full depth (e.g. the cooldown).
    """
    total = plan.grow_iters if total_iters is None else int(total_iters)
    if total < plan.grow_iters:
        raise ValueError(f"total_iters {total} is shorter than the growth phase {plan.grow_iters}")
    depths = [plan.start_depth + i * plan.block_size for i in range(plan.num_stages)]
    layer_iters = sum(b * d for b, d in zip(plan.budgets, depths)) + (total - plan.grow_iters) * plan.final_depth
    return Fraction(layer_iters, total * plan.final_depth)


def planned_training_flops(plan: GrowthPlan, shape: ArchShape, seq_len: int, tokens_per_iter: int,
                           total_iters: int) -> Dict[str, float]:
    """Training FLOPs the plan will spend over ``total_iters`` vs. the final-depth baseline."""
    grown = 0.0
    depths = [plan.start_depth + i * plan.block_size for i in range(plan.num_stages)]
    for b, d in zip(plan.budgets, depths):
        grown += b * tokens_per_iter * shape.training_flops_per_token(d, seq_len)
    grown += (total_iters - plan.grow_iters) * tokens_per_iter * shape.training_flops_per_token(plan.final_depth, seq_len)
    baseline = total_iters * tokens_per_iter * shape.training_flops_per_token(plan.final_depth, seq_len)
    return {"grown": grown, "baseline": baseline, "ratio": grown / baseline}


def report(shape: ArchShape, seq_len: int, tokens: int, training_flops: float, final_depth: int,
           current_depth: Optional[int] = None) -> Dict[str, object]:
    """Compare the FLOPs a run actually spent on ``tokens`` with a final-depth model on the same tokens."""
    baseline = float(tokens) * shape.training_flops_per_token(final_depth, seq_len)
    head = float(tokens) * 3 * shape.head_forward_flops_per_token()
    ratio = training_flops / baseline if baseline else float("nan")
    layer_part_base = baseline - head
    layer_part = training_flops - head
    depth_ratio = layer_part / layer_part_base if layer_part_base else float("nan")
    if not tokens:
        text = "no tokens trained yet"
    else:
        text = (
            f"training FLOPs {training_flops:.4g} over {tokens:,} tokens = {ratio:.4f} x a model trained at the "
            f"final depth {final_depth} on the same tokens ({baseline:.4g}; saving {100 * (1 - ratio):.1f}%); "
            f"depth-proportional part (layers) {depth_ratio:.4f} x"
        )
    out = {
        "training_flops": training_flops,
        "baseline_flops": baseline,
        "ratio": ratio,
        "depth_proportional_ratio": depth_ratio,
        "tokens": tokens,
        "final_depth": final_depth,
        "text": text,
    }
    if current_depth is not None:
        out["current_depth"] = current_depth
    return out
