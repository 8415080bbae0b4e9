"""Load a trained checkpoint as a model for inference, evaluation and analysis.

>>> from megatron_growloop.training.inference import load_model
>>> model, meta, tokenizer = load_model("runs/lidas", repeat_blocks=["8:12:2"])

Works in a plain Python process (a one-process gloo/nccl group is created) and
under ``torchrun`` at any TP/PP (initialise with
:func:`megatron_growloop.training.initialize.init_distributed` first; the
checkpoint is resharded on load).  Logits come back gathered over TP.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence, Tuple

from megatron.core import parallel_state

from .. import platform
from ..data.tokenizer import build_tokenizer
from ..errors import UsageError
from ..looping.spec import RepeatBlock
from ..model.arch import Arch
from ..model.gpt import GrowLoopGPTModel, build_inference_model
from ..model.implementation import Implementation
from . import checkpointing
from .initialize import init_distributed, is_rank0


def checkpoint_arch(meta: Dict[str, Any], loop_repeats: Optional[int] = None) -> Arch:
    """The architecture a checkpoint records, with k changed to ``loop_repeats`` when given."""
    arch = Arch.from_meta(meta.get("arch") or {})
    if loop_repeats is not None:
        if arch.loop is None:
            raise UsageError(
                f"--loop-repeats {loop_repeats}: checkpoint {meta.get('_dir')!r} has no loop (use --repeat-block)"
            )
        arch = arch.with_repeats(loop_repeats)
    return arch


def load_model(
    ckpt: str,
    loop_repeats: Optional[int] = None,
    repeat_blocks: Sequence[str] = (),
    impl: Implementation = Implementation(),
    tokenizer: bool = True,
) -> Tuple[GrowLoopGPTModel, Dict[str, Any], Any]:
    """``(model, metadata, tokenizer)`` for a checkpoint directory (a ``--save`` dir or ``iter_*``).

    ``loop_repeats`` changes k of a looped model; ``repeat_blocks`` (``"S:E:R"``) repeats
    blocks of the effective-depth axis of any model.
    """
    if not parallel_state.model_parallel_is_initialized():
        init_distributed(1, 1)
    meta = checkpointing.read_metadata(ckpt)
    arch = checkpoint_arch(meta, loop_repeats)
    blocks = [RepeatBlock.parse(str(b), what="--repeat-block") for b in repeat_blocks]
    if is_rank0():
        for line in impl.warnings(platform.has_cuda()):
            print(f"warning: {line} ({impl.describe()})", file=sys.stderr, flush=True)
    model = build_inference_model(arch, blocks, impl)
    checkpointing.load_checkpoint(meta["_dir"], [model], load_rng=False)
    tok = None
    if tokenizer and meta.get("tokenizer"):
        tok_type, tok_model = checkpointing.tokenizer_source(meta)
        if tok_type:
            tok = build_tokenizer(tok_type, tok_model)
    return model, meta, tok
