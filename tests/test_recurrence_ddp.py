"""Gradient synchronisation when k changes every step (randomized recurrence).

``looping.ddp.GradReadyCounts`` keeps the grad-ready counts each (schedule, backprop depth)
was learned with and re-installs them when it comes back, so only the first step with a new
k learns (and synchronises after the backward pass); afterwards every collective is again
launched from the gradient hooks, on complete gradients.  One process observes *when* each
collective starts (the bucket's gradient at launch must equal the final one); the DP=2
end-to-end checks are in test_recurrence_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from looping_util import batch, build

RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def _ddp(k: int, n=None, bucket_size=None, **extra):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model = build(4, f"1-2x{k}-1", **extra)
    model.set_loop_backprop_depth(n)
    cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True, bucket_size=bucket_size)
    ddp = DistributedDataParallel(config=model.config, ddp_config=cfg, module=model)
    launches = []
    for g in ddp.bucket_groups:
        original = g.start_grad_sync

        def spy(*a, _g=g, _orig=original, **kw):
            launches.append((_g, [b.grad_data.clone() for b in _g.buckets], _g.is_first_batch))
            return _orig(*a, **kw)

        g.start_grad_sync = spy
    return model, ddp, launches


def _step(ddp, launches):
    launches.clear()
    ddp.zero_grad_buffer()
    tokens, pos = batch(5)
    ddp(tokens, pos, None, labels=torch.roll(tokens, -1, 1)).sum().backward()
    ddp.finish_grad_sync()
    complete = all(torch.equal(s, b.grad_data) for g, snaps, _ in launches for s, b in zip(snaps, g.buckets))
    overlapped = bool(launches) and not any(first for _, _, first in launches)
    return {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}, complete, overlapped


@pytest.mark.parametrize("bucket_size", [None, 1])
def test_counts_are_learned_once_per_k_and_reused(dist_1rank, bucket_size):
    """k drawn per step with recomputation and truncation: each step's collectives start on
    complete gradients, a k seen before synchronises overlapped (no learning step), and the
    gradients equal a DDP built fresh at that k."""
    from megatron_growloop.looping.ddp import GradReadyCounts

    model, ddp, launches = _ddp(3, n=2, bucket_size=bucket_size, **RECOMPUTE)
    counts = GradReadyCounts()
    seen = set()
    for k in [3, 5, 3, 2, 5, 5, 2, 3]:
        model.set_loop_repeats(k)
        learns = counts.select([ddp], (tuple(model.schedule), 2))
        assert learns == (k not in seen)
        grads, complete, overlapped = _step(ddp, launches)
        assert complete, k
        assert overlapped == (k in seen), k
        seen.add(k)
        fresh_model, fresh, fresh_launches = _ddp(k, n=2, bucket_size=bucket_size, **RECOMPUTE)
        fresh_model.load_state_dict(model.state_dict())
        ref, _, _ = _step(fresh, fresh_launches)
        assert all(torch.equal(grads[n], ref[n]) for n in grads), k


def test_reused_counts_are_those_of_the_k(dist_1rank):
    """Control: the counts differ between k under recomputation, so installing another k's
    counts would break the synchronisation (megatron-core asserts), as the stale-counts tests of
    test_looping_ddp.py show."""
    from megatron_growloop.looping.ddp import GradReadyCounts

    model, ddp, launches = _ddp(3, **RECOMPUTE)
    counts = GradReadyCounts()
    counts.select([ddp], "k3")
    _step(ddp, launches)
    model.set_loop_repeats(2)
    counts.select([ddp], "k2")
    _step(ddp, launches)
    model.set_loop_repeats(3)
    counts.select([ddp], "k2")  # a wrong key: the k=2 counts at k=3 launch early or never
    with pytest.raises(AssertionError, match="Communication call has not been issued"):
        _step(ddp, launches)


def test_without_recomputation_counts_do_not_depend_on_k_or_truncation(dist_1rank):
    """Why the trainer keys the counts by nothing without recomputation: every parameter's hook
    fires once per step at any k, truncated or not (the zero-gradient join keeps the prelude
    in the graph)."""
    golden = []
    for k, n in [(2, None), (5, None), (5, 2), (3, 1)]:
        _, ddp, launches = _ddp(k, n=n)
        _step(ddp, launches)
        _step(ddp, launches)  # recorded at the start of this step
        golden.append({name: g.golden_per_param_grad_ready_counts[p] for g in ddp.bucket_groups
                       for name, p in ddp.module.named_parameters() if p in g.golden_per_param_grad_ready_counts})
    assert all(c == golden[0] for c in golden) and set(golden[0].values()) == {1}
