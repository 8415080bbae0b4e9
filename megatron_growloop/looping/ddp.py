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


class GradReadyCounts:
    """The grad-ready counts of every schedule a run trains with, learned once each.

    With a k drawn afresh every step (randomized recurrence) a reset per change would make
    every such step learn its counts again -- and a learning step cannot overlap the
    collectives with the backward pass (megatron-core issues them in ``finish_grad_sync``).
    The counts are a deterministic function of what the step runs (schedule, backprop depth,
    recomputation), so :meth:`select` keeps the counts each *key* was seen with and
    re-installs them when the key comes back: one learning step per distinct key, afterwards
    the same overlapped synchronisation as with a fixed k.  Bucket groups learn in their
    first batch (``is_first_batch``) and record ``golden_per_param_grad_ready_counts`` in
    ``reset()`` at the next ``zero_grad_buffer()``; :meth:`select` runs between steps, before
    that call, and takes the counts of a just-finished learning step itself.

    Keys are compared with ``==``; an instance belongs to one DDP (build a new one when the
    model is rebuilt: the counts are keyed by parameter objects).
    """

    def __init__(self):
        self._learned: dict = {}
        self._key = None
        self._started = False

    def select(self, ddp_modules: Iterable, key) -> bool:
        """Make the bucket groups use the counts of ``key``; returns True when they will
        learn them in the coming step."""
        groups = bucket_groups(ddp_modules)
        if self._started and key == self._key:
            return any(g.is_first_batch for g in groups)
        if self._started and self._key not in self._learned:
            learned = [_finished_counts(g) for g in groups]
            if groups and all(c is not None for c in learned):
                self._learned[self._key] = learned
        self._key, self._started = key, True
        counts = self._learned.get(key)
        if counts is None:
            reset_grad_ready_counts(ddp_modules)
            return True
        for g, golden in zip(groups, counts):
            if getattr(g, "grad_reduce_handle", None) is not None:
                raise RuntimeError("GradReadyCounts.select called while a gradient reduction is in flight")
            g.golden_per_param_grad_ready_counts = golden
            g.per_param_grad_ready_counts = {}
            g.is_first_batch = False
        return False


def _finished_counts(group):
    """The golden counts ``group`` uses or has just learned (None when it has none)."""
    if not group.is_first_batch:
        return group.golden_per_param_grad_ready_counts
    counts = group.per_param_grad_ready_counts
    if counts and len(counts) == len(group.params):
        return dict(counts)
    return None
