"""Randomized recurrence, the pure part: k per step from (seed, iteration), the distributions'
means and caps, the curricula on the mean k and the backprop depth, the settings' one-line
errors, and what truncation leaves to back-propagate (``LoopSpec``)."""

from __future__ import annotations

import statistics

import pytest

from megatron_growloop.errors import UsageError
from megatron_growloop.looping.recurrence import Ramp, parse_repeats_list, settings_from_flags
from megatron_growloop.looping.spec import LoopSpec


def _settings(dist="poisson-lognormal", mean=4, max_repeats=None, depth=None, seed=7, **kw):
    return settings_from_flags(dist, mean, max_repeats, depth, loop_repeats=3, seed=seed, **kw)


def test_k_depends_only_on_seed_and_iteration():
    """The draw of a step is a pure function of (seed, iteration): recomputing it in any order
    (another rank, a resumed run) gives the same k; another seed gives another sequence."""
    s = _settings()
    forward = [s.repeats_at(i) for i in range(200)]
    backward = [s.repeats_at(i) for i in reversed(range(200))][::-1]
    assert forward == backward
    assert [_settings().repeats_at(i) for i in range(200)] == forward
    assert [_settings(seed=8).repeats_at(i) for i in range(200)] != forward
    assert len(set(forward)) > 3


@pytest.mark.parametrize("dist,mean,max_repeats", [("uniform", 4, None), ("uniform", 3, 4),
                                                  ("poisson-lognormal", 4, 64), ("poisson-lognormal", 8, 64)])
def test_distribution_means_and_caps(dist, mean, max_repeats):
    """uniform has mean m on {2m-h..h}, h = min(max, 2m-1); poisson-lognormal has mean m
    (1 + Poisson of a lognormal rate with mean m-1) and never exceeds its cap."""
    s = _settings(dist, mean, max_repeats)
    ks = [s.repeats_at(i) for i in range(4000)]
    assert min(ks) >= 1 and max(ks) <= s.max_repeats
    assert statistics.mean(ks) == pytest.approx(mean, rel=0.05)
    if dist == "uniform":
        hi = min(s.max_repeats, 2 * mean - 1)
        assert set(ks) == set(range(2 * mean - hi, hi + 1))


def test_poisson_lognormal_is_capped_and_fixed_is_constant():
    capped = _settings("poisson-lognormal", 4, 5)
    ks = [capped.repeats_at(i) for i in range(2000)]
    assert max(ks) == 5 and ks.count(5) > ks.count(4) / 4  # the tail is folded onto the cap
    fixed = settings_from_flags("fixed", None, None, 2, loop_repeats=3, seed=1)
    assert {fixed.repeats_at(i) for i in range(50)} == {3} and fixed.nominal_repeats == 3


def test_curricula_ramp_mean_and_backprop_depth():
    """retrofitting-recurrence's curricula: the mean k and the backprop depth rise from their
    start to their final value over the warm-up (linear or 1-sqrt), then stay."""
    lin = Ramp(final=8, start=2, warmup_iters=6)
    assert [lin.at(i) for i in range(8)] == [2, 3, 4, 5, 6, 7, 8, 8]
    sq = Ramp(final=8, start=1, warmup_iters=100, style="1-sqrt")
    values = [sq.at(i) for i in range(0, 101, 10)]
    assert values[0] == 1 and values[-1] == 8 and values == sorted(values)
    assert sq.at(50) < Ramp(final=8, start=1, warmup_iters=100).at(50)  # 1-sqrt rises late
    s = _settings("fixed", 6, None, depth=4, mean_start=2, mean_warmup_iters=4,
                  backprop_depth_start=1, backprop_depth_warmup_iters=3)
    assert [s.repeats_at(i) for i in range(6)] == [2, 3, 4, 5, 6, 6]
    assert [s.backprop_depth_at(i) for i in range(5)] == [1, 2, 3, 4, 4]
    assert s.nominal_repeats == 6


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dist="uniform", mean=None), "--loop-repeats-dist uniform needs --loop-repeats-mean"),
        (dict(dist="poisson-lognormal", mean=None), "needs --loop-repeats-mean"),
        (dict(dist="uniform", mean=8, max_repeats=4), "--loop-repeats-mean 8 exceeds --loop-repeats-max 4"),
        (dict(dist="uniform", mean=0), "--loop-repeats-mean must be >= 1"),
        (dict(dist="fixed", mean=None, depth=0), "--loop-backprop-depth must be >= 1, got 0"),
        (dict(dist=None, mean=4), "--loop-repeats-mean needs --loop-repeats-dist"),
        (dict(dist="gaussian", mean=4), "unknown --loop-repeats-dist 'gaussian'"),
        (dict(dist="uniform", mean=4, mean_start=9, mean_warmup_iters=5), "--loop-repeats-mean-start 9"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(UsageError, match=match) as exc:
        _settings(**kwargs)
    assert "\n" not in str(exc.value)


def test_without_flags_there_is_nothing_to_control():
    assert settings_from_flags(None, None, None, None, loop_repeats=3, seed=0) is None


def test_eval_repeats_list():
    assert parse_repeats_list("1,2,4,8") == (1, 2, 4, 8)
    for bad in ("1,x", "0,2", "2,2", ""):
        with pytest.raises(UsageError, match="--eval-loop-repeats"):
            parse_repeats_list(bad)


@pytest.mark.parametrize("spec,n,positions,backward", [
    ("1-2x4-1", 2, (1, 5), 5),      # 2 of 4 repeats without autograd; 2*2 + coda 1 back-propagate
    ("1-2x4-1", 4, None, 10),       # n >= k: nothing truncated
    ("1-2x4-1", None, None, 10),
    ("3x5", 1, (0, 12), 3),
    ("2-3x3-0", 1, (2, 8), 3),
])
def test_truncated_positions_and_backward_depth(spec, n, positions, backward):
    loop = LoopSpec.parse(spec)
    assert loop.no_grad_positions(n) == positions
    assert loop.backward_depth(n) == backward
