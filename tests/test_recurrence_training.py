"""Randomized recurrence in training runs (one process; the multi-process layouts are in
test_recurrence_parallel.py): the k of each step is the (seed, iteration) draw and is logged,
a resumed run repeats the uninterrupted one exactly, training FLOPs count the executed
applications step by step, validation runs at several k, the checkpoint records the
distribution (and the mean k), and bad settings are refused with one line."""

from __future__ import annotations

import glob
import json
import os

import pytest

from conftest import pretrain, read_metrics

COMMON = ["--tokenizer-type", "ByteTokenizer", "--loop", "1-2x3-1", "--seq-length", "32", "--micro-batch-size", "2",
          "--global-batch-size", "4", "--log-interval", "1", "--seed", "11", "--lr", "1e-3"]
RANDOM = ["--loop-repeats-dist", "poisson-lognormal", "--loop-repeats-mean", "3", "--loop-repeats-max", "6",
          "--loop-backprop-depth", "2"]


def _settings():
    from megatron_growloop.looping.recurrence import settings_from_flags

    return settings_from_flags("poisson-lognormal", 3, 6, 2, loop_repeats=3, seed=11)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("recurrence")
    pretrain(COMMON + RANDOM + ["--train-iters", "6", "--eval-interval", "3", "--eval-iters", "1",
                                "--eval-loop-repeats", "1,2,4", "--save", d / "straight",
                                "--metrics-file", d / "straight.jsonl"])
    pretrain(COMMON + RANDOM + ["--train-iters", "6", "--exit-interval", "3", "--save", d / "split",
                                "--metrics-file", d / "split.jsonl"])
    # the auto-resume idiom with the same flags (--loop says k=3; the checkpoint records the mean)
    out = pretrain(COMMON + RANDOM + ["--train-iters", "6", "--save", d / "split", "--load", d / "split",
                                      "--metrics-file", d / "split.jsonl"])
    return d, out.stdout


def test_k_per_step_is_the_seeded_draw_and_is_logged(runs):
    d, _ = runs
    rows = read_metrics(d / "straight.jsonl")
    s = _settings()
    assert [r["loop_repeats"] for r in rows] == [s.repeats_at(i) for i in range(6)]
    assert len({r["loop_repeats"] for r in rows}) > 1
    for r in rows:
        k = r["loop_repeats"]
        assert r["effective_depth"] == 2 + 2 * k
        assert r["backward_depth"] == (2 + 2 * k if k <= 2 else 2 * 2 + 1)


