"""The planner with randomized recurrence and truncated backprop (``--loop-repeats-dist``,
``--loop-backprop-depth``): memory is sized at the largest k with only the applications that run
with autograd keeping activations (measured against the tensors autograd saves), FLOPs and step
time are expectations over the exact law of k (checked against the sampler and the trainer's
accounting), and the CLI reports it."""

from __future__ import annotations

import pytest
import torch

from megatron_growloop.looping.recurrence import repeats_pmf, sample_repeats, settings_from_flags
from megatron_growloop.model.implementation import Implementation
from megatron_growloop.model.parallel import ParallelLayout
from megatron_growloop.plan import RunSetup, plan_run
from megatron_growloop.plan.cli import main as plan_main
from megatron_growloop.plan.compute import flops_per_step, step_time, training_flops
from megatron_growloop.plan.measure import measure_training_step
from plan_models import build, preset_arch

TOLERANCE = 0.05  # as tests/test_plan_activations.py


@pytest.mark.parametrize("dist,mean,max_repeats", [("uniform", 4, 7), ("uniform", 3, 4),
                                                   ("poisson-lognormal", 4, 16), ("poisson-lognormal", 3, 6)])
def test_pmf_is_the_law_of_the_sampler(dist, mean, max_repeats):
    """The planner's law of k is the one training draws from: 20000 draws of ``sample_repeats`` are
    within sampling noise of it (total variation), and it sums to 1 with the cap respected."""
    pmf = repeats_pmf(dist, mean, max_repeats)
    assert sum(pmf.values()) == pytest.approx(1.0, abs=1e-12) and max(pmf) <= max_repeats and min(pmf) >= 1
    g = torch.Generator().manual_seed(5)
    n, counts = 20000, {}
    for _ in range(n):
        k = sample_repeats(dist, mean, max_repeats, g)
        counts[k] = counts.get(k, 0) + 1
    tv = 0.5 * sum(abs(pmf.get(k, 0.0) - counts.get(k, 0) / n) for k in set(pmf) | set(counts))
    assert tv < 0.02, (pmf, counts)
    if dist == "uniform":
        assert sum(k * p for k, p in pmf.items()) == pytest.approx(mean)


def _setup(arch, recurrence=None, **impl):
    return RunSetup(arch, ParallelLayout(), Implementation(transformer_impl="local", dtype="fp32", **impl),
                    micro_batch_size=2, device="cpu", recurrence=recurrence, train_iters=50)


RECOMPUTE = {
    "none": {},
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block-2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
}


@pytest.mark.parametrize("recompute", sorted(RECOMPUTE))
def test_activation_memory_at_the_largest_k_with_truncation_matches_saved_tensors(dist_1rank, recompute):
    """Loop(1-2x3-1) with k ~ uniform(mean 3, max 5) and backprop depth 1: the worst step runs
    k = 5 with only prelude + 1 x block + coda with autograd.  The planner's activations equal the
    measured peak of saved bytes of that step within 5%; sized at the nominal k without the
    truncation, they would be far off (the test of the feature)."""
    rec = settings_from_flags("uniform", 3, 5, 1, loop_repeats=3, seed=1)
    arch = preset_arch("tiny", vocab=257, loop="1-2x3-1")
    model, _ = build(arch, **RECOMPUTE[recompute])
    model.set_loop_repeats(5)
    model.set_loop_backprop_depth(1)
    model.train()
    s = arch.seq_length
    tokens = torch.randint(0, 257, (2, s), generator=torch.Generator().manual_seed(0))
    measured = measure_training_step(model, tokens, torch.arange(s).expand(2, s), tokens, torch.ones(2, s))["peak"]
    (planned,) = plan_run(_setup(arch, rec, **RECOMPUTE[recompute])).stages
    assert planned.applications == 1 + 2 * 5 + 1
    assert abs(planned.activations - measured) <= TOLERANCE * measured, (planned.activations, measured)
    (nominal,) = plan_run(_setup(arch, None, **RECOMPUTE[recompute])).stages
    assert abs(nominal.activations - measured) > TOLERANCE * measured


def test_memory_without_truncation_is_that_of_the_largest_k():
    arch = preset_arch("tiny", vocab=257, loop="1-2x3-1")
    rec = settings_from_flags("poisson-lognormal", 3, 6, None, loop_repeats=3, seed=1)
    planned = plan_run(_setup(arch, rec)).stages[0]
    at_max = plan_run(_setup(arch.with_repeats(6))).stages[0]
    assert (planned.activations, planned.applications) == (at_max.activations, at_max.applications)


def test_pipeline_split_stays_that_of_the_nominal_k():
    """The trainer splits the pipeline once, at the nominal k; a step at another k keeps the split."""
    arch = preset_arch("tiny", vocab=257, loop="1-2x3-1")
    rec = settings_from_flags("uniform", 3, 5, 2, loop_repeats=3, seed=1)
    setup = RunSetup(arch, ParallelLayout(pp=2), Implementation(transformer_impl="local", dtype="fp32"),
                     micro_batch_size=2, device="cpu", recurrence=rec)
    worst = setup.worst_step()
    assert worst.stage_sizes() == setup.stage_sizes()
    assert sum(worst.stage_applications()) == 1 + 2 * 5 + 1
    assert sum(worst.stage_grad_applications()) == 1 + 2 * 2 + 1


