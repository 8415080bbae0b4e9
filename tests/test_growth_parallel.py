"""Growth inside torchrun jobs: TP=2 x PP=2 and DP=2 with the distributed optimizer; resume.

Every test here launches real multi-process training (gloo, CPU), hence ``slow``.
"""

from __future__ import annotations

import glob
import json
import math
import os

import pytest

from conftest import pretrain, read_metrics
from growth_checks import compare_grown, dump_dir

COMMON = ["--tokenizer-type", "ByteTokenizer", "--mock-data", "--vocab-size", "256", "--log-interval", "1",
          "--train-iters", "8", "--grow-final-layers", "12", "--grow-iters", "12", "--lr", "3e-3"]
# PROP-1, k = 3 stages over T = 12: budgets 2, 4, 6 -> grows after iterations 2 and 6.


def _cosine_lr(step: int, max_lr=3e-3, min_lr=0.0, decay=8) -> float:
    return min_lr + (max_lr - min_lr) * 0.5 * (math.cos(math.pi * step / decay) + 1.0)


def _tensorboard_tags(logdir: str) -> set:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in glob.glob(os.path.join(logdir, "events.*")):
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags().get("scalars", []))
    return tags


@pytest.mark.slow
def test_growth_tp2_pp2_distopt_layers_cross_stages(dist_1rank, tmp_path, monkeypatch):
    """Invariants (TP=2, PP=2, distributed optimizer, MIDAS 4 -> 8 -> 12, where copies land on
    the other pipeline stage): after each growth step every new layer's weights, fp32 main
    params and Adam moments equal its source layer's bitwise and nothing else changes; the
    pipeline is re-balanced ([4, 4] then [6, 6] layers); losses stay finite; the learning rate
    at every iteration, growth steps included, is the uninterrupted cosine schedule; the growth
    plan and each growth event are printed and logged (console + tensorboard); the final
    checkpoint records depth 12, the lineage and the growth steps done."""
    from megatron_growloop.growth.apply import DUMP_ENV

    monkeypatch.setenv(DUMP_ENV, str(tmp_path / "dump"))
    save = tmp_path / "ck"
    proc = pretrain([*COMMON, "--grow-method", "midas", "--tensor-model-parallel-size", "2",
                     "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer",
                     "--save", save, "--save-interval", "2", "--metrics-file", tmp_path / "m.jsonl"], nproc=4)
    out = proc.stdout
    assert "grows after iterations [2, 6]" in out
    assert "growth step 1/2 (midas) before iteration 3: 4 -> 8 layers; pipeline stages hold [4, 4] layers" in out
    assert "growth step 2/2 (midas) before iteration 7: 8 -> 12 layers; pipeline stages hold [6, 6] layers" in out
    assert out.count("(checkpoint transfer:") == 2  # MIDAS moves layers across stages
    assert "growth FLOPs: training FLOPs" in out

    for step, it in ((1, 2), (2, 6)):
        counts = compare_grown(str(save / f"iter_{it:07d}"), dump_dir(str(tmp_path / "dump"), step))
        depth = 4 + 4 * step
        assert counts["weight"] == counts["exp_avg"] == counts["exp_avg_sq"] == counts["param"] == 6 * depth

    rows = read_metrics(tmp_path / "m.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert [r["num_layers"] for r in rows] == [4, 4, 8, 8, 8, 8, 12, 12]
    assert all(math.isfinite(r["loss"]) for r in rows)
    for r in rows:
        assert r["lr"] == pytest.approx(_cosine_lr(r["iteration"] - 1), rel=1e-12, abs=1e-15)

    meta = json.loads((save / "iter_0000008" / "growloop.json").read_text())
    assert meta["arch"]["num_layers"] == 12
    assert meta["growth"]["steps_done"] == 2
    assert [l["root"] for l in meta["lineage"]] == [0, 1, 2, 3] * 3
    assert "growth/num-layers" in _tensorboard_tags(str(save / "tensorboard"))


@pytest.mark.slow
def test_resume_across_growth_equals_uninterrupted(dist_1rank, tmp_path, monkeypatch):
    """Invariants (DP=2, distributed optimizer, LIDAS 4 -> 8 -> 12): (a) after growth every new
    layer's weights, fp32 main params and Adam moments equal its source's bitwise; (b) growing
    through a scratch checkpoint and growing in memory give identical training; a job
    stopped at the growth iteration (checkpoint taken *before* growth) grows at the right
    iteration when resumed, and a job stopped *after* a growth step resumes at the grown depth;
    the per-iteration losses of the stitched runs equal the uninterrupted run's; (c) resuming
    with a different growth plan is a one-line error."""
    from megatron_growloop.growth.apply import DUMP_ENV

    base = [*COMMON, "--grow-method", "lidas", "--use-distributed-optimizer"]
    monkeypatch.setenv(DUMP_ENV, str(tmp_path / "dump"))
    # the uninterrupted run goes through scratch checkpoints, the resumed ones grow in memory
    pu = pretrain([*base, "--grow-transfer", "checkpoint", "--save", tmp_path / "u", "--save-interval", "2",
                   "--metrics-file", tmp_path / "u.jsonl"], nproc=2)
    assert pu.stdout.count("(checkpoint transfer:") == 2
    for step, it in ((1, 2), (2, 6)):
        counts = compare_grown(str(tmp_path / "u" / f"iter_{it:07d}"), dump_dir(str(tmp_path / "dump"), step))
        assert counts["param"] == counts["exp_avg"] == 6 * (4 + 4 * step)
    monkeypatch.delenv(DUMP_ENV)

    ck = tmp_path / "r"
    pretrain([*base, "--save", ck, "--exit-interval", "2", "--metrics-file", tmp_path / "r1.jsonl"], nproc=2)
    assert json.loads((ck / "iter_0000002" / "growloop.json").read_text())["arch"]["num_layers"] == 4
    pretrain([*base, "--load", ck, "--save", ck, "--exit-interval", "4", "--metrics-file", tmp_path / "r2.jsonl"],
             nproc=2)
    assert json.loads((ck / "iter_0000004" / "growloop.json").read_text())["arch"]["num_layers"] == 8
    p3 = pretrain([*base, "--load", ck, "--save", ck, "--metrics-file", tmp_path / "r3.jsonl"], nproc=2)
    assert "growth step 2/2 (lidas) before iteration 7: 8 -> 12 layers" in p3.stdout
    assert "(memory transfer:" in p3.stdout

    u = read_metrics(tmp_path / "u.jsonl")
    r = read_metrics(tmp_path / "r1.jsonl") + read_metrics(tmp_path / "r2.jsonl") + read_metrics(tmp_path / "r3.jsonl")
    assert [x["iteration"] for x in r] == list(range(1, 9))
    assert [x["num_layers"] for x in r] == [x["num_layers"] for x in u] == [4, 4, 8, 8, 8, 8, 12, 12]
    for a, b in zip(u, r):
        assert b["loss"] == pytest.approx(a["loss"], rel=0, abs=1e-6), (a["iteration"], a["loss"], b["loss"])
        assert b["lr"] == a["lr"]
    assert r[-1]["training_flops"] == pytest.approx(u[-1]["training_flops"], rel=1e-12)

    bad = pretrain([*COMMON, "--grow-method", "midas", "--use-distributed-optimizer", "--load", ck, "--train-iters", "9"],
                   nproc=1, check=False)
    assert bad.returncode == 2
    err = [l for l in bad.stderr.splitlines() if "error:" in l]
    assert len(err) == 1 and "was grown with method=lidas" in err[0], bad.stderr[-2000:]
