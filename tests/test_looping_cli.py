"""Bad loop specifications fail early with one line: ``prog: error: ...``, exit status 2,
no traceback, nothing written to --save.  FP8 delayed scaling and CUDA graphs are refused
for looped blocks before Transformer Engine is needed."""

from __future__ import annotations

import pytest

from conftest import pretrain

BASE = ["--tokenizer-type", "ByteTokenizer", "--train-iters", "2"]


def _main_fails(argv, capsys, tmp_path, match):
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
    return errors[0]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--loop", "0x4"], "invalid loop spec '0x4'"),
        (["--loop", "4-4x4"], "invalid loop spec '4-4x4'"),
        (["--loop", "4x0"], "invalid loop spec '4x0'"),
        (["--loop", "four"], "invalid loop spec 'four'"),
        (["--loop", "4x2", "--num-layers", "5"], "--loop 4x2 has 4 unique layers but --num-layers is 5"),
        (["--retrofit-loop", "1:3:2"], "--retrofit-loop needs --load"),
        (["--retrofit-loop", "3:1:2"], "invalid --retrofit-loop '3:1:2'"),
        (["--loop", "2x2", "--loop-repeats", "0"], "--loop-repeats must be >= 1"),
        (["--loop", "2x2", "--loop-repeats-schedule", "2:0"], "invalid --loop-repeats-schedule '2:0'"),
        (["--loop", "2x2", "--loop-repeats-schedule", "4:2,2:3"], "iterations must increase"),
        (["--loop-repeats-schedule", "2:3"], "--loop-repeats-schedule needs a looped model"),
        (["--loop-repeats", "3"], "--loop-repeats needs a looped model"),
    ],
)
def test_bad_loop_specs(capsys, tmp_path, argv, match):
    """Each bad spec is one line naming the bad value and what is allowed."""
    _main_fails(argv, capsys, tmp_path, match)


@pytest.mark.parametrize("recipe", ["delayed"])
def test_fp8_delayed_refused_for_loops_without_te(capsys, tmp_path, recipe):
    """FP8 delayed scaling is refused for a looped model, with a suggestion, even where
    Transformer Engine is not installed (the check runs before the TE checks)."""
    line = _main_fails(["--loop", "2x2", "--fp8-format", "e4m3", "--fp8-recipe", recipe], capsys, tmp_path,
                       "cannot use --fp8-recipe delayed")
    assert "tensorwise" in line


def test_cuda_graphs_refused_for_loops(capsys, tmp_path):
    _main_fails(["--loop", "1-2x2-1", "--cuda-graph-impl", "transformer_engine"], capsys, tmp_path,
                "CUDA graphs capture one call per layer")


def test_fp8_current_scaling_passes_the_loop_check():
    """The loop check lets current-scaling recipes through (they then need TE as usual)."""
    from megatron_growloop.errors import UsageError
    from megatron_growloop.platform import te_importable
    from megatron_growloop.training.arguments import parse_args

    argv = BASE + ["--loop", "2x2", "--fp8-format", "e4m3", "--fp8-recipe", "tensorwise"]
    if te_importable():
        assert parse_args(argv).args.fp8_recipe == "tensorwise"
        return
    with pytest.raises(UsageError) as exc:  # without TE: the ordinary TE requirement, not the loop refusal
        parse_args(argv)
    assert "looped" not in str(exc.value) and "transformer" in str(exc.value).lower(), str(exc.value)


def test_loop_block_across_user_pp_layout_is_refused(capsys, tmp_path, monkeypatch):
    """A user-given PP layout whose stage boundary cuts the recurrent block is refused at
    parse time; boundaries outside the block are accepted (balanced default: [1, 3])."""
    from megatron_growloop.training.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", "2")
    pp = ["--loop", "1-2x3-1", "--pipeline-model-parallel-size", "2"]
    _main_fails(pp + ["--pipeline-model-parallel-layout", "Et*2|t*2L"], capsys, tmp_path,
                "stage boundary before layer 2")
    args = parse_args(BASE + pp + ["--pipeline-model-parallel-layout", "Et|t*3L"]).args
    assert args.loop == "1-2x3-1"
    args = parse_args(BASE + pp + ["--pipeline-model-parallel-layout", "Et*3|tL"]).args
    assert args.pipeline_model_parallel_layout == "Et*3|tL"


def test_cli_process_exit_status_and_no_traceback(tmp_path):
    """The real process: exit status 2, a single stderr line, no traceback, nothing saved."""
    save = tmp_path / "save"
    proc = pretrain(BASE + ["--loop", "0x4", "--save", save], check=False)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines == ["megatron_growloop.pretrain: error: invalid loop spec '0x4': block size L and repeats K "
                     "must be positive integers"], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not save.exists()