def _trainer_step_flops(arch, k, n, tokens):
    loop = arch.loop.with_repeats(k)
    return tokens * arch.shape.training_flops_per_token(loop.effective_depth, arch.seq_length, loop.backward_depth(n))


def test_flops_per_step_is_the_expectation_of_the_trainers_accounting():
    """uniform: exactly the mean over its support of the trainer's per-step FLOPs (truncated
    backward included); poisson-lognormal: within 1% of the average over the run's own
    (seed, iteration) draws."""
    arch = preset_arch("tiny", vocab=257, loop="1-2x3-1")
    tokens = 2 * arch.seq_length
    uni = settings_from_flags("uniform", 3, 5, 2, loop_repeats=3, seed=1)
    expected = sum(_trainer_step_flops(arch, k, 2, tokens) for k in (1, 2, 3, 4, 5)) / 5
    assert flops_per_step(_setup(arch, uni)) == pytest.approx(expected, rel=1e-12)
    assert flops_per_step(_setup(arch, uni)) < flops_per_step(_setup(arch))  # truncation saves backward work
    pl = settings_from_flags("poisson-lognormal", 3, 8, 2, loop_repeats=3, seed=7)
    drawn = [_trainer_step_flops(arch, pl.repeats_at(i), 2, tokens) for i in range(4000)]
    assert flops_per_step(_setup(arch, pl)) == pytest.approx(sum(drawn) / len(drawn), rel=0.01)


def test_training_flops_follow_the_curricula():
    """With warm-ups of the mean k and of the backprop depth, the run's FLOPs are the sum over
    iterations of the expectation at that iteration's mean and depth."""
    arch = preset_arch("tiny", vocab=257, loop="1-2x4-1")
    rec = settings_from_flags("uniform", 4, None, 3, loop_repeats=4, seed=1, mean_warmup_iters=20,
                              backprop_depth_warmup_iters=10)
    tokens = 2 * arch.seq_length
    brute = 0.0
    for it in range(50):
        law = repeats_pmf("uniform", rec.mean.at(it), rec.max_repeats)
        brute += sum(p * _trainer_step_flops(arch, k, rec.backprop_depth_at(it), tokens) for k, p in law.items())
    setup = _setup(arch, rec)
    assert training_flops(setup, 50) == pytest.approx(brute, rel=1e-12)
    assert training_flops(setup, 50) < 50 * flops_per_step(setup)  # the warm-ups run shallower steps


def test_step_time_is_the_expectation_and_truncation_is_cheaper():
    arch = preset_arch("tiny", vocab=257, loop="1-2x3-1")
    full = settings_from_flags("uniform", 3, 5, None, loop_repeats=3, seed=1)
    cut = settings_from_flags("uniform", 3, 5, 1, loop_repeats=3, seed=1)
    plan = plan_run(_setup(arch, full))
    by_k = [step_time(_setup(arch, full).at_step(k, None), plan.cluster, plan.stages).seconds for k in range(1, 6)]
    assert plan.step.seconds == pytest.approx(sum(by_k) / 5, rel=1e-12)
    assert plan_run(_setup(arch, cut)).step.seconds < plan.step.seconds
    # fixed k, full backprop: the plan of the plain looped run
    fixed = settings_from_flags("fixed", None, None, None, loop_repeats=3, seed=1)
    a, b = plan_run(_setup(arch, fixed)), plan_run(_setup(arch))
    assert (a.step.seconds, a.flops_per_step, a.peak) == (b.step.seconds, b.flops_per_step, b.peak)


def test_cli_reports_the_recurrence_and_sizes_memory_at_the_cap():
    base = ["--model-preset", "llama3.2-1b", "--bf16", "--micro-batch-size", "1", "--loop", "4-8x2-4", "--json"]
    rec = ["--loop-repeats-dist", "poisson-lognormal", "--loop-repeats-mean", "2", "--loop-repeats-max", "6",
           "--loop-backprop-depth", "2"]
    plain = plan_main(base)
    out = plan_main(base + rec)
    r = out["model"]["recurrence"]
    assert r["dist"] == "poisson-lognormal" and r["memory_at_loop"] == "4-8x6-4"
    assert r["memory_stage_grad_applications"] == [4 + 8 * 2 + 4]
    assert out["model"]["loop"] == "4-8x2-4"
    assert out["per_rank"][0]["memory_bytes"]["activations"] == plain["per_rank"][0]["memory_bytes"]["activations"]
    assert out["flops_per_step"] < plain["flops_per_step"] * 1.2  # E[k] < 2 after the cap, truncated backward
    bigger = plan_main(base + rec[:-2])  # no truncation: activations of k = 6
    assert bigger["per_rank"][0]["memory_bytes"]["activations"] > out["per_rank"][0]["memory_bytes"]["activations"]
