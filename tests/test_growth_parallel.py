"""Growth inside torchrun jobs: TP=2 x PP=2 and DP=2 with the distributed optimizer; resume.

Every test here launches real multi-process training (gloo, CPU), hence ``slow``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

import pytest

from conftest import pretrain, read_metrics
from growth_checks import compare_grown, dump_dir

COMMON = ["--tokenizer-type", "ByteTokenizer", "--mock-data", "--vocab-size", "256", "--log-interval", "1",
          "--dist-ckpt-optim-fully-reshardable", "--train-iters", "8", "--grow-final-layers", "12", "--grow-iters", "12", "--lr", "3e-3"]
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
def test_growth_tp2_pp2_distopt_layers_cross_stages(dist_1rank, tmp_path):
    """Invariants (TP=2, PP=2, distributed optimizer, MIDAS 4 -> 8 -> 12, where copies land on
    the other pipeline stage): after each growth step every new layer's weights, fp32 main
    params and Adam moments equal its source layer's bitwise and nothing else changes; the
    pipeline is re-balanced ([4, 4] then [6, 6] layers); losses stay finite; the learning rate
    at every iteration, growth steps included, is the uninterrupted cosine schedule; the growth
    plan and each growth event are printed and logged (console + tensorboard); the final
    checkpoint records depth 12, the lineage and the growth steps done."""
    save = tmp_path / "ck"
    proc = pretrain([*COMMON, "--grow-method", "midas", "--grow-dump-dir", tmp_path / "dump", "--tensor-model-parallel-size", "2",
                     "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer",
                     "--save", save, "--save-interval", "2", "--metrics-file", tmp_path / "m.jsonl"], nproc=4)
    out = proc.stdout
    assert "grows after iterations [2, 6]" in out
    assert "growth step 1/2 (midas) before iteration 3: 4 -> 8 layers; pipeline stages hold [4, 4] layers" in out
    assert "growth step 2/2 (midas) before iteration 7: 8 -> 12 layers; pipeline stages hold [6, 6] layers" in out
    # MIDAS moves layers across stages: they arrive point to point, one piece at a time
    assert out.count("(memory transfer, ") == 2 and out.count("pieces received") == 2
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
def test_resume_across_growth_equals_uninterrupted(dist_1rank, tmp_path):
    """Invariants (DP=2, distributed optimizer, LIDAS 4 -> 8 -> 12, growth after iterations 2, 6):
    (a) after each growth step every new layer's weights, fp32 main params and Adam moments
    equal its source's bitwise, whether the state went through a scratch checkpoint (run 1) or
    stayed in memory (run 2); (b) run 2, resumed from the checkpoint taken at iteration 2
    *before* growth, grows before iteration 3 and reproduces run 1's losses at iterations 3-4
    bitwise; (c) run 3, resumed from run 1's checkpoint at iteration 4 *after* growth, starts
    at depth 8 and reproduces run 2's (uninterrupted) iterations 5-8 bitwise, growth at 6
    included; (d) the learning rate and FLOPs counters continue exactly."""
    base = [*COMMON, "--grow-method", "lidas", "--use-distributed-optimizer"]
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    p1 = pretrain([*base, "--grow-dump-dir", tmp_path / "dump1", "--grow-transfer", "checkpoint", "--save", r1, "--save-interval", "2",
                   "--exit-interval", "4", "--metrics-file", tmp_path / "m1.jsonl"], nproc=2)
    assert p1.stdout.count("(checkpoint transfer, ") == 1
    counts = compare_grown(str(r1 / "iter_0000002"), dump_dir(str(tmp_path / "dump1"), 1))
    assert counts["param"] == counts["exp_avg"] == counts["exp_avg_sq"] == counts["weight"] == 6 * 8
    assert json.loads((r1 / "iter_0000002" / "growloop.json").read_text())["arch"]["num_layers"] == 4
    assert json.loads((r1 / "iter_0000004" / "growloop.json").read_text())["arch"]["num_layers"] == 8

    p2 = pretrain([*base, "--grow-dump-dir", tmp_path / "dump2", "--load", r1 / "iter_0000002", "--save", r2, "--save-interval", "2",
                   "--metrics-file", tmp_path / "m2.jsonl"], nproc=2)
    assert p2.stdout.count("(memory transfer, ") == 2
    assert "growth step 1/2 (lidas) before iteration 3: 4 -> 8 layers" in p2.stdout
    counts = compare_grown(str(r2 / "iter_0000006"), dump_dir(str(tmp_path / "dump2"), 2))
    assert counts["param"] == counts["exp_avg"] == counts["exp_avg_sq"] == counts["weight"] == 6 * 12

    p3 = pretrain([*base, "--load", r1, "--metrics-file", tmp_path / "m3.jsonl"], nproc=2)
    assert "growth step 2/2 (lidas) before iteration 7: 8 -> 12 layers" in p3.stdout

    m1, m2, m3 = (read_metrics(tmp_path / f"m{i}.jsonl") for i in (1, 2, 3))
    assert [x["iteration"] for x in m1] == [1, 2, 3, 4] and [x["num_layers"] for x in m1] == [4, 4, 8, 8]
    assert [x["iteration"] for x in m2] == list(range(3, 9))
    assert [x["num_layers"] for x in m2] == [8, 8, 8, 8, 12, 12]
    assert [x["iteration"] for x in m3] == list(range(5, 9)) and m3[0]["num_layers"] == 8
    for a, b in list(zip(m1[2:], m2[:2])) + list(zip(m2[2:], m3)):
        assert a["iteration"] == b["iteration"]
        assert b["loss"] == a["loss"], (a["iteration"], a["loss"], b["loss"])
        assert b["lr"] == a["lr"] and b["grad_norm"] == a["grad_norm"]
        assert b["training_flops"] == a["training_flops"]
        assert b["consumed_train_samples"] == a["consumed_train_samples"]


@pytest.mark.slow
def test_memory_and_checkpoint_transfers_agree_when_layers_cross_stages(tmp_path):
    """Invariant (PP=2, MIDAS 4 -> 8 -> 12: copies move to the other stage): carrying the state
    in memory (moving layers sent point to point) and through a scratch checkpoint gives
    bitwise-identical training (losses, grad norms) before and after both growth steps."""
    base = [*COMMON, "--grow-method", "midas", "--pipeline-model-parallel-size", "2"]
    runs = {}
    for mode in ("memory", "checkpoint"):
        proc = pretrain([*base, "--grow-transfer", mode, "--metrics-file", tmp_path / f"{mode}.jsonl"], nproc=2)
        assert proc.stdout.count(f"({mode} transfer, ") == 2
        runs[mode] = read_metrics(tmp_path / f"{mode}.jsonl")
        runs[f"{mode}_stdout"] = proc.stdout
    assert [r["num_layers"] for r in runs["memory"]] == [4, 4, 8, 8, 8, 8, 12, 12]
    # the moving layers travel one tensor at a time: no buffer exceeds the largest parameter's
    # fp32 tensor (the tiny preset's fused SwiGLU fc1, [2 x 176, 64]), i.e. memory is bounded by
    # one parameter -- the previous pickled exchange sent every moving layer in one payload
    largest = [int(x) for x in re.findall(r"largest buffer (\d+) B", runs["memory_stdout"])]
    assert len(largest) == 2 and 0 < max(largest) <= 2 * 176 * 64 * 4
    for a, b in zip(runs["memory"], runs["checkpoint"]):
        assert (a["iteration"], a["loss"], a["grad_norm"]) == (b["iteration"], b["loss"], b["grad_norm"])


@pytest.mark.slow
def test_growth_with_overlapped_param_gather_trains_like_without(tmp_path):
    """Invariant (DP=2, bf16, distributed optimizer, LIDAS 4 -> 8 -> 12): with
    --overlap-param-gather the all-gather of updated parameters is deferred to the next forward;
    a growth step must finish it before taking the weights, so training is bitwise the same as
    without the overlap -- also after each growth step."""
    base = [*COMMON, "--grow-method", "lidas", "--bf16", "--use-distributed-optimizer"]
    runs = {}
    for name, extra in (("plain", []), ("overlap", ["--overlap-param-gather"])):
        pretrain([*base, *extra, "--metrics-file", tmp_path / f"{name}.jsonl"], nproc=2)
        runs[name] = [(r["iteration"], r["num_layers"], r["loss"], r["grad_norm"])
                      for r in read_metrics(tmp_path / f"{name}.jsonl")]
    assert [r[1] for r in runs["plain"]] == [4, 4, 8, 8, 8, 8, 12, 12]
    assert runs["overlap"] == runs["plain"]
