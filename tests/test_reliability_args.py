"""Argument gaps of issue 14: a --save that is a file, non-finite or negative rates, a
--num-layers that differs from the --load checkpoint; and under torchrun the first line of
stderr is the message."""

from __future__ import annotations

import pytest

from conftest import pretrain
from reliability_util import TINY, assert_one_line_error, run

PRE = "megatron_growloop.pretrain"


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--lr", "nan"], ["--lr nan", "not a finite number"]),
        (["--lr", "inf"], ["--lr inf", "not a finite number"]),
        (["--lr", "-1", "--min-lr", "-2"], ["--lr -1.0", ">= 0"]),
        (["--min-lr=-1e-5"], ["--min-lr -1e-05", ">= 0"]),
        (["--weight-decay", "nan"], ["--weight-decay nan"]),
        (["--adam-beta2", "1.5"], ["--adam-beta2 1.5", "[0, 1)"]),
        (["--adam-eps", "0"], ["--adam-eps 0.0", "> 0"]),
        (["--clip-grad", "-1"], ["--clip-grad -1.0"]),
        (["--init-method-std", "-0.02"], ["--init-method-std -0.02"]),
    ],
)
def test_non_finite_or_negative_rates(tmp_path, args, needles):
    from megatron_growloop.errors import UsageError
    from megatron_growloop.training.arguments import parse_args

    with pytest.raises(UsageError) as err:
        parse_args(TINY + ["--train-iters", "2", "--save", str(tmp_path / "save")] + args, world_size=1)
    for n in needles:
        assert n in str(err.value), (n, str(err.value))
    assert not (tmp_path / "save").exists()


def test_bad_rate_on_the_command_line_is_one_line(tmp_path):
    save = tmp_path / "save"
    proc = run(PRE, TINY + ["--train-iters", "2", "--save", save, "--lr", "-1", "--min-lr", "-2"])
    assert_one_line_error(proc, PRE, "--lr -1.0", ">= 0")
    assert not save.exists()


def test_save_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    proc = run(PRE, TINY + ["--train-iters", "2", "--save", f])
    assert_one_line_error(proc, PRE, f"--save '{f}' is a file")
    assert f.read_text() == "keep me"
    proc = run(PRE, TINY + ["--train-iters", "2", "--save", f / "sub"])
    assert_one_line_error(proc, PRE, "is a file, not a directory")


def test_num_layers_differing_from_the_checkpoint(tmp_path):
    """--num-layers 6 against a 4-layer checkpoint used to train 4 layers silently."""
    ck = tmp_path / "ck"
    pretrain(TINY + ["--train-iters", "2", "--save", ck])
    proc = run(PRE, TINY + ["--train-iters", "2", "--load", ck, "--num-layers", "6"])
    assert_one_line_error(proc, PRE, "--num-layers 6", "4 layers", "--use-checkpoint-args", "--finetune")
    for flag in ("--use-checkpoint-args", "--finetune"):
        proc = run(PRE, TINY + ["--train-iters", "3", "--load", ck, "--num-layers", "6", flag])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "model: 4 unique layers" in proc.stdout
    proc = run(PRE, TINY + ["--train-iters", "3", "--load", ck, "--num-layers", "4"])
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_under_torchrun_the_first_line_is_the_message(tmp_path):
    """torchrun appends its ChildFailedError block; the first stderr line is ours (README)."""
    from conftest import run_module

    proc = run_module(PRE, TINY + ["--train-iters", "2", "--lr", "nan"], nproc=2, check=False)
    assert proc.returncode != 0
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith(f"{PRE}: error: --lr nan"), proc.stderr[-3000:]
