"""Run ``python -m MODULE ARGS`` with faults injected, chosen by environment variables:

* ``FAULT_KILL_AT_RENAME=N``: SIGKILL this process at the N-th ``os.rename``/``os.replace`` whose
  source or destination contains ``FAULT_PATH`` (the save directory) -- the kill -9 points of a save.
* ``FAULT_KILL_AT_RMTREE=N``: the same at the N-th ``shutil.rmtree`` under ``FAULT_PATH``.
* ``FAULT_KILL_AFTER_S=T``: SIGKILL this process T seconds after start (a random point of a run).
* ``FAULT_ENOSPC_AT_SAVE=N``: the N-th checkpoint save fails writing a shard with ENOSPC, after
  part of the shard is on disk (what a full disk does).

Without these variables the module runs unchanged.
"""

from __future__ import annotations

import errno
import os
import runpy
import shutil
import signal
import sys
import threading


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install() -> None:
    path = os.environ.get("FAULT_PATH", "")
    at_rename = int(os.environ.get("FAULT_KILL_AT_RENAME", "0"))
    at_rmtree = int(os.environ.get("FAULT_KILL_AT_RMTREE", "0"))
    after_s = float(os.environ.get("FAULT_KILL_AFTER_S", "0"))
    enospc_at = int(os.environ.get("FAULT_ENOSPC_AT_SAVE", "0"))
    counts = {"rename": 0, "rmtree": 0, "save": 0}

    def counted(kind, limit, fn):
        def wrapper(*args, **kwargs):
            if any(path and path in str(a) for a in args[:2]):
                counts[kind] += 1
                if counts[kind] == limit:
                    _kill_self()
            return fn(*args, **kwargs)

        return wrapper

    if at_rename:
        os.rename = counted("rename", at_rename, os.rename)
        os.replace = counted("rename", at_rename, os.replace)
    if at_rmtree:
        shutil.rmtree = counted("rmtree", at_rmtree, shutil.rmtree)
    if after_s > 0:
        t = threading.Timer(after_s, _kill_self)
        t.daemon = True
        t.start()
    if enospc_at:
        import megatron.core.dist_checkpointing as dc
        import torch.distributed.checkpoint.filesystem as fs

        real_save, real_write = dc.save, fs._write_item

        def save(*args, **kwargs):
            counts["save"] += 1
            return real_save(*args, **kwargs)

        def write_item(transforms, stream, data, *args, **kwargs):
            if counts["save"] == enospc_at:
                stream.write(b"\0" * 512)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(transforms, stream, data, *args, **kwargs)

        dc.save = save
        fs._write_item = write_item


if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]
    _install()
    runpy.run_module(module, run_name="__main__", alter_sys=True)
