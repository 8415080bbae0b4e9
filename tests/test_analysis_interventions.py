"""Interventions on tiny random models (in process, CPU, fp32): the effective-depth access layer,
depth score, local effects, norms, layer swaps and block repetition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import analysis_models as tiny
from megatron_growloop.analysis import depth_score, local_effects, residual_norms
from megatron_growloop.analysis.lens import lens_metrics
from megatron_growloop.analysis.swap import schedule_override, swapped_schedule

LOOP = "1-2x2-1"  # 4 unique layers, schedule [0, 1, 2, 1, 2, 3]


@pytest.fixture(scope="module")
def plain(dist_1rank):
    return tiny.analysis_model(tiny.build(4, seed=0), "plain")


@pytest.fixture(scope="module")
def looped(dist_1rank):
    return tiny.analysis_model(tiny.build(4, loop=LOOP, seed=1), "loop")


@pytest.fixture(scope="module")
def prompts():
    return tiny.prompt_set(3, seq_len=40)


def test_trace_records_every_application(looped, prompts):
    """The trace follows the schedule: one record per application, output = input + attn + mlp,
    trace logits = the model's forward, and re-running all applications from the embedding
    (the path every intervention uses) reproduces the forward bit for bit."""
    tokens, _, _ = next(prompts.batches(3))
    tr = looped.trace(tokens, sublayers=True, keep_kwargs=True)
    assert tr.depth == 6 == looped.depth
    for k in range(6):
        torch.testing.assert_close(tr.outputs[k], tr.inputs[k] + tr.attn[k] + tr.mlp[k], rtol=0, atol=1e-5)
        if k:
            assert torch.equal(tr.inputs[k], tr.outputs[k - 1])
    assert torch.equal(tr.logits, looped.logits(tokens))
    final = looped.resume(tr, 0, tr.inputs[0])
    assert torch.equal(looped.decode(final), tr.logits)
    # tied applications of one layer really are the same weights applied twice
    assert looped.schedule == [0, 1, 2, 1, 2, 3]


def test_null_interventions_have_zero_effect(plain, prompts):
    """Re-running every application without a change (the null intervention behind each noise
    floor) changes nothing: output and layer effects are exactly 0 in fp32."""
    ds = depth_score(plain, prompts, num_splits=2)
    assert ds.scalars["noise_floor"] == {"output": 0.0, "layer": 0.0}
    le = local_effects(plain, prompts, num_splits=2)
    assert le.scalars["noise_floor"] == 0.0
    # and real interventions do have effects (the test could fail)
    assert ds.arrays["output_effect"][:-1].min() > 0
    assert le.arrays["effect_max"][0, 1] > 0


def test_skipping_an_identity_layer_has_zero_effect(dist_1rank, prompts):
    """A layer whose output projections are zero computes the identity; skipping it (the skip
    intervention) or removing its (zero) contribution must have exactly zero effect everywhere."""
    model = tiny.build(4, seed=3)
    layer = model.decoder.layers[2]
    with torch.no_grad():
        layer.self_attention.linear_proj.weight.zero_()
        layer.mlp.linear_fc2.weight.zero_()
    am = tiny.analysis_model(model)
    for mode in ("future", "current"):
        ds = depth_score(am, prompts, mode=mode, num_splits=2)
        assert ds.arrays["output_effect"][2] == 0.0
        assert np.all(ds.arrays["layer_effect_max"][2] == 0.0)
        assert ds.arrays["output_effect"][1] > 0
        le = local_effects(am, prompts, mode=mode, num_splits=2)
        assert np.all(le.arrays["effect_max"][2] == 0.0)
        assert le.arrays["effect_max"][1, 3] > 0


def test_local_effect_matrix_is_strictly_upper_triangular(looped, prompts):
    """M[s, l] is only defined for l > s: the diagonal and below are exactly 0, above is not."""
    for mode in ("future", "current"):
        M = local_effects(looped, prompts, mode=mode, num_splits=3).arrays["effect_max"]
        assert M.shape == (6, 6)
        assert np.all(np.tril(M) == 0.0)
        assert np.all(M[np.triu_indices(6, 1)] > 0)


def test_future_mode_measures_only_later_tokens(plain, prompts):
    """In future mode the last application cannot affect later tokens (no layer left to carry the
    change): its output effect is 0, while in current mode it is the largest direct effect."""
    fut = depth_score(plain, prompts, mode="future", num_splits=2).arrays["output_effect"]
    cur = depth_score(plain, prompts, mode="current").arrays["output_effect"]
    assert fut[-1] == 0.0
    assert cur[-1] > 0.0


def test_looped_model_analyses_equal_its_unrolled_untied_copy(looped, prompts, dist_1rank):
    """Everything is indexed by effective depth: a Loop(1-2x2-1) model and a plain 6-layer model
    holding one untied copy per application give the same numbers (only the block boundaries
    drawn in the figures differ)."""
    unrolled = tiny.analysis_model(tiny.unrolled_copy(looped.model), "unrolled")
    tokens, _, _ = next(prompts.batches(3))
    assert torch.equal(looped.logits(tokens), unrolled.logits(tokens))
    a, b = depth_score(looped, prompts, num_splits=2), depth_score(unrolled, prompts, num_splits=2)
    for k in ("output_effect", "layer_effect_max", "output_effect_per_prompt"):
        np.testing.assert_allclose(a.arrays[k], b.arrays[k], rtol=0, atol=1e-6)
    assert a.scalars["depth_score"] == pytest.approx(b.scalars["depth_score"], abs=1e-6)
    np.testing.assert_allclose(local_effects(looped, prompts, num_splits=2).arrays["effect_max"],
                               local_effects(unrolled, prompts, num_splits=2).arrays["effect_max"], atol=1e-6)
    na, nb = residual_norms(looped, prompts), residual_norms(unrolled, prompts)
    for k in na.arrays:
        np.testing.assert_allclose(na.arrays[k], nb.arrays[k], rtol=1e-6, atol=1e-6)
    la, lb = lens_metrics(looped, None, prompts), lens_metrics(unrolled, None, prompts)
    for k in la:
        np.testing.assert_allclose(la[k], lb[k], rtol=1e-6, atol=1e-6)
    assert a.model["boundaries"] == [1, 3, 5] and b.model["boundaries"] == []


def test_norms_relations(plain, prompts):
    """Norm bookkeeping: the residual entering application k+1 is the one leaving k; ratios are
    ratios of the recorded means' ingredients (non-negative, finite)."""
    r = residual_norms(plain, prompts)
    A = r.arrays
    np.testing.assert_allclose(A["out_mean"][:-1], A["resid_mean"][1:], rtol=1e-6)
    assert r.scalars["final_resid_mean"] == pytest.approx(A["out_mean"][-1], rel=1e-6)
    for q in ("attn_rel", "mlp_rel", "layer_rel", "out_over_in"):
        assert np.all(np.isfinite(A[f"{q}_mean"])) and np.all(A[f"{q}_mean"] > 0)
        assert np.all(A[f"{q}_max"] >= A[f"{q}_mean"])


