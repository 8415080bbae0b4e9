"""A looped model is an ordinary model with a schedule: it must compute exactly what the
unrolled, untied model with copied layers computes, and its shared parameters must get
the sum of the copies' gradients (fp32, CPU, one process)."""

from __future__ import annotations

import pytest
import torch

from looping_util import build, loss_and_grads, max_abs_diff, summed_copy_grads, untied_copy

TOL = 2e-6


def _check_against_untied(model, **untied_extra):
    """Forward of ``model`` equals its untied copy; tied grads equal summed copy grads."""
    untied = untied_copy(model, **untied_extra)
    assert untied.effective_depth == model.effective_depth == len(model.schedule)
    loss_t, grads_t = loss_and_grads(model)
    loss_u, grads_u = loss_and_grads(untied)
    assert torch.allclose(loss_t, loss_u, rtol=0, atol=TOL), float((loss_t - loss_u).abs().max())
    summed = summed_copy_grads(grads_u, model.schedule)
    diff = max_abs_diff(grads_t, summed)
    scale = max(float(g.abs().max()) for g in summed.values())
    assert diff <= 1e-5 * scale, (diff, scale)
    return loss_t, grads_t


@pytest.mark.parametrize("loop", ["1-2x3-1", "2x3", "4-4x4-4"])
def test_loop_equals_untied_copies(dist_1rank, loop):
    """Loop(e-L×k-d) forward == untied depth e+L·k+d model of copies; tied grad == Σ copy grads."""
    from megatron_growloop.looping.spec import LoopSpec

    spec = LoopSpec.parse(loop)
    model = build(spec.unique_layers, loop)
    assert model.effective_depth == spec.effective_depth
    # parameters are truly shared: one tensor per unique layer
    assert len(model.decoder.layers) == spec.unique_layers
    _check_against_untied(model)


@pytest.mark.parametrize(
    "method,num", [("uniform", 1), ("uniform", 2), ("block", 3), ("block", 100)]
)
def test_loop_with_full_recompute_equals_untied(dist_1rank, method, num):
    """Full activation recomputation re-runs the *scheduled* applications in backward:
    same loss and same (summed) gradients as the untied model without recomputation."""
    model = build(4, "1-2x3-1", recompute_granularity="full", recompute_method=method, recompute_num_layers=num)
    loss_r, grads_r = _check_against_untied(model)
    plain = build(4, "1-2x3-1")
    loss_p, grads_p = loss_and_grads(plain)
    assert torch.equal(loss_r, loss_p)
    assert max_abs_diff(grads_r, grads_p) <= 1e-7


def test_uniform_recompute_needs_divisible_applications(dist_1rank):
    """Uniform recomputation chunks applications; a chunk size that does not divide them is a
    usage error (megatron-core would index past the last application)."""
    from megatron_growloop.errors import UsageError

    model = build(4, "1-2x3-1", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3)
    with pytest.raises(UsageError, match="recompute-num-layers 3"):
        loss_and_grads(model)


def test_k1_equals_plain_model(dist_1rank):
    """Loop(e-L×1-d) is the plain model, and so is a k=3 model switched to k=1."""
    plain = build(4)
    looped1 = build(4, "1-2x1-1")
    looped3 = build(4, "1-2x3-1")
    assert looped1.schedule == plain.schedule == [0, 1, 2, 3]
    lp, gp = loss_and_grads(plain)
    l1, g1 = loss_and_grads(looped1)
    assert torch.equal(lp, l1) and max_abs_diff(gp, g1) == 0.0
    looped3.set_loop_repeats(1)
    assert looped3.effective_depth == 4
    l3, g3 = loss_and_grads(looped3)
    assert torch.equal(lp, l3) and max_abs_diff(gp, g3) == 0.0
    looped3.set_loop_repeats(3)
    assert looped3.effective_depth == 8
    assert not torch.equal(loss_and_grads(looped3)[0], lp)


def test_repeat_block_r1_is_identity(dist_1rank):
    """--repeat-block S:E:1 leaves any model unchanged."""
    model = build(4)
    base = loss_and_grads(model)[0]
    model.set_repeat_blocks(["1:3:1"])
    assert model.schedule == [0, 1, 2, 3]
    assert torch.equal(loss_and_grads(model)[0], base)


@pytest.mark.parametrize(
    "num_layers,loop,block,schedule",
    [
        (4, None, "1:3:2", [0, 1, 2, 1, 2, 3]),
        (4, None, "0:4:3", [0, 1, 2, 3] * 3),
        # positions refer to the effective-depth axis of a looped model
        (4, "1-2x2-1", "0:2:2", [0, 1, 0, 1, 2, 1, 2, 3]),
        (4, "1-2x2-1", "1:5:2", [0, 1, 2, 1, 2, 1, 2, 1, 2, 3]),
    ],
)
def test_repeat_block_r2_equals_duplicated_model(dist_1rank, num_layers, loop, block, schedule):
    """--repeat-block S:E:R equals the explicitly duplicated model (forward and gradients)."""
    model = build(num_layers, loop)
    model.set_repeat_blocks([block])
    assert model.schedule == schedule
    _check_against_untied(model)


def test_repeat_block_outside_model_is_rejected_and_keeps_schedule(dist_1rank):
    from megatron_growloop.errors import UsageError

    model = build(4, "1-2x2-1")
    with pytest.raises(UsageError, match="outside the model"):
        model.set_repeat_blocks(["5:7:2"])
    assert model.schedule == [0, 1, 2, 1, 2, 3]


def test_looped_model_keeps_ordinary_checkpoint_keys(dist_1rank):
    """Checkpoint keys of Loop(1-2x3-1) are those of a plain 4-layer model (layer axis = 4)."""
    looped, plain = build(4, "1-2x3-1"), build(4)
    ks = {k: (v.key, tuple(v.global_shape)) for k, v in looped.sharded_state_dict().items() if hasattr(v, "global_shape")}
    kp = {k: (v.key, tuple(v.global_shape)) for k, v in plain.sharded_state_dict().items() if hasattr(v, "global_shape")}
    assert ks == kp
    assert ks["decoder.layers.1.self_attention.linear_qkv.weight"][1][0] == 4
    assert sum(p.numel() for p in looped.parameters()) == sum(p.numel() for p in plain.parameters())
