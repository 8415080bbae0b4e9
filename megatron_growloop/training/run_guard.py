"""What a training run does around its work: take the ``--save`` lock, clean up after
interrupted saves, and choose (validate) the ``--load`` checkpoint -- on every rank alike.

>>> trainer = Trainer(args)                  # process groups exist from here on
>>> with guarded_run(args):                  # lock, leftovers, checkpoint selection
...     trainer.setup(); trainer.train()     # the lock is released however this ends

Rank 0 holds the lock; its verdict is broadcast so every rank raises the same one-line
:class:`~megatron_growloop.errors.UsageError` (only rank 0 prints it).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch.distributed as dist

from ..errors import UsageError
from . import ckpt_commit, ckpt_validate
from .checkpointing import resolve_load_dir
from .save_lock import SaveLock


def _broadcast_error(msg: Optional[str]) -> None:
    box = [msg]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UsageError(box[0])


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@contextmanager
def guarded_run(args, log=print) -> Iterator[Optional[SaveLock]]:
    """Lock ``args.save`` (rank 0), recover it, select ``args.load``; release the lock at the end."""
    lock = SaveLock(args.save) if args.save else None
    msg = None
    if lock is not None and _is_rank0():
        try:
            lock.acquire()
        except UsageError as exc:
            msg = str(exc)
    _broadcast_error(msg)
    try:
        if lock is not None and _is_rank0():
            if lock.took_over is not None:
                log(f"took over the lock of {args.save} from a dead run ({lock.took_over.describe()})", flush=True)
            for line in ckpt_commit.recover_save_dir(args.save, ckpt_validate.TRACKER):
                log(line, flush=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        select_load(args)
        yield lock
    finally:
        if lock is not None and _is_rank0():
            lock.release()


def select_checkpoint(load: str, fallback: bool, checksums: bool, announce: bool = True) -> Optional[str]:
    """The checkpoint ``--load`` should use: the directory of the latest (validated) one.  A damaged latest raises one line, or -- with
    ``fallback`` -- is replaced by the newest intact one (with a message)."""
    try:
        ckpt, _ = resolve_load_dir(load)
        if checksums:
            problem = ckpt_validate.verify_checksums(ckpt)
            if problem is not None:
                ckpt_validate.raise_damaged(ckpt, problem, verify_checksums=True)
        return str(ckpt)
    except ckpt_validate.DamagedCheckpoint as dmg:
        if not fallback:
            raise
        if dmg.intact is None:
            raise
        intact = dmg.intact  # newest_intact verified its checksums too (same answer on every rank)
        if announce:
            print(f"checkpoint {dmg.ckpt} is damaged ({dmg.problem}); --ckpt-fallback-to-previous: "
                  f"loading {intact}", flush=True)
        return intact


def select_load(args) -> None:
    """Validate the ``--load`` checkpoint (checksums divided among the ranks) and, with
    ``--ckpt-fallback-to-previous``, switch ``args.load`` to the newest intact one."""
    load = getattr(args, "load", None)
    if not load or not ckpt_validate.holds_checkpoint(load):
        return
    verify = not getattr(args, "no_verify_ckpt_checksums", False)
    fallback = bool(getattr(args, "ckpt_fallback_to_previous", False))
    chosen = select_checkpoint(load, fallback=fallback, checksums=verify, announce=_is_rank0())
    if not verify and chosen:
        ckpt_validate.mark_verified(chosen)
    if chosen and fallback and os.path.abspath(chosen) != os.path.abspath(ckpt_validate.latest_dir(load) or chosen):
        args.load = chosen


def fallback_before_parse(args) -> None:
    """Structural fallback that must happen before ``--use-checkpoint-args`` reads the
    checkpoint's architecture (no process group yet; no checksums)."""
    if not getattr(args, "load", None) or not getattr(args, "ckpt_fallback_to_previous", False):
        return
    if not ckpt_validate.holds_checkpoint(args.load):
        return
    chosen = select_checkpoint(args.load, fallback=True, checksums=False,
                                             announce=os.environ.get("RANK", "0") == "0")
    latest = ckpt_validate.latest_dir(args.load)
    if chosen and latest and os.path.abspath(chosen) != os.path.abspath(latest):
        args.load = chosen
