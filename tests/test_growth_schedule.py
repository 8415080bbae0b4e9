"""PROP-alpha plan arithmetic, FLOPs accounting of a growing run, and growth CLI errors."""

from __future__ import annotations

from fractions import Fraction

import pytest

from megatron_growloop.accounting import ArchShape
from megatron_growloop.errors import UsageError
from megatron_growloop.growth import flops as gf
from megatron_growloop.growth.plan import GrowthPlan, prop_budgets


@pytest.mark.parametrize("k,T,alpha", [(6, 170_000, 1.0), (8, 170_000, 1.0), (3, 12, 1.0), (5, 101, 0.0),
                                       (4, 999, 2.0), (7, 50, 1.5), (2, 3, 1.0)])
def test_budgets_sum_to_T_and_follow_prop_alpha(k, T, alpha):
    """Invariant: integer stage budgets sum to T and each is within 1 of T * i^a / sum_j j^a."""
    b = prop_budgets(k, T, alpha)
    assert sum(b) == T and len(b) == k
    w = [(i + 1) ** alpha for i in range(k)]
    for bi, wi in zip(b, w):
        assert abs(bi - T * wi / sum(w)) < 1


def test_paper_plans_for_360m_and_1_7b():
    """Invariant: the paper's settings (B=4, PROP-1, T=170k) give k=6 stages for 24 layers and
    k=8 for 32, growth after the cumulative budgets, and a printed plan naming them."""
    p = GrowthPlan.build("lidas", 4, 4, 24, 170_000, 1.0)
    assert p.num_stages == 6 and p.budgets == [8095, 16191, 24286, 32381, 40476, 48571]
    assert p.growth_iterations == [8095, 24286, 48572, 80953, 121429]
    q = GrowthPlan.build("lidas", 4, 4, 32, 170_000, 1.0)
    assert q.num_stages == 8 and sum(q.budgets) == 170_000
    assert q.growth_iterations[0] == 4722 and q.growth_iterations[-1] == 132222
    text = p.describe()
    assert "grows after iterations [8095, 24286, 48572, 80953, 121429]" in text
    assert "4 layers x 8095 it" in text and "24 layers x 48571 it" in text


def test_depth_at_and_steps_due():
    """Invariant: the step after growth iteration g runs at the grown depth; a model behind the
    plan (resumed from before growth) is due exactly the missing growth steps."""
    p = GrowthPlan.build("midas", 4, 4, 12, 12, 1.0)  # budgets 2, 4, 6
    assert p.growth_iterations == [2, 6]
    assert [p.depth_at(i) for i in range(9)] == [4, 4, 8, 8, 8, 8, 12, 12, 12]
    assert p.steps_due(1, 4) == [] and p.steps_due(2, 4) == [0] and p.steps_due(6, 4) == [0, 1]
    assert p.steps_due(6, 8) == [1] and p.steps_due(7, 12) == []


@pytest.mark.parametrize("k", range(1, 9))
def test_prop1_depth_proportional_compute_is_2k_plus_1_over_3k(k):
    """Invariant: for PROP-1 with depths iB the depth-proportional training FLOPs of the growth
    phase are (2k+1)/(3k) of a final-depth baseline -- exactly, when T is a multiple of k(k+1)/2
    so that the budgets need no rounding -- both from the plan and from per-step accounting."""
    T = 3 * k * (k + 1) // 2 * 7
    plan = GrowthPlan.build("lidas", 4, 4, 4 * k, T, 1.0) if k > 1 else None
    expected = Fraction(2 * k + 1, 3 * k)
    assert gf.prop_closed_form(k, 1) == expected
    if plan is None:
        return
    assert gf.depth_proportional_ratio(plan) == expected
    assert plan.depth_ratio() == pytest.approx(float(expected), rel=1e-12)
    # per-step accounting as the trainer does it, then the report's split into layers and head
    shape = ArchShape(64, 4, 2, 176, 16, 384)
    seq, tokens_per_iter = 128, 512
    spent = sum(tokens_per_iter * shape.training_flops_per_token(plan.depth_at(i), seq) for i in range(T))
    rep = gf.report(shape, seq, T * tokens_per_iter, float(spent), plan.final_depth)
    assert rep["depth_proportional_ratio"] == pytest.approx(float(expected), rel=1e-9)
    assert rep["ratio"] > float(expected)  # the LM head does not shrink with depth
    planned = gf.planned_training_flops(plan, shape, seq, tokens_per_iter, T)
    assert planned["grown"] == pytest.approx(spent, rel=1e-12)


def test_other_alphas_and_cooldown():
    """Invariant: PROP-0 gives (k+1)/(2k), PROP-2 gives 3(k+1)/(2(2k+1)); iterations after the
    growth phase run at full depth."""
    for k in (6, 8):
        assert gf.prop_closed_form(k, 0) == Fraction(k + 1, 2 * k)
        assert gf.prop_closed_form(k, 2) == Fraction(3 * (k + 1), 2 * (2 * k + 1))
    plan = GrowthPlan.build("lidas", 4, 4, 24, 21 * 1000, 1.0)
    r = gf.depth_proportional_ratio(plan, 21 * 1000 + 3000)
    assert r == (Fraction(13, 18) * 21000 + 3000) / 24000


ARGS = ["--tokenizer-type", "ByteTokenizer", "--train-iters", "100"]


@pytest.mark.parametrize("extra,msg", [
    (["--grow-method", "lidas", "--grow-final-layers", "26", "--grow-iters", "60"], "not reachable"),
    (["--grow-method", "lidas", "--grow-block-size", "3", "--num-layers", "3", "--grow-final-layers", "9",
      "--grow-iters", "60"], "even growth block size"),
    (["--grow-method", "midas", "--grow-final-layers", "32", "--grow-iters", "5"], "too small for 8 growth stages"),
    (["--grow-method", "lidas", "--grow-final-layers", "12", "--grow-iters", "60", "--loop", "4x2"],
     "growing a looped model is not supported"),
    (["--grow-method", "lidas", "--grow-final-layers", "12", "--grow-iters", "400"], "ends before the last growth"),
    (["--grow-method", "lidas", "--grow-final-layers", "12"], "needs --grow-final-layers and --grow-iters"),
    (["--grow-final-layers", "12"], "needs --grow-method"),
    (["--grow-method", "lidas", "--grow-final-layers", "12", "--grow-iters", "60",
      "--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|tL"], "fixed to one depth"),
])
def test_bad_growth_settings_are_one_line_errors(extra, msg):
    """Invariant: impossible growth settings are rejected before anything runs, with one line
    naming the bad value."""
    from megatron_growloop.pretrain import parse_pretrain_args

    world = 2 if "--pipeline-model-parallel-size" in extra else 1
    with pytest.raises(UsageError) as e:
        parse_pretrain_args(ARGS + extra, world_size=world)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_cli_prints_one_line_and_writes_nothing(tmp_path):
    """Invariant: the pretrain CLI turns a bad growth setting into `prog: error: ...` (exit 2, no
    traceback) and creates no output directory."""
    from conftest import pretrain

    save = tmp_path / "never"
    proc = pretrain(ARGS + ["--grow-method", "lidas", "--grow-block-size", "3", "--num-layers", "3",
                            "--grow-final-layers", "9", "--grow-iters", "60", "--save", save], check=False)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("megatron_growloop.pretrain: error: ") and "even growth block size" in lines[-1]
    assert "Traceback" not in proc.stderr and not save.exists()
