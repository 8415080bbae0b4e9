"""The ``--load`` checkpoint a run starts from, and the architecture it resumes.

:func:`find_resume` reads the checkpoint's ``growloop.json`` once (before any process
group exists); :func:`apply_checkpoint_args` (``--use-checkpoint-args``) and
:func:`resolve_arch` take what they need from it.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Dict, Optional

from ..errors import UsageError
from ..model.arch import Arch
from .checkpointing import TRACKER, read_metadata, tokenizer_source

# Fields a resumed run must share with its checkpoint; the rest (depth, vocabulary padding,
# loop) come from the checkpoint, or may legitimately differ (sequence length, RoPE base).
MUST_MATCH = ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
              "untie_embeddings_and_output_weights", "rope_scaling")


def find_resume(args) -> Optional[Dict[str, Any]]:
    """The ``--load`` checkpoint's metadata, or None when the run starts from scratch.

    Megatron-LM's auto-resume idiom (``--save X --load X`` before X holds a checkpoint)
    starts from scratch: ``args.load`` is then cleared and ``args.fresh_start`` set."""
    args.fresh_start = False
    if not args.load:
        return None
    if (args.save and os.path.abspath(args.load) == os.path.abspath(args.save)
            and not os.path.exists(os.path.join(args.load, TRACKER))):
        if args.retrofit_loop or args.finetune:
            raise UsageError(f"--load {args.load!r} holds no checkpoint to continue from")
        args.load, args.fresh_start = None, True
        return None
    return read_metadata(args.load)


def apply_checkpoint_args(args, resume: Optional[Dict[str, Any]]) -> None:
    """``--use-checkpoint-args``: fill the architecture flags not given on the command line
    from the checkpoint's architecture record (before the preset fills the rest), and the
    tokenizer unless ``--tokenizer-model`` is given."""
    if resume is None:
        raise UsageError("--use-checkpoint-args needs --load CHECKPOINT")
    record = resume.get("arch") or {}
    for f in fields(Arch):
        if f.name == "loop" or not hasattr(args, f.name) or record.get(f.name) is None:
            continue
        if f.type in (bool, "bool"):
            setattr(args, f.name, bool(getattr(args, f.name)) or bool(record[f.name]))
        elif getattr(args, f.name) is None:
            setattr(args, f.name, record[f.name])
    tok_type, tok_model = tokenizer_source(resume)
    if args.tokenizer_model is None and tok_type:
        args.tokenizer_type, args.tokenizer_model = tok_type, tok_model


def resolve_arch(args, padded_vocab_size: int, resume: Optional[Dict[str, Any]]) -> Arch:
    """The architecture this run builds first: the flags' (``args.loop`` is the resolved
    loop), at the checkpoint's depth and vocabulary padding when resuming."""
    if resume is None:
        return Arch.from_args(args, padded_vocab_size)
    record = resume.get("arch") or {}
    for name in MUST_MATCH:
        if name in record and record[name] != getattr(args, name, None):
            flag = "--use-rope-scaling" if name == "rope_scaling" else "--" + name.replace("_", "-")
            raise UsageError(
                f"--load {args.load!r} has {name}={record[name]} but this run has {flag} "
                f"{getattr(args, name, None)} (pass --use-checkpoint-args to take the checkpoint's architecture)"
            )
    padded = record.get("padded_vocab_size", padded_vocab_size)
    if padded % args.tensor_model_parallel_size:
        raise UsageError(
            f"--load {args.load!r} has padded vocabulary {padded}, which TP "
            f"{args.tensor_model_parallel_size} cannot split; use another TP size"
        )
    return Arch.from_args(args, padded, num_layers=int(record.get("num_layers", args.num_layers)))
