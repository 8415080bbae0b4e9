"""Runs stop cleanly (issue 14): SIGTERM/SIGUSR1 finish the step, save and exit 0;
--exit-duration-in-mins likewise; a NaN/Inf loss or gradient norm stops with one line naming the
iteration and the last good checkpoint and never saves a non-finite model; a killed worker
leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, _env, _free_port, read_metrics
from reliability_util import TINY, assert_one_line_error, run

PRE = "megatron_growloop.pretrain"


def _start(args, nproc=1, new_session=False):
    if nproc == 1:
        cmd = [sys.executable, "-m", PRE]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), "-m", PRE]
    return subprocess.Popen(cmd + [str(a) for a in args], env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session)


def _wait_for_iteration(metrics: Path, n: int, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists() and len(read_metrics(metrics)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("the run did not reach iteration %d" % n)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_exit_signal_finishes_the_step_saves_and_exits_0(tmp_path, sig):
    save, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    proc = _start(TINY + ["--train-iters", "1000", "--save", save, "--metrics-file", metrics])
    _wait_for_iteration(metrics, 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    it = read_metrics(metrics)[-1]["iteration"]
    assert f"received {sig.name} at iteration {it}: checkpoint saved to {save / f'iter_{it:07d}'}; exiting" in out
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(it)
    assert not (save / "save.lock").exists()
    # and the run resumes from there
    proc = run(PRE, TINY + ["--train-iters", str(it + 1), "--load", save, "--metrics-file", metrics])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(metrics)[-1]["iteration"] == it + 1


def test_exit_duration_in_mins(tmp_path):
    save = tmp_path / "ck"
    proc = run(PRE, TINY + ["--train-iters", "1000", "--save", save, "--exit-duration-in-mins", "0.0001"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--exit-duration-in-mins reached" in proc.stdout and "at iteration 1: checkpoint saved" in proc.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_divergence_stops_with_one_line_and_saves_nothing_after_it(tmp_path, dist_1rank):
    """--lr 1e6: the gradient norm becomes NaN a few steps in; the run stops there (exit 3),
    names the iteration and the last good checkpoint, and every checkpoint on disk is finite."""
    import torch
    from megatron.core import dist_checkpointing

    save, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    proc = run(PRE, TINY + ["--train-iters", "20", "--save-interval", "2", "--save", save, "--lr", "1e6",
                            "--metrics-file", metrics])
    line = assert_one_line_error(proc, PRE, "training diverged at iteration", "stopped without saving", code=3)
    records = read_metrics(metrics)
    bad = records[-1]["iteration"]
    assert f"at iteration {bad}:" in line
    last = (save / "latest_checkpointed_iteration.txt").read_text()
    assert int(last) < bad and f"last good checkpoint: {save / f'iter_{int(last):07d}'}" in line
    for d in save.glob("iter_*"):
        tensors = dist_checkpointing.load_plain_tensors(str(d))
        assert all(torch.isfinite(t).all() for t in tensors.values() if isinstance(t, torch.Tensor)), d


def test_a_non_finite_model_is_never_saved(tmp_path, dist_1rank):
    import torch

    from megatron_growloop.errors import UsageError
    from megatron_growloop.model.arch import Arch
    from megatron_growloop.model.gpt import build_inference_model
    from megatron_growloop.training.checkpointing import save_checkpoint

    arch = Arch(num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=64,
                kv_channels=16, seq_length=16, max_position_embeddings=32, padded_vocab_size=128)
    model = build_inference_model(arch)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(UsageError, match="refusing to save checkpoint iteration 3: the model has NaN/Inf"):
        save_checkpoint(str(tmp_path / "ck"), 3, [model], metadata={"arch": arch.to_meta()})
    assert not (tmp_path / "ck").exists()


def test_no_check_flag_lets_the_run_continue(tmp_path):
    """--no-check-for-nan-in-loss-and-grad (Megatron-LM's flag) turns the stop off; the save guard
    still refuses to write NaN weights."""
    proc = run(PRE, TINY + ["--train-iters", "8", "--lr", "1e6", "--no-check-for-nan-in-loss-and-grad",
                            "--save", tmp_path / "ck"])
    assert_one_line_error(proc, PRE, "refusing to save checkpoint iteration 8")


def _session_processes(sid: int):
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid:  # field 6 of proc(5): session id
            out.append((int(p.name), stat[stat.index("(") + 1:stat.rindex(")")]))
    return out


@pytest.mark.slow
def test_torchrun_signals_and_a_killed_worker(tmp_path):
    """SIGTERM to one worker: every rank finishes the step, saves, and torchrun exits 0.
    SIGTERM to torchrun: it forwards the signal, the workers save and exit 0 (torchrun itself
    re-raises the signal, exit 1). kill -9 of a worker after saves: no process of the job is
    left (the in-process writer starts no helper processes)."""
    for target in ("worker", "torchrun"):
        save, metrics = tmp_path / f"ck_{target}", tmp_path / f"m_{target}.jsonl"
        proc = _start(TINY + ["--train-iters", "1000", "--save", save, "--metrics-file", metrics], nproc=2)
        _wait_for_iteration(metrics, 2, proc)
        pid = proc.pid
        if target == "worker":
            pid = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)], text=True).split()[-1])
        os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
        it = read_metrics(metrics)[-1]["iteration"]
        assert f"received SIGTERM at iteration {it}: checkpoint saved" in out, (out[-2000:], err[-3000:])
        assert (save / "latest_checkpointed_iteration.txt").read_text() == str(it)
        assert proc.returncode == (0 if target == "worker" else 1), err[-3000:]

    save, metrics = tmp_path / "ck_kill", tmp_path / "m_kill.jsonl"
    proc = _start(TINY + ["--train-iters", "1000", "--save", save, "--save-interval", "2", "--metrics-file", metrics],
                  nproc=2, new_session=True)
    _wait_for_iteration(metrics, 5, proc)
    worker = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)], text=True).split()[0])
    os.kill(worker, signal.SIGKILL)
    proc.communicate(timeout=240)
    assert proc.returncode != 0
    deadline = time.time() + 30
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert _session_processes(proc.pid) == []
