"""What a training run does around its work: take the ``--save`` lock, clean up after
interrupted saves, and choose (validate) the ``--load`` checkpoint -- on every rank alike.

>>> init_distributed(...)                    # process groups exist from here on
>>> with guarded_run(launch) as launch:      # lock, leftovers, checkpoint selection
...     trainer = Trainer(launch)            # the --load it resumes may have changed (fallback)
...     trainer.setup(); trainer.train()     # the lock is released however this ends

Rank 0 holds the lock; its verdict is broadcast so every rank raises the same one-line
:class:`~megatron_growloop.errors.UsageError` (only rank 0 prints it).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, Optional

import torch.distributed as dist

from ..errors import UsageError
from . import ckpt_commit, ckpt_validate
from .arguments import Launch
from .checkpointing import read_metadata
from .ckpt_select import select_checkpoint
from .initialize import init_distributed, rng_options, teardown
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
def guarded_run(launch: Launch, log=print) -> Iterator[Launch]:
    """Lock ``--save`` (rank 0), recover it, select ``--load``; release the lock at the end.
    Yields the launch, with the checkpoint metadata re-read when ``--load`` changed (fallback)."""
    args = launch.args
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
        before = args.load
        select_load(args)
        if args.load != before:
            launch = replace(launch, resume=read_metadata(args.load))
        yield launch
    finally:
        if lock is not None and _is_rank0():
            lock.release()


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


def run_training(launch: Launch, make_trainer: Callable[[Launch], Any]) -> Dict[str, Any]:
    """A whole training run, for every entry point (``pretrain``, ``finetune``): process groups,
    the guarded run around the trainer ``make_trainer(launch)`` builds, the closing lines, teardown."""
    a = launch.args
    init_distributed(a.tensor_model_parallel_size, a.pipeline_model_parallel_size, backend=a.distributed_backend,
                     timeout_minutes=a.distributed_timeout_minutes, seed=a.seed, **rng_options(a))
    # one writer per --save, leftovers of interrupted saves, the validated --load checkpoint
    with guarded_run(launch) as launch:
        trainer = make_trainer(launch)
        trainer.setup()
        summary = trainer.train()
    if trainer.is_logging_rank:
        loss = summary["final_loss"]
        print(f"done: {summary['iteration']} iterations, final loss {loss if loss is None else round(loss, 4)}",
              flush=True)
        if summary["checkpoint"]:
            print(f"checkpoint: {summary['checkpoint']}", flush=True)
        if summary.get("tensorboard_dir"):
            board = summary["tensorboard_dir"]
            print(f"tensorboard logs: {board}  (tensorboard --logdir {board})", flush=True)
    teardown()
    return summary
