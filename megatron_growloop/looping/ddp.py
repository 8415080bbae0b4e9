"""Gradient synchronisation for parameters applied several times per step.

megatron-core's ``DistributedDataParallel`` registers a hook on every parameter's
gradient accumulator.  How often it fires per backward pass depends on the
schedule: once when a layer's applications share one autograd graph, but once per
recomputed segment with full activation recomputation (re-entrant checkpointing
runs a separate backward per segment) -- so with recomputation the count grows
with k.

With ``overlap_grad_reduce`` each bucket group (``param_and_grad_buffer.
_ParamAndGradBucketGroup``) learns these counts in the first batch
(``golden_per_param_grad_ready_counts``) and afterwards launches a bucket's
all-reduce / reduce-scatter as soon as the counts equal the golden ones.  When k
(or the recompute layout) changes, stale golden counts either never match (fewer
firings: ``finish_grad_sync`` asserts "Communication call has not been issued")
or match early (more firings: the collective starts before the last
contributions are accumulated -- silently wrong gradients).

:func:`reset_grad_ready_counts` puts every bucket group back into first-batch
mode so the next step re-learns the counts; call it between steps whenever the
schedule changes.  Without ``overlap_grad_reduce`` the counts are not used and
the reset is harmless.
"""

from __future__ import annotations

from typing import Iterable


def bucket_groups(ddp_modules: Iterable) -> list:
    groups = []
    for m in ddp_modules:
        groups.extend(getattr(m, "bucket_groups", []) or [])
        groups.extend(getattr(m, "expert_parallel_bucket_groups", []) or [])
    return groups


def reset_grad_ready_counts(ddp_modules: Iterable) -> int:
    """Make the DDP bucket groups re-learn their per-parameter grad-ready counts.

    Must be called between training steps (no collective in flight).  Returns the
    number of bucket groups reset.
    """
    groups = bucket_groups(ddp_modules)
    for g in groups:
        if getattr(g, "grad_reduce_handle", None) is not None:
            raise RuntimeError("reset_grad_ready_counts called while a gradient reduction is in flight")
        g.is_first_batch = True
        g.golden_per_param_grad_ready_counts = {}
        g.per_param_grad_ready_counts = {}
    return len(groups)
