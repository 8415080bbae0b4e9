"""Bad input: one line naming the value and what is allowed, exit status 2, no traceback, nothing written."""

import os
from pathlib import Path

import pytest

from conftest import ROOT, _env, pretrain

import subprocess
import sys

BASE = ["--tokenizer-type", "ByteTokenizer", "--train-iters", "2"]


def _run(args, world_size=1, tmp_path=None):
    env = _env()
    env["WORLD_SIZE"] = str(world_size)
    return subprocess.run([sys.executable, "-m", "megatron_growloop.pretrain", *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    err = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("megatron_growloop.pretrain: error:"), err
    assert "Traceback" not in proc.stderr + proc.stdout
    for n in needles:
        assert n in err[0], (n, err[0])


@pytest.mark.parametrize(
    "args,world,needles",
    [
        (["--model-preset", "nope"], 1, ["'nope'", "smollm-135m"]),
        (["--num-attention-heads", "3", "--num-query-groups", "3", "--hidden-size", "48",
          "--tensor-model-parallel-size", "2"], 2, ["3", "tensor-model-parallel-size 2"]),
        (["--num-layers", "2", "--pipeline-model-parallel-size", "4"], 4, ["--num-layers 2", "4"]),
        (["--data-path", "/nonexistent/prefix"], 1, ["/nonexistent/prefix", ".bin"]),
        (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, ["6", "4"]),
        (["--loop", "0x4"], 1, ["'0x4'"]),
        (["--loop", "4-4x4"], 1, ["'4-4x4'"]),
        (["--lr-decay-style", "WSD"], 1, ["--lr-wsd-decay-iters"]),
        (["--seq-length", "4096"], 1, ["4096", "--max-position-embeddings"]),
        (["--num-workers", "-1"], 1, ["--num-workers must be >= 0, got -1"]),
    ],
)
def test_bad_arguments(tmp_path, args, world, needles):
    save = tmp_path / "save"
    proc = _run(BASE + ["--save", str(save)] + args, world_size=world)
    _assert_one_line_error(proc, *needles)
    assert not save.exists(), "nothing may be written on bad input"


def test_missing_and_partial_checkpoints(tmp_path):
    save = tmp_path / "out"
    # no checkpoint at all
    proc = _run(BASE + ["--load", str(tmp_path / "missing"), "--save", str(save)])
    _assert_one_line_error(proc, "does not exist")
    # a directory with only an interrupted save (what a crash mid-save leaves behind)
    partial = tmp_path / "partial"
    (partial / "iter_0000004.tmp").mkdir(parents=True)
    proc = _run(BASE + ["--load", str(partial), "--save", str(save)])
    _assert_one_line_error(proc, "incomplete saves", "iter_0000004.tmp")
    # a corrupt tracker file
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "latest_checkpointed_iteration.txt").write_text("garbage")
    proc = _run(BASE + ["--load", str(corrupt), "--save", str(save)])
    _assert_one_line_error(proc, "corrupt")
    # the tracker points at a directory whose metadata was never written
    (corrupt / "latest_checkpointed_iteration.txt").write_text("3")
    (corrupt / "iter_0000003").mkdir()
    proc = _run(BASE + ["--load", str(corrupt), "--save", str(save)])
    _assert_one_line_error(proc, "incomplete or corrupt")
    assert not save.exists()