def test_resume_repeats_k_sequence_and_losses_exactly(runs):
    d, _ = runs
    a, b = read_metrics(d / "straight.jsonl"), read_metrics(d / "split.jsonl")
    assert [r["iteration"] for r in b] == list(range(1, 7))
    for key in ("loop_repeats", "loss", "grad_norm", "lr", "training_flops"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_training_flops_count_executed_applications(runs):
    """Per step: forward over every application, backward over the applications that
    back-propagate (the last n of the block, the coda, the head)."""
    from megatron_growloop.model.arch import Arch

    d, _ = runs
    meta = json.load(open(d / "straight" / "iter_0000006" / "growloop.json"))
    shape = Arch.from_meta(meta["arch"]).shape
    rows = read_metrics(d / "straight.jsonl")
    total = 0.0
    for r in rows:
        step = shape.training_flops_per_token(r["effective_depth"], 32, r["backward_depth"]) * 4 * 32
        full = shape.training_flops_per_token(r["effective_depth"], 32) * 4 * 32
        assert step <= full and (step < full) == (r["loop_repeats"] > 2)
        total += step
        assert r["training_flops"] == pytest.approx(total, rel=1e-12)
    assert meta["training_flops"] == pytest.approx(total, rel=1e-12)


def test_checkpoint_records_distribution_and_mean_k(runs):
    d, _ = runs
    meta = json.load(open(d / "straight" / "iter_0000006" / "growloop.json"))
    assert meta["arch"]["loop"] == "1-2x3-1"  # the mean, not the last draw
    rec = meta["loop_recurrence"]
    assert rec["dist"] == "poisson-lognormal" and rec["mean"]["final"] == 3 and rec["max"] == 6
    assert rec["backprop_depth"]["final"] == 2 and rec["seed"] == 11
    assert meta["accounting"]["effective_depth"] == 8


def test_validation_at_several_k_is_logged(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d, _ = runs
    tags = set()
    for path in glob.glob(os.path.join(d / "straight" / "tensorboard", "events.*")):
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags().get("scalars", []))
    assert {"validation loss/k1", "validation loss/k2", "validation loss/k4", "loop/repeats",
            "loop/backprop-depth", "loop-repeats"} <= tags


def test_console_reports_distribution_and_k(runs):
    _, out = runs
    assert "loop repeats k ~ poisson-lognormal(mean 3, max 6)" in out
    assert "gradients through the last 2 applications of the recurrent block" in out
    assert "| k " in out


BASE = ["--tokenizer-type", "ByteTokenizer", "--train-iters", "2"]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--loop", "2x2", "--loop-repeats-dist", "uniform", "--loop-repeats-mean", "5", "--loop-repeats-max", "4"],
         "--loop-repeats-mean 5 exceeds --loop-repeats-max 4"),
        (["--loop", "2x2", "--loop-backprop-depth", "0"], "--loop-backprop-depth must be >= 1, got 0"),
        (["--loop", "2x2", "--loop-repeats-dist", "poisson-lognormal"],
         "--loop-repeats-dist poisson-lognormal needs --loop-repeats-mean"),
        (["--loop", "2x2", "--loop-repeats-dist", "uniform"], "--loop-repeats-dist uniform needs --loop-repeats-mean"),
        (["--loop-repeats-dist", "uniform", "--loop-repeats-mean", "2"], "need a looped model"),
        (["--loop", "2x2", "--loop-repeats-mean", "2"], "--loop-repeats-mean needs --loop-repeats-dist"),
        (["--loop", "2x2", "--loop-repeats-dist", "uniform", "--loop-repeats-mean", "2",
          "--loop-repeats-schedule", "1:3"], "use either --loop-repeats-schedule"),
        (["--loop", "2x2", "--eval-loop-repeats", "1,2"], "--eval-loop-repeats needs --eval-interval"),
        (["--eval-loop-repeats", "1,2", "--eval-interval", "1"], "--eval-loop-repeats needs a looped model"),
        (["--loop", "2x2", "--eval-loop-repeats", "1,0", "--eval-interval", "1"], "invalid --eval-loop-repeats '1,0'"),
        (["--loop", "2x2", "--loop-repeats-dist", "uniform", "--loop-repeats-mean", "2", "--recompute-granularity",
          "full", "--recompute-num-layers", "2"], "--recompute-num-layers 2 with --recompute-method uniform"),
    ],
)
def test_bad_settings_one_line(capsys, tmp_path, argv, match):
    from megatron_growloop.pretrain import main

    save = tmp_path / "save"
    with pytest.raises(SystemExit) as exc:
        main(BASE + ["--save", str(save)] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("megatron_growloop.pretrain: error: "), err
    assert match in errors[0], errors[0]
    assert not save.exists()


def test_retrofit_with_randomized_k_relaunches(tmp_path):
    """A retrofit run with randomized k records the mean k (not R of --retrofit-loop); relaunching
    it from its own checkpoint with the same --retrofit-loop resumes."""
    pretrain(["--tokenizer-type", "ByteTokenizer", "--seq-length", "32", "--train-iters", "1",
              "--save", tmp_path / "plain"])
    flags = ["--tokenizer-type", "ByteTokenizer", "--seq-length", "32", "--micro-batch-size", "2", "--train-iters",
             "3", "--retrofit-loop", "1:3:2", "--loop-repeats-dist", "uniform", "--loop-repeats-mean", "3",
             "--save", tmp_path / "retro", "--metrics-file", tmp_path / "m.jsonl"]
    pretrain(flags + ["--load", tmp_path / "plain", "--exit-interval", "2"])
    meta = json.load(open(tmp_path / "retro" / "iter_0000002" / "growloop.json"))
    assert meta["arch"]["loop"] == "1-2x3-1"
    pretrain(flags + ["--load", tmp_path / "retro"])
    assert [r["iteration"] for r in read_metrics(tmp_path / "m.jsonl")] == [2, 3]  # continues the plain run's count
