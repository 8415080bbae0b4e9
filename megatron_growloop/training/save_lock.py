"""One writer per ``--save`` directory: a lock file naming its holder (host, pid, start time).

``SAVE/save.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local and network file
systems) by rank 0 of a training run and removed when the run ends, however it ends short of
SIGKILL.  A second run on the same directory gets one line naming the holder.

A lock whose holder is dead is *stale* and taken over (with a message):

* same host: the pid no longer exists, or it now belongs to another process (its start time
  in ``/proc/<pid>/stat`` differs from the recorded one);
* another host (a SLURM job requeued on another node): liveness cannot be asked, so the holder
  refreshes the lock file's mtime every :data:`HEARTBEAT_S` seconds and a lock not refreshed for
  :data:`STALE_AFTER_S` seconds is stale.

Take-over renames the stale file away first (only one of several racing runs can), then
creates a fresh lock with ``O_EXCL``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..errors import UsageError
from ..paths import pid_alive

LOCK_NAME = "save.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


@dataclass(frozen=True)
class LockHolder:
    """Who holds a save directory."""

    host: str
    pid: int
    start_time: float  # seconds since the epoch, when the lock was taken
    proc_start: Optional[int] = None  # /proc/<pid>/stat start time (clock ticks since boot), Linux only

    @staticmethod
    def me() -> "LockHolder":
        return LockHolder(socket.gethostname(), os.getpid(), time.time(), _proc_start(os.getpid()))

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start_time))
        return f"host {self.host}, pid {self.pid}, started {started}"


def _proc_start(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces; fields after its closing parenthesis
    fields = text[text.rindex(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 of proc(5): starttime
    except (IndexError, ValueError):
        return None


def read_holder(path: os.PathLike) -> Optional[LockHolder]:
    """The holder recorded in a lock file; ``None`` if it is unreadable (half-written)."""
    try:
        rec = json.loads(Path(path).read_text())
        return LockHolder(str(rec["host"]), int(rec["pid"]), float(rec["start_time"]),
                          None if rec.get("proc_start") is None else int(rec["proc_start"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_stale(path: os.PathLike, holder: Optional[LockHolder], now: Optional[float] = None,
             stale_after: float = STALE_AFTER_S) -> bool:
    """Whether the lock at ``path`` (held by ``holder``) belongs to a dead run."""
    now = time.time() if now is None else now
    try:
        age = now - Path(path).stat().st_mtime
    except OSError:
        return True  # gone meanwhile
    if holder is None:
        return age > 10.0  # a holder killed while writing the file; give a live writer 10 s
    if holder.host == socket.gethostname():
        if not pid_alive(holder.pid):
            return True
        cur = _proc_start(holder.pid)
        return holder.proc_start is not None and cur is not None and cur != holder.proc_start
    return age > stale_after


class SaveLock:
    """The lock of one save directory; :meth:`acquire` / :meth:`release` (or ``with``)."""

    def __init__(self, save_dir: os.PathLike, heartbeat_s: float = HEARTBEAT_S, stale_after: float = STALE_AFTER_S):
        self.dir = Path(save_dir)
        self.path = self.dir / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self.stale_after = stale_after
        self.holder: Optional[LockHolder] = None
        self.took_over: Optional[LockHolder] = None
        self._created_dir = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -------------------------------------------------------------- acquire / release
    def acquire(self) -> "SaveLock":
        if self.dir.exists() and not self.dir.is_dir():
            raise UsageError(f"--save {str(self.dir)!r} is a file, not a directory")
        if not self.dir.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            self._created_dir = True
        for _ in range(5):
            if self._try_create():
                self._start_heartbeat()
                return self
            holder = read_holder(self.path)
            if not is_stale(self.path, holder, stale_after=self.stale_after):
                self._undo_dir()
                who = holder.describe() if holder else "a run that is writing the lock file now"
                raise UsageError(
                    f"--save {str(self.dir)!r} is in use by another run ({who}; lock file {self.path}); "
                    "stop that run or choose another --save directory"
                )
            if self._take_over(holder):
                self.took_over = holder
        self._undo_dir()
        raise UsageError(f"--save {str(self.dir)!r}: could not take the lock file {self.path} (runs racing for it)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.holder is not None and read_holder(self.path) == self.holder:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.holder = None
        self._undo_dir()

    def __enter__(self) -> "SaveLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -------------------------------------------------------------- internals
    def _try_create(self) -> bool:
        me = LockHolder.me()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(asdict(me)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.holder = me
        return True

    def _take_over(self, stale: Optional[LockHolder]) -> bool:
        """Move a stale lock out of the way; ``False`` if another run changed it meanwhile."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if read_holder(aside) != stale:  # not the file judged stale: put it back unless replaced
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="save-lock-heartbeat", daemon=True)
        self._thread.start()

    def _undo_dir(self) -> None:
        """Remove the save directory again if this lock created it and nothing else was written."""
        if self._created_dir:
            try:
                self.dir.rmdir()
            except OSError:
                pass
            self._created_dir = False
