"""Retrofitted recurrence from a checkpoint: continue training a plain model with a block
looped; the checkpoint records the loop, and resuming / loading bring the model back looped.
Also: checkpoint-dependent bad specs fail with one line before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import pretrain, read_metrics, run_module

COMMON = ["--tokenizer-type", "ByteTokenizer", "--seq-length", "64", "--micro-batch-size", "2",
          "--train-iters", "6", "--log-interval", "1", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("retrofit")
    plain, retro, straight = d / "plain", d / "retro", d / "straight"
    # plain model: 3 iterations of the stable phase, saved
    pretrain(COMMON + ["--exit-interval", "3", "--save", plain, "--metrics-file", d / "plain.jsonl"])
    # retrofit layers 1..2 twice for the cooldown: iterations 4-5, saved
    proc = pretrain(COMMON + ["--load", plain, "--retrofit-loop", "1:3:2", "--exit-interval", "5", "--save", retro,
                              "--metrics-file", d / "retro.jsonl"])
    (d / "retro.stdout").write_text(proc.stdout)
    # resume the retrofitted checkpoint without any loop flag: iteration 6
    pretrain(COMMON + ["--load", retro, "--save", retro, "--metrics-file", d / "resume.jsonl"])
    # reference: the same retrofit run without the interruption
    pretrain(COMMON + ["--load", plain, "--retrofit-loop", "1:3:2", "--metrics-file", d / "straight.jsonl"])
    return d


def _meta(path: Path, it: int) -> dict:
    return json.loads((path / f"iter_{it:07d}" / "growloop.json").read_text())


def test_retrofit_records_the_loop(runs):
    """The retrofitted checkpoint's metadata records the loop and its accounting."""
    plain, retro = _meta(runs / "plain", 3), _meta(runs / "retro", 5)
    assert plain["arch"]["loop"] is None and plain["accounting"]["effective_depth"] == 4
    assert retro["arch"]["loop"] == "1-2x2-1" and retro["arch"]["num_layers"] == 4
    acc = retro["accounting"]
    assert acc["unique_layers"] == 4 and acc["effective_depth"] == 6
    assert acc["unique_parameters"] == plain["accounting"]["unique_parameters"]
    assert acc["inference_flops_per_token"] > plain["accounting"]["inference_flops_per_token"]
    # the log line states all three axes for the looped model
    log = (runs / "retro.stdout").read_text()
    assert (f"model: 4 unique layers, effective depth 6 (Loop(1-2x2-1))" in log
            and f"unique parameters {acc['unique_parameters']:,}" in log), log[:500]
    m = read_metrics(runs / "retro.jsonl")
    assert [r["iteration"] for r in m] == [4, 5]  # training continues (iteration, optimizer, WSD)
    assert all(r["effective_depth"] == 6 for r in m)


def test_resume_keeps_the_loop(runs):
    """Resuming without loop flags trains the looped model; interrupted == uninterrupted."""
    resumed = read_metrics(runs / "resume.jsonl")
    straight = {r["iteration"]: r for r in read_metrics(runs / "straight.jsonl")}
    assert [r["iteration"] for r in resumed] == [6]
    assert resumed[0]["effective_depth"] == 6
    assert resumed[0]["loss"] == pytest.approx(straight[6]["loss"], rel=1e-5)
    assert resumed[0]["grad_norm"] == pytest.approx(straight[6]["grad_norm"], rel=1e-4)
    assert _meta(runs / "retro", 6)["arch"]["loop"] == "1-2x2-1"
    # training FLOPs of the retrofitted steps count the applications (depth 6, not 4)
    plain_flops = read_metrics(runs / "plain.jsonl")[-1]["training_flops"]
    per_step_looped = straight[6]["training_flops"] - straight[5]["training_flops"]
    per_step_plain = plain_flops / 3
    assert per_step_looped > per_step_plain


def test_load_model_brings_the_loop_back(runs, dist_1rank):
    """load_model() rebuilds the retrofitted model looped; k can be changed at load."""
    from megatron_growloop.training.inference import load_model

    model, meta, tok = load_model(str(runs / "retro"))
    assert model.config.loop is not None and str(model.config.loop) == "1-2x2-1"
    assert model.schedule == [0, 1, 2, 1, 2, 3]
    model3, _, _ = load_model(str(runs / "retro"), loop_repeats=3)
    assert model3.effective_depth == 8
    plain, _, _ = load_model(str(runs / "plain"), repeat_blocks=["1:3:2"])
    assert plain.schedule == model.schedule  # the same schedule, reached by inference-time repetition


def _fails(main, prog, argv, capsys, match, save=None):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: ") and match in errors[0], errors
    if save is not None:
        assert not Path(save).exists()


def test_checkpoint_dependent_bad_specs(runs, capsys, tmp_path):
    """Retrofit on a looped model, a retrofit/repeat block outside the model, --loop that
    contradicts the checkpoint: one line each, nothing written."""
    from megatron_growloop.generate import main as gen_main
    from megatron_growloop.pretrain import main as pre_main

    save = tmp_path / "out"
    retro, plain = str(runs / "retro"), str(runs / "plain")
    pre = "megatron_growloop.pretrain"
    _fails(pre_main, pre, COMMON + ["--load", retro, "--retrofit-loop", "0:2:2", "--save", save], capsys,
           "is already looped (Loop(1-2x2-1))", save)
    _fails(pre_main, pre, COMMON + ["--load", plain, "--retrofit-loop", "2:6:2", "--save", save], capsys,
           "--retrofit-loop 2:6:2 lies outside the model", save)
    _fails(pre_main, pre, COMMON + ["--load", plain, "--loop", "1-2x2-1", "--save", save], capsys,
           "use --retrofit-loop", save)
    _fails(pre_main, pre, COMMON + ["--load", plain, "--loop-repeats", "2", "--save", save], capsys,
           "has no loop", save)
    gen = "megatron_growloop.generate"
    _fails(gen_main, gen, ["--load", retro, "--repeat-block", "4:8:2"], capsys, "repeat block 4:8:2 lies outside the model")
    _fails(gen_main, gen, ["--load", plain, "--loop-repeats", "2"], capsys, "has no loop")
    _fails(gen_main, gen, ["--load", retro, "--repeat-block", "2:1:2"], capsys, "invalid --repeat-block '2:1:2'")


def test_relaunching_a_retrofit_run_is_accepted(runs):
    """Re-running the same retrofit command on its own (now looped) output resumes it."""
    from megatron_growloop.training.arguments import parse_args

    args = parse_args(COMMON + ["--load", str(runs / "retro"), "--retrofit-loop", "1:3:2"]).args
    assert args.retrofit_loop == "1:3:2"


def test_generation_cli_runs_a_retrofitted_checkpoint(runs):
    """The generation CLI runs the checkpoint with its loop, a changed k and a repeat block."""
    proc = run_module("megatron_growloop.generate",
                      ["--load", runs / "retro", "--prompt", "The cat", "--max-new-tokens", "4",
                       "--loop-repeats", "3", "--repeat-block", "0:1:2"])
    assert "schedule: [0, 0, 1, 2, 1, 2, 1, 2, 3] (effective depth 9" in proc.stdout
    assert "'The cat' -> " in proc.stdout
