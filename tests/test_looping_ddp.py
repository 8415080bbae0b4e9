"""Gradient synchronisation of parameters applied several times per step when k changes.

megatron-core's DDP with ``overlap_grad_reduce`` learns per-parameter grad-ready counts in
its first batch and launches a bucket's collective once the counts match.  With full
activation recomputation the counts grow with k, so after a change of k the bucket groups
must re-learn them (``Trainer.set_loop_repeats`` / ``looping.ddp.reset_grad_ready_counts``).

One process (DP=1) suffices to observe *when* each collective is launched: we record the
bucket's gradient buffer at launch time; correct synchronisation launches only once the
buffer holds the complete gradient.  The DP=2 end-to-end check is in test_looping_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from looping_util import batch, build


def _ddp(k: int, bucket_size=None):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model = build(4, f"1-2x{k}-1", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True, bucket_size=bucket_size)
    ddp = DistributedDataParallel(config=model.config, ddp_config=cfg, module=model)
    launches = []
    for g in ddp.bucket_groups:
        original = g.start_grad_sync

        def spy(*a, _g=g, _orig=original, **kw):
            if _g.grad_reduce_handle is None or not _g.is_first_batch:
                launches.append((_g, [b.grad_data.clone() for b in _g.buckets]))
            return _orig(*a, **kw)

        g.start_grad_sync = spy
    return model, ddp, launches


def _step(ddp, launches):
    """One training step's backward + grad sync; returns the final grads and whether every
    collective was launched on the complete gradient."""
    launches.clear()
    ddp.zero_grad_buffer()
    tokens, pos = batch(5)
    ddp(tokens, pos, None, labels=torch.roll(tokens, -1, 1)).sum().backward()
    ddp.finish_grad_sync()
    complete = all(
        torch.equal(snap, b.grad_data) for g, snaps in launches for snap, b in zip(snaps, g.buckets)
    )
    grads = {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}
    return grads, complete, len(launches)


def _fresh_grads(k: int):
    _, ddp, launches = _ddp(k)
    grads, complete, n = _step(ddp, launches)
    assert complete and n == len(ddp.bucket_groups)
    return grads


@pytest.mark.parametrize("k0,k1,bucket_size", [(3, 2, None), (2, 3, None), (2, 3, 1)])
def test_reset_after_k_change_matches_fresh_ddp(dist_1rank, k0, k1, bucket_size):
    """After set_loop_repeats + reset, collectives start on complete gradients and the
    gradients equal those of a DDP built fresh at the new k."""
    from megatron_growloop.looping.ddp import reset_grad_ready_counts

    model, ddp, launches = _ddp(k0, bucket_size)
    for _ in range(2):  # first batch learns the counts, second uses them
        _, complete, _ = _step(ddp, launches)
        assert complete
    model.set_loop_repeats(k1)
    assert reset_grad_ready_counts([ddp]) == len(ddp.bucket_groups) >= 1
    for _ in range(2):
        grads, complete, n = _step(ddp, launches)
        assert complete and n == len(ddp.bucket_groups)
    fresh = _fresh_grads(k1)
    assert max(float((grads[n] - fresh[n]).abs().max()) for n in grads) == 0.0


def test_stale_counts_break_sync_when_k_decreases(dist_1rank):
    """Control: without the reset, fewer hook firings never match the golden counts and
    megatron-core refuses to finish the sync."""
    model, ddp, launches = _ddp(3)
    _step(ddp, launches)
    _step(ddp, launches)
    model.set_loop_repeats(2)
    with pytest.raises(AssertionError, match="Communication call has not been issued"):
        _step(ddp, launches)


def test_stale_counts_launch_early_when_k_increases(dist_1rank):
    """Control: without the reset, more hook firings reach the golden counts early and the
    collective starts before the last contributions are accumulated (wrong on DP>1).
    (Small buckets: one bucket per parameter; with one big bucket the counts never match and
    the sync asserts, as in the decreasing case.)"""
    model, ddp, launches = _ddp(2, bucket_size=1)
    assert len(ddp.bucket_groups) > 4
    _step(ddp, launches)
    _step(ddp, launches)
    model.set_loop_repeats(3)
    _, complete, n = _step(ddp, launches)
    assert n >= 1 and not complete


def test_hook_firings_grow_with_k_only_under_recompute(dist_1rank):
    """Why the reset is needed: golden counts of a block layer's weight equal k with
    per-application recomputation, and 1 without recomputation."""
    _, ddp, launches = _ddp(3)
    _step(ddp, launches)
    _step(ddp, launches)  # golden counts are recorded at the start of this step
    golden = {p: c for g in ddp.bucket_groups for p, c in g.golden_per_param_grad_ready_counts.items()}
    model = ddp.module
    w_block = model.decoder.layers[1].self_attention.linear_qkv.weight
    w_prelude = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert golden[w_block] == 3 and golden[w_prelude] == 1
