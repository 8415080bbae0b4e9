"""Directory operations that make a checkpoint save atomic, and recovery of interrupted ones.

The save protocol (rank 0, after every rank has written ``iter_N.tmp`` completely)::

    fsync iter_N.tmp                       # its files were fsynced by the writer
    iter_N      -> iter_N.old              # only when iteration N exists already (a re-save)
    iter_N.tmp  -> iter_N                  # the new checkpoint is in place
    latest_checkpointed_iteration.txt      # replaced atomically (write .tmp, fsync, rename)
    rm -r iter_N.old                       # the old copy goes last

A kill at any point leaves a loadable latest checkpoint: before the first rename nothing has
changed; between the two renames the marker names ``iter_N`` while the data sits in
``iter_N.old``, which :func:`~megatron_growloop.training.checkpointing.resolve_load_dir` reads and
:func:`recover_save_dir` renames back; after the second rename ``iter_N`` is the new, complete
checkpoint.  (The previous implementation deleted ``iter_N`` before renaming the new one in, and a
kill between the two lost the latest checkpoint.)

:func:`recover_save_dir` runs at start-up, under the save-directory lock, and removes what an
interrupted save left behind (``iter_*.tmp``) with a message.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import List, Optional

TMP_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".old"
# errno values that mean "the file system is full" (ENOSPC) or "over quota" (EDQUOT).
FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# Free space below this when a save fails: treat the failure as a full disk (torch's zip writer
# reports a short write as "RuntimeError: ... unexpected pos N vs M", without an errno).
FULL_DISK_SLACK_BYTES = 16 << 20


def fsync_dir(path: os.PathLike) -> None:
    """Make a directory's entries (renames, new files) durable."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via ``path.tmp`` + fsync + rename (readers see old or new)."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(path.parent)


def commit_iteration(root: os.PathLike, tmp: os.PathLike, final: os.PathLike, tracker: os.PathLike,
                     iteration: int) -> None:
    """Move a completely written ``tmp`` checkpoint into place at ``final`` and point the
    ``tracker`` at it, never removing the previous copy of ``final`` before the new one is there."""
    root, tmp, final = Path(root), Path(tmp), Path(final)
    fsync_dir(tmp)
    aside: Optional[Path] = None
    if final.exists():
        aside = final.with_name(final.name + ASIDE_SUFFIX)
        if aside.exists():  # left by an earlier interrupted re-save; ``final`` is complete
            shutil.rmtree(aside)
        os.rename(final, aside)
        fsync_dir(root)
    os.rename(tmp, final)
    fsync_dir(root)
    write_atomic(tracker, str(iteration))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def recover_save_dir(root: os.PathLike, tracker_name: str = "latest_checkpointed_iteration.txt") -> List[str]:
    """Clean up after interrupted saves; return one message per action.

    * ``iter_N.tmp`` (an incomplete save) and a stray ``<tracker>.tmp`` are removed;
    * ``iter_N.old`` next to ``iter_N`` (a re-save that completed its rename) is removed;
    * ``iter_N.old`` without ``iter_N`` (a re-save killed between its two renames) is renamed back.
    """
    root = Path(root)
    msgs: List[str] = []
    if not root.is_dir():
        return msgs
    for p in sorted(root.iterdir()):
        name = p.name
        if name.startswith("iter_") and name.endswith(TMP_SUFFIX):
            _remove(p)
            msgs.append(f"removed {p} (an incomplete save left by an interrupted run)")
        elif name.startswith("iter_") and name.endswith(ASIDE_SUFFIX) and p.is_dir():
            final = p.with_name(name[: -len(ASIDE_SUFFIX)])
            if final.exists():
                _remove(p)
                msgs.append(f"removed {p} (superseded by {final.name}; a re-save was interrupted before cleanup)")
            else:
                os.rename(p, final)
                msgs.append(f"restored {final} from {p.name} (a re-save was interrupted between its renames)")
        elif name == tracker_name + TMP_SUFFIX and p.is_file():
            _remove(p)
            msgs.append(f"removed {p} (a partial file left by an interrupted run)")
    if msgs:
        fsync_dir(root)
    return msgs


def is_out_of_space(exc: BaseException, path: os.PathLike) -> bool:
    """Whether a failed save failed because the file system is full.

    Looks for ENOSPC/EDQUOT in the exception, its causes and (torch's ``CheckpointException``)
    every rank's failure; else checks the free space left at ``path``."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):  # torch's CheckpointException: {rank: (exception, traceback)}
            todo.extend(f[0] if isinstance(f, tuple) and f else f for f in failures.values())
        todo.extend([e.__cause__, e.__context__])
    return free_bytes(path) < FULL_DISK_SLACK_BYTES


def free_bytes(path: os.PathLike) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 1 << 62


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        _unlink(p)


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
