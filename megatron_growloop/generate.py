"""Greedy generation from a checkpoint, with k and repeated blocks chosen at run time.

    python -m megatron_growloop.generate --load CKPT --prompt "The cat" \\
        --max-new-tokens 32 [--loop-repeats K] [--repeat-block START:END:R ...] [--no-cache]

Runs any checkpoint (baseline, grown, looped, retrofitted) with its trained schedule
changed at inference: ``--loop-repeats`` sets k of a looped model, ``--repeat-block``
repeats positions of the effective-depth axis (the paper's §4.2 experiment).  Prints
the model's schedule, its effective depth and the continuation.  PP=1; any TP under
``torchrun``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

import torch

from .errors import ArgumentParser, UsageError, cli_errors
from .looping.cli import add_inference_loop_args, validate_inference_loop_args
from .looping.spec import RepeatBlock
from .model.generate import greedy_generate
from .model.implementation import Implementation
from .training import checkpointing
from .training.inference import checkpoint_arch, load_model
from .training.initialize import init_distributed, is_rank0, teardown

PROG = "megatron_growloop.generate"
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (a --save dir or one iter_* dir)")
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable: a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-cache", action="store_true", help="recompute the full sequence at every step")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    add_inference_loop_args(p)
    return p


def check_schedule(meta: dict, loop_repeats: Optional[int], repeat_blocks: List[str]) -> List[int]:
    """The schedule the checkpoint will run with; raises a one-line error for bad specs."""
    arch = checkpoint_arch(meta, loop_repeats)
    return arch.schedule([RepeatBlock.parse(b) for b in repeat_blocks])


def main(argv: Optional[List[str]] = None) -> List[str]:
    with cli_errors(PROG):
        args = build_parser().parse_args(argv)
        validate_inference_loop_args(args)
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        meta = checkpointing.read_metadata(args.load)
        schedule = check_schedule(meta, args.loop_repeats, args.repeat_block)
        init_distributed(args.tensor_model_parallel_size, 1)
        model, meta, tok = load_model(args.load, args.loop_repeats, args.repeat_block,
                                      Implementation(transformer_impl=args.transformer_impl))
        if tok is None:
            raise UsageError(f"checkpoint {args.load!r} records no tokenizer")
        prompts = args.prompt or ["The"]
        encoded = [tok.tokenize(p) for p in prompts]
        width = max(len(e) for e in encoded)
        if any(len(e) != width for e in encoded):
            raise UsageError("prompts of a batch must have the same number of tokens")
        tokens = torch.tensor(encoded, dtype=torch.long)
        out = greedy_generate(model, tokens, args.max_new_tokens, use_cache=not args.no_cache,
                              vocab_size=tok.vocab_size)
        texts = [tok.detokenize(row[width:].tolist()) for row in out]
        if is_rank0():
            arch = checkpoint_arch(meta)
            trained = f", trained as Loop({arch.loop})" if arch.loop else ""
            print(f"schedule: {schedule} (effective depth {len(schedule)}, {arch.num_layers} unique layers{trained})")
            for p, t in zip(prompts, texts):
                print(f"{p!r} -> {t!r}", flush=True)
        teardown()
        return texts


if __name__ == "__main__":
    main(sys.argv[1:])
