"""Truncated backprop through the recurrence (``--loop-backprop-depth n``).

The invariant: the gradients equal those of a hand-written reference -- the untied model of
copies whose input to the first of the last n applications of the block is detached --
summed over the copies, with and without full activation recomputation; the loss is the
untruncated model's; the early applications keep no activations and are not recomputed.
"""

from __future__ import annotations

import pytest
import torch

from looping_util import batch, build, loss_and_grads, max_abs_diff, summed_copy_grads, untied_copy

RECOMPUTE = {
    "none": {},
    "uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
}


def _detached_reference(model, cut: int):
    """Loss and grads of the untied copy with the input of layer ``cut`` detached (a plain
    autograd cut: the layers before it get no gradient from the loss)."""
    ref = untied_copy(model)

    def detach_input(module, args, kwargs):
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_()
        return args, kwargs

    ref.decoder.layers[cut].register_forward_pre_hook(detach_input, with_kwargs=True)
    loss, grads = loss_and_grads(ref)
    return loss, summed_copy_grads(grads, model.schedule)


@pytest.mark.parametrize("recompute", list(RECOMPUTE))
@pytest.mark.parametrize("loop,n", [("1-2x4-1", 2), ("1-2x3-1", 1), ("3x3", 1), ("2-1x5-1", 3)])
def test_truncated_grads_equal_detached_reference(dist_1rank, recompute, loop, n):
    model = build(4 if loop != "3x3" else 3, loop, **RECOMPUTE[recompute])
    model.set_loop_backprop_depth(n)
    spec = model.config.loop
    start, end = spec.no_grad_positions(n)
    loss, grads = loss_and_grads(model)
    ref_loss, ref_grads = _detached_reference(model, end)
    assert torch.equal(loss, ref_loss)
    # the reference's layers before the cut get no gradient at all; ours get exactly zero
    before_cut = {f"decoder.layers.{u}." for u in range(spec.prelude)}
    for name in set(grads) - set(ref_grads):
        assert any(name.startswith(p) for p in before_cut) or name.startswith("embedding."), name
        assert float(grads[name].abs().max()) == 0.0, name
        ref_grads[name] = torch.zeros_like(grads[name])
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    assert max_abs_diff(grads, ref_grads) <= 1e-6 * scale  # autograd sums the copies in another order
    # the forward is the untruncated model's
    model.set_loop_backprop_depth(None)
    full_loss, full_grads = loss_and_grads(model)
    assert torch.equal(full_loss, loss)
    assert max_abs_diff(full_grads, grads) > 0


def test_no_truncation_when_k_does_not_exceed_n(dist_1rank):
    model = build(4, "1-2x2-1")
    _, full = loss_and_grads(model)
    model.set_loop_backprop_depth(2)
    assert model.config.no_grad_positions() is None and model.backward_depth == model.effective_depth
    _, same = loss_and_grads(model)
    assert max_abs_diff(full, same) == 0.0


def _saved_bytes(model) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    tokens, pos = batch(0)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, pos, None, labels=torch.roll(tokens, -1, 1)).sum()
    return sum(seen.values())


def test_early_applications_keep_no_activations(dist_1rank):
    """Activation memory with k=5, n=2 equals that of k=2 without truncation: the three
    early applications keep nothing for the backward pass."""
    model = build(4, "1-2x5-1")
    model.set_loop_backprop_depth(2)
    truncated = _saved_bytes(model)
    model.set_loop_backprop_depth(None)
    full = _saved_bytes(model)
    model.set_loop_repeats(2)
    k2 = _saved_bytes(model)
    assert truncated == k2 < full


@pytest.mark.parametrize("recompute", ["uniform", "block"])
def test_recomputation_does_not_rerun_the_no_grad_applications(dist_1rank, recompute):
    """With full recomputation the backward pass re-runs only applications with autograd."""
    model = build(4, "1-2x4-1", **RECOMPUTE[recompute])
    model.set_loop_backprop_depth(1)
    calls = []
    model.decoder.register_application_hook(lambda call: calls.append(call.position))
    loss_and_grads(model)
    start, end = model.config.no_grad_positions()
    counts = {p: calls.count(p) for p in range(model.effective_depth)}
    assert all(counts[p] == 1 for p in range(start, end)), counts
    recomputed = {p for p, c in counts.items() if c == 2}
    assert recomputed and recomputed.isdisjoint(range(start, end))


def test_backprop_depth_needs_a_loop(dist_1rank):
    from megatron_growloop.errors import UsageError

    with pytest.raises(UsageError, match="needs a looped model"):
        build(4).set_loop_backprop_depth(2)
