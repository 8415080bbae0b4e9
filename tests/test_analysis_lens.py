"""Logit lens and tuned lens on tiny random models (in process, CPU, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import analysis_models as tiny
from megatron_growloop.analysis.lens import (
    TunedLens,
    early_exit_accuracy,
    early_exit_choice_loglikelihoods,
    fit_tuned_lens,
    lens_analysis,
    lens_metrics,
)


@pytest.fixture(scope="module")
def am(dist_1rank):
    return tiny.analysis_model(tiny.build(4, loop="1-2x2-1", seed=2), "loop")


@pytest.fixture(scope="module")
def prompts():
    return tiny.prompt_set(3, seq_len=40, seed=0)


@pytest.fixture(scope="module")
def held_out():
    return tiny.prompt_set(6, seq_len=40, seed=1)


def test_untrained_tuned_lens_is_the_logit_lens(am, prompts):
    """Zero-initialised translators are the identity: every metric equals the logit lens exactly,
    and the lens at the last application reproduces the model's own output (KL 0, overlap 1)."""
    lens = TunedLens.for_model(am)
    a, b = lens_metrics(am, lens, prompts), lens_metrics(am, None, prompts)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert b["kl"][-1] == 0.0 and b["top"][-1] == 1.0 and b["top1"][-1] == 1.0
    assert b["kl"][0] > 0.01  # earlier positions do differ from the final distribution


def test_lens_trained_on_the_last_layer_reaches_zero_kl(am, held_out, prompts):
    """Starting from a randomly perturbed translator at the last application, training on the KL to
    the final distribution brings it back to KL ~ 0; training also lowers the KL at earlier positions."""
    lens = TunedLens.for_model(am)
    torch.manual_seed(0)
    with torch.no_grad():
        lens.translators[-1].weight.normal_(0, 0.05)
        lens.translators[-1].bias.normal_(0, 0.05)
    before = lens_metrics(am, lens, prompts)["kl"]
    assert before[-1] > 1e-2
    logit = lens_metrics(am, None, prompts)["kl"]
    fit_tuned_lens(am, held_out, steps=100, batch_size=3, optimizer="adam", lr=3e-2, weight_decay=0.0, lens=lens)
    after = lens_metrics(am, lens, prompts)["kl"]  # measured on prompts the lens was not trained on
    assert after[-1] < 1e-3 and after[-1] < 0.02 * before[-1]
    assert np.all(after[:-1] < logit[:-1])
    hist = np.asarray(lens.meta["fit"]["loss_history"])
    assert hist.shape == (100, am.depth) and hist[-1].mean() < hist[0].mean()


def test_lens_save_and_load(am, prompts, tmp_path):
    """A saved lens (tuned-lens layout: params.pt + config.json) loads back to the same numbers."""
    lens = TunedLens.for_model(am)
    with torch.no_grad():
        for t in lens.translators:
            t.weight.normal_(0, 0.01)
    path = lens.save(tmp_path / "lens")
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["config.json", "params.pt"]
    sd = torch.load(tmp_path / "lens" / "params.pt")
    assert set(sd) == {f"{k}.{w}" for k in range(am.depth) for w in ("weight", "bias")}
    again = TunedLens.load(path)
    a, b = lens_metrics(am, lens, prompts), lens_metrics(am, again, prompts)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_early_exit_at_the_last_application_is_the_models_own_scoring(dist_1rank):
    """Early-exit log-likelihoods at the last position (identity lens) equal the evaluation engine's
    multiple-choice scores, and accuracies use lm-eval's acc / acc_norm."""
    from megatron_growloop.analysis.access import AnalysisModel
    from megatron_growloop.data.tokenizer import ByteTokenizer
    from megatron_growloop.eval import primitives
    from megatron_growloop.eval.engine import LogProbEngine
    from megatron_growloop.eval.scoring import evaluate_items, score_choices

    model = tiny.build(4, seed=4)
    tok = ByteTokenizer()
    am = AnalysisModel(model, tok)
    engine = LogProbEngine(model, tok)
    items = primitives.generate_task("va_basic_d0", 3, num_fewshot=1)
    ll = early_exit_choice_loglikelihoods(am, None, items, engine.encode_pair)
    assert ll.shape == (4, 3, 5)
    np.testing.assert_allclose(ll[-1], np.asarray(score_choices(engine, None, items)), rtol=0, atol=1e-4)
    acc = early_exit_accuracy(ll, items)
    ref, _ = evaluate_items(engine, items)
    assert acc["acc"][-1] == ref.acc and acc["acc_norm"][-1] == ref.acc_norm
    res, lens = lens_analysis(am, tiny.prompt_set(2, 30), fit_prompts=tiny.prompt_set(2, 30, seed=3),
                              fit_kwargs={"steps": 2, "batch_size": 2}, task="va_basic_d0", task_items=3,
                              num_fewshot=1)
    assert res.arrays["logit_acc_norm"][-1] == ref.acc_norm
    assert res.scalars["noise_floor"]["final_position_kl"] < 1e-6
