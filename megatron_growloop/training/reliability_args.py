"""Reliability flags of ``pretrain`` and the argument checks that close the gaps found by
fault injection (issue 14): a ``--save`` that is a file, non-finite or negative rates, and a
``--num-layers`` that silently differs from the ``--load`` checkpoint.

All checks run in :func:`~megatron_growloop.training.arguments.parse_args`, before any
process group exists, so every rank raises the same one-line error and nothing is written.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import UsageError
from .stop_conditions import parse_signals


def add_reliability_args(parser) -> None:
    g = parser.add_argument_group("reliability")
    g.add_argument("--ckpt-fallback-to-previous", action="store_true",
                   help="if the latest --load checkpoint is damaged, load the newest intact one instead of stopping")
    g.add_argument("--no-ckpt-checksums", action="store_true",
                   help="do not write CRC-32 checksums of the shard files at save (sizes are always recorded)")
    g.add_argument("--no-verify-ckpt-checksums", action="store_true",
                   help="do not verify shard checksums before loading (sizes are always checked)")
    g.add_argument("--exit-signals", default="SIGTERM,SIGUSR1",
                   help="signals that make the run finish its step, save and exit 0 (what SLURM sends "
                        "before preemption or the time limit)")
    g.add_argument("--no-exit-signal-handler", dest="exit_signal_handler", action="store_false", default=True,
                   help="let --exit-signals act as usual (kill the process) instead")
    g.add_argument("--exit-signal-handler", dest="exit_signal_handler", action="store_true",
                   help="Megatron-LM's flag; on by default here")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="finish the step, save and exit 0 once this many minutes have passed since start")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", default=True,
                   help="do not stop on a NaN/Inf loss or gradient norm (Megatron-LM's flag)")
    g.add_argument("--no-layout-independent-init", dest="layout_independent_init", action="store_false",
                   default=True,
                   help="initialize with megatron-core's per-rank RNG streams (weights then depend on TP/PP)")


# (flag, lower bound, lower bound inclusive?) for float flags; every one must also be finite.
_FLOAT_BOUNDS = (
    ("lr", 0.0, True),
    ("min_lr", 0.0, True),
    ("weight_decay", 0.0, True),
    ("clip_grad", 0.0, True),
    ("adam_beta1", 0.0, True),
    ("adam_beta2", 0.0, True),
    ("adam_eps", 0.0, False),
    ("init_method_std", 0.0, False),
    ("norm_epsilon", 0.0, False),
    ("rotary_base", 0.0, False),
)


def check_reliability_flags(args) -> None:
    """The reliability flags themselves."""
    args.exit_signal_numbers = parse_signals(args.exit_signals.split(",")) if args.exit_signal_handler else ()
    d = args.exit_duration_in_mins
    if d is not None and (not math.isfinite(d) or d <= 0):
        raise UsageError(f"--exit-duration-in-mins {d} must be a positive number of minutes")
    if args.fp16 and args.check_for_nan_in_loss_and_grad:
        # As Megatron-LM (arguments.py): with dynamic loss scaling an Inf gradient is the loss
        # scaler's signal to skip the step, not divergence.
        args.check_for_nan_in_loss_and_grad = False


def check_float_flags(args) -> None:
    """Rates and scales must be finite and in range (torch's Adam raised a traceback for
    ``--lr nan`` and ``--lr -1 --min-lr -2``)."""
    for name, low, inclusive in _FLOAT_BOUNDS:
        v = getattr(args, name, None)
        if v is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(v):
            raise UsageError(f"{flag} {v} is not a finite number")
        if v < low or (v == low and not inclusive):
            rel = ">=" if inclusive else ">"
            raise UsageError(f"{flag} {v} is out of range: it must be {rel} {low:g}")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(args, name, None)
        if v is not None and v >= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} {v} is out of range: it must be in [0, 1)")


def check_save_path(save) -> None:
    """``--save`` must be a directory, or creatable as one."""
    if not save:
        return
    p = Path(save)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--save {str(save)!r} is a file, not a directory")
    q = p
    while not q.exists():
        if q.parent == q:
            break
        q = q.parent
    if q.exists() and not q.is_dir():
        raise UsageError(f"--save {str(save)!r}: {str(q)!r} is a file, not a directory")
    if q.exists() and not os.access(q, os.W_OK | os.X_OK):
        raise UsageError(f"--save {str(save)!r}: {str(q)!r} is not writable")


def check_depth_against_checkpoint(args, resume: Optional[Dict[str, Any]], explicit_num_layers: bool) -> None:
    """An explicit ``--num-layers`` that differs from the ``--load`` checkpoint's depth is
    refused unless ``--use-checkpoint-args`` or ``--finetune`` says to take the checkpoint's
    (before, the checkpoint's depth was trained silently); depth growth resumes at a larger
    depth by design and is checked by the growth controller instead."""
    if resume is None or not explicit_num_layers:
        return
    if args.use_checkpoint_args or args.finetune or getattr(args, "grow_method", None):
        return
    depth = (resume.get("arch") or {}).get("num_layers")
    if depth is not None and int(depth) != int(args.num_layers):
        raise UsageError(
            f"--num-layers {args.num_layers} differs from the {depth} layers of the --load checkpoint "
            f"{args.load!r}; drop --num-layers to resume, or pass --use-checkpoint-args or --finetune "
            "to take the checkpoint's depth"
        )
