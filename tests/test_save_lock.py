"""One writer per --save directory (issue 14): a lock file with host, pid and start time; a
second run gets one line naming the holder; a dead holder's lock is taken over; the lock is
released when the run ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, _env
from reliability_util import TINY, assert_one_line_error, run

from megatron_growloop.errors import UsageError
from megatron_growloop.training.save_lock import LOCK_NAME, SaveLock, read_holder

PRE = "megatron_growloop.pretrain"


def _write_lock(path, **rec):
    base = dict(host=socket.gethostname(), pid=os.getpid(), start_time=time.time(), proc_start=None)
    base.update(rec)
    path.write_text(json.dumps(base))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_records_holder_and_is_released(tmp_path):
    lock = SaveLock(tmp_path / "save").acquire()
    h = read_holder(tmp_path / "save" / LOCK_NAME)
    assert h == lock.holder and h.pid == os.getpid() and h.host == socket.gethostname()
    assert abs(h.start_time - time.time()) < 60
    lock.release()
    assert not (tmp_path / "save" / LOCK_NAME).exists()
    assert not (tmp_path / "save").exists(), "a directory the lock created and nothing filled is removed"


def test_second_writer_gets_one_line_naming_the_holder(tmp_path):
    with SaveLock(tmp_path):
        with pytest.raises(UsageError) as err:
            SaveLock(tmp_path).acquire()
    msg = str(err.value)
    assert "\n" not in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "in use" in msg


def test_dead_holder_is_taken_over(tmp_path):
    _write_lock(tmp_path / LOCK_NAME, pid=_dead_pid())
    lock = SaveLock(tmp_path).acquire()
    assert lock.took_over is not None and read_holder(tmp_path / LOCK_NAME).pid == os.getpid()
    lock.release()


def test_reused_pid_is_stale(tmp_path):
    """The recorded pid is alive but is another process (a different start time)."""
    _write_lock(tmp_path / LOCK_NAME, pid=os.getpid(), proc_start=1)
    with SaveLock(tmp_path) as lock:
        assert lock.took_over is not None


def test_other_host_is_stale_only_without_heartbeat(tmp_path):
    path = tmp_path / LOCK_NAME
    _write_lock(path, host="some-other-node", pid=12345)
    with pytest.raises(UsageError, match="some-other-node"):
        SaveLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    with SaveLock(tmp_path) as lock:
        assert lock.took_over.host == "some-other-node"


def test_heartbeat_refreshes_the_lock(tmp_path):
    with SaveLock(tmp_path, heartbeat_s=0.05):
        path = tmp_path / LOCK_NAME
        old = time.time() - 3600
        os.utime(path, (old, old))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 60


def test_half_written_lock_is_stale_after_a_grace_period(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text('{"host": ')
    with pytest.raises(UsageError, match="writing the lock file"):
        SaveLock(tmp_path).acquire()
    old = time.time() - 60
    os.utime(path, (old, old))
    with SaveLock(tmp_path) as lock:
        assert lock.took_over is None  # nothing readable to report


def test_save_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        SaveLock(f).acquire()


HOLD = """
import sys, time
from megatron_growloop.training.save_lock import SaveLock
SaveLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_pretrain_refuses_a_held_directory_and_takes_over_a_dead_one(tmp_path):
    """A live holder: the run is refused in one line naming it (nothing written).  The holder
    killed with SIGKILL: the next run takes the lock over, says so, trains, and releases it."""
    ck = tmp_path / "ck"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ck)], env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run(PRE, TINY + ["--train-iters", "2", "--save", ck])
        assert_one_line_error(proc, PRE, "is in use by another run", f"pid {holder.pid}", socket.gethostname())
        assert sorted(p.name for p in ck.iterdir()) == [LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    proc = run(PRE, TINY + ["--train-iters", "2", "--save", ck])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"took over the lock of {ck} from a dead run (host {socket.gethostname()}, pid {holder.pid}" in proc.stdout
    assert not (ck / LOCK_NAME).exists(), "released at exit"
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "2"


def test_lock_is_released_when_the_run_fails(tmp_path):
    """A run that stops with an error (here: no data for its split) releases the lock and
    leaves no directory it created."""
    ck = tmp_path / "ck"
    proc = run(PRE, TINY + ["--train-iters", "2", "--save", ck, "--split", "0,1,0"])
    assert_one_line_error(proc, PRE)
    assert not ck.exists()
