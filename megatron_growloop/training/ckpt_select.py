"""Which checkpoint ``--load`` resumes: the latest, validated, or -- with
``--ckpt-fallback-to-previous`` -- the newest intact one when the latest is damaged."""

from __future__ import annotations

import os
from typing import Optional

from . import ckpt_validate
from .checkpointing import resolve_load_dir


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