def test_swap_with_itself_and_repeat_once_reproduce_the_baseline(looped, prompts):
    """Swapping a layer with itself, or repeating a block with R=1, gives the baseline logits bit for
    bit; a real swap changes them, and the model's own schedule is restored afterwards."""
    model = looped.model
    tokens, _, _ = next(prompts.batches(3))
    ref = looped.logits(tokens)
    base = looped.schedule
    for i in range(looped.depth):
        with schedule_override(model, swapped_schedule(base, i, 1, other=i)):
            assert torch.equal(looped.logits(tokens), ref)
    for s in range(looped.depth - 1):
        model.set_repeat_blocks([f"{s}:{s + 2}:1"])
        try:
            assert torch.equal(looped.logits(tokens), ref)
        finally:
            model.set_repeat_blocks([])
    with schedule_override(model, swapped_schedule(base, 0, 1)):
        assert not torch.allclose(looped.logits(tokens), ref)
    assert torch.equal(looped.logits(tokens), ref)
    assert model.decoder.local_schedule == base


def test_layer_swap_sweep_scores_a_task(dist_1rank):
    """The swap sweep scores every swapped schedule with the eval package's engine: one value per
    position and width, the baseline equals a direct evaluation, the null swap is exact."""
    from megatron_growloop.analysis.access import AnalysisModel
    from megatron_growloop.analysis.swap import layer_swap, make_task
    from megatron_growloop.data.tokenizer import ByteTokenizer
    from megatron_growloop.eval.engine import LogProbEngine

    model = tiny.build(4, seed=5)
    am = AnalysisModel(model, ByteTokenizer(), label="bytes")
    task = make_task("va_basic_d0", 3, num_fewshot=1)
    res = layer_swap(am, task, widths=(1, 2), probe=torch.randint(0, 256, (2, 20)))
    assert res.scalars["noise_floor"] == 0.0
    assert list(res.arrays["positions_w1"]) == [0, 1, 2]
    assert list(res.arrays["positions_w2"]) == [0]
    direct = task.evaluate(LogProbEngine(model, ByteTokenizer()))
    assert res.scalars["baseline"] == direct
    assert am.schedule == [0, 1, 2, 3] and model.decoder.local_schedule == [0, 1, 2, 3]


def test_unsupported_layouts_are_refused(dist_1rank):
    """The analyses need the full residual stream on every rank: sequence parallelism is refused
    with a one-line UsageError (pipeline parallelism likewise, checked through parallel_state)."""
    from megatron_growloop.analysis.access import AnalysisModel
    from megatron_growloop.errors import UsageError

    model = tiny.build(2, seed=0)
    model.config.sequence_parallel = True
    try:
        with pytest.raises(UsageError, match="sequence-parallel"):
            AnalysisModel(model, vocab_size=tiny.VOCAB)
    finally:
        model.config.sequence_parallel = False
