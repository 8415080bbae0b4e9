"""Checkpoints resume exactly and load at another parallel layout; saves are atomic."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, _env, pretrain, read_metrics

COMMON = ["--tokenizer-type", "ByteTokenizer", "--global-batch-size", "4", "--micro-batch-size", "2",
          "--log-interval", "1", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--seed", "3",
          "--eval-interval", "2", "--eval-iters", "1"]


def _losses(path):
    return [r["loss"] for r in read_metrics(path)]


def test_exact_resume_cpu_fp32(tmp_path):
    """6 steps straight == 3 steps + save + resume + 3 steps, bitwise (fp32 on CPU); the split run
    reads through Megatron-LM's worker data loader, which must not change the data or the position."""
    straight = tmp_path / "straight.jsonl"
    pretrain(COMMON + ["--train-iters", "6", "--metrics-file", str(straight)])
    split = tmp_path / "split.jsonl"
    ck = tmp_path / "ck"
    workers = ["--num-workers", "2"]
    pretrain(COMMON + workers + ["--train-iters", "6", "--exit-interval", "3", "--save", str(ck),
                                 "--metrics-file", str(split)])
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "3"
    pretrain(COMMON + workers + ["--train-iters", "6", "--load", str(ck), "--save", str(ck),
                                 "--metrics-file", str(split)])
    a, b = _losses(straight), _losses(split)
    assert len(a) == len(b) == 6
    assert a == b, (a, b)
    # learning rate continues the same schedule
    assert [r["lr"] for r in read_metrics(straight)] == [r["lr"] for r in read_metrics(split)]


@pytest.mark.slow
def test_resharded_resume_with_optimizer(tmp_path):
    """Saved at DP=2 with the distributed optimizer in the fully reshardable format, resumed at
    TP=2 and at PP=2: training continues as the uninterrupted single-process run (model *and*
    Adam state resharded).  In the default dp_reshardable format (Megatron-LM's) it resumes at
    DP=1 likewise, and a TP change is refused in one line."""
    start = tmp_path / "start"
    pretrain(["--tokenizer-type", "ByteTokenizer", "--train-iters", "1", "--lr", "0", "--save", str(start)])
    ref = tmp_path / "ref.jsonl"
    pretrain(COMMON + ["--train-iters", "6", "--load", str(start), "--finetune", "--metrics-file", str(ref)])
    want = _losses(ref)[3:]
    ck, ck_dp = tmp_path / "ck", tmp_path / "ck_dp"
    first = COMMON + ["--train-iters", "6", "--exit-interval", "3", "--load", str(start), "--finetune",
                      "--use-distributed-optimizer"]
    pretrain(first + ["--save", str(ck), "--dist-ckpt-optim-fully-reshardable"], nproc=2)
    pretrain(first + ["--save", str(ck_dp)], nproc=2)
    runs = [(ck, 2, ["--tensor-model-parallel-size", "2"]), (ck, 2, ["--pipeline-model-parallel-size", "2"]),
            (ck_dp, 1, [])]
    for i, (load, nproc, extra) in enumerate(runs):
        m = tmp_path / f"m{i}.jsonl"
        pretrain(COMMON + ["--train-iters", "6", "--load", str(load), "--metrics-file", str(m),
                           "--use-distributed-optimizer"] + extra, nproc=nproc)
        got = _losses(m)
        assert len(got) == 3
        assert got == pytest.approx(want, rel=2e-5), (extra, got, want)
    proc = pretrain(COMMON + ["--train-iters", "6", "--load", str(ck_dp), "--use-distributed-optimizer",
                              "--tensor-model-parallel-size", "2"], nproc=2, check=False)
    assert proc.returncode != 0 and "dp_reshardable" in proc.stderr and "--dist-ckpt-optim-fully-reshardable" in proc.stderr
    # the optimizer type must match; the error says so in one line
    proc = pretrain(COMMON + ["--train-iters", "6", "--load", str(ck)], check=False)
    assert proc.returncode == 2 and "--use-distributed-optimizer" in proc.stderr


CRASH = r"""
import sys, megatron.core.dist_checkpointing as dc
real = dc.save
calls = {"n": 0}
def flaky(sd, d, *a, **k):
    calls["n"] += 1
    if calls["n"] == 2:           # second save: write some shards, then die
        real(sd, d, *a, **k)
        raise SystemExit(17)
    return real(sd, d, *a, **k)
dc.save = flaky
from megatron_growloop.pretrain import main
main(sys.argv[1:])
"""


def test_crash_during_save_keeps_last_good_checkpoint(tmp_path):
    """A save that dies mid-way leaves the previous checkpoint and the latest marker intact."""
    ck = tmp_path / "ck"
    args = COMMON + ["--train-iters", "4", "--save-interval", "2", "--save", str(ck)]
    proc = subprocess.run([sys.executable, "-c", CRASH, *args], env=_env(), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (ck / "iter_0000002" / "growloop.json").exists()
    assert not (ck / "iter_0000004").exists()
    # and the run resumes from the last good checkpoint
    m = tmp_path / "m.jsonl"
    pretrain(COMMON + ["--train-iters", "4", "--load", str(ck), "--save", str(ck), "--metrics-file", str(m)])
    assert [r["iteration"] for r in read_metrics(m)] == [3, 4]
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_bf16_trains_saves_and_resumes_exactly(tmp_path):
    """--bf16 (Float16Module + fp32 main params) saves and resumes bitwise on CPU."""
    args = ["--tokenizer-type", "ByteTokenizer", "--global-batch-size", "4", "--micro-batch-size", "2",
            "--bf16", "--train-iters", "4", "--seed", "5"]
    straight, split, ck = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "ck"
    pretrain(args + ["--metrics-file", str(straight)])
    pretrain(args + ["--exit-interval", "2", "--save", str(ck), "--metrics-file", str(split)])
    pretrain(args + ["--load", str(ck), "--metrics-file", str(split)])
    assert _losses(straight) == _losses(split)
    import json

    meta = json.loads((ck / "iter_0000002" / "growloop.json").read_text())
    assert meta["has_optimizer"]
