"""``python -m megatron_growloop.convert {hf-to-mcore,mcore-to-hf,reshard,verify,grown-to-looped}``
(also ``tools/convert_checkpoint.py``)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import List, Optional

import torch.distributed as dist

from ..errors import ArgumentParser, UsageError, cli_errors
from ..training.initialize import init_distributed, teardown
from .exporter import mcore_to_hf
from .grown_to_looped import format_report as format_tie_report
from .grown_to_looped import grown_to_looped
from .importer import hf_to_mcore
from .reshard import reshard
from .verify import dump, format_report, verify

PROG = "megatron_growloop.convert"


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", str(text), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; e.g. 5GB, 500MB")
    mult = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Convert checkpoints between Hugging Face Llama/SmolLM and megatron_growloop.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    h = sub.add_parser("hf-to-mcore", help="HF Llama-family directory or .gguf -> megatron_growloop checkpoint")
    h.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors/bin) or a .gguf file")
    h.add_argument("--out", required=True, help="new checkpoint (save) directory")
    h.add_argument("--target-tensor-parallel-size", type=_positive, default=1,
                   help="TP the checkpoint must support: checked, and the vocabulary is padded to a multiple of "
                        "make-vocab-size-divisible-by x TP (it loads at any compatible TP/PP)")
    h.add_argument("--target-pipeline-model-parallel-size", type=_positive, default=1)
    h.add_argument("--make-vocab-size-divisible-by", type=_positive, default=128)
    h.add_argument("--seq-length", type=_positive, default=None,
                   help="training sequence length recorded in the checkpoint (default min(max positions, 2048))")
    h.add_argument("--ignore-loop", action="store_true",
                   help="import an exported looped model as an ordinary model of its unrolled layers")

    m = sub.add_parser("mcore-to-hf", help="megatron_growloop checkpoint -> HF LlamaForCausalLM directory")
    m.add_argument("--load", required=True, help="checkpoint (save directory or iter_* directory)")
    m.add_argument("--out", required=True, help="new HF directory")
    m.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the imported model's, else float32)")
    m.add_argument("--loop-repeats", type=_positive, default=None, help="export a looped model with another k")
    m.add_argument("--repeat-block", action="append", default=[], metavar="START:END:R",
                   help="export with a block of the effective-depth axis repeated (may be given several times)")
    m.add_argument("--vocab-size", type=_positive, default=None,
                   help="real vocabulary (default: recorded in the checkpoint); padding rows beyond it are dropped")
    m.add_argument("--max-shard-size", type=_size, default="5GB", help="split model.safetensors above this size")

    r = sub.add_parser("reshard", help="re-save a training checkpoint at another TP/PP (run under torchrun)")
    r.add_argument("--load", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--target-tensor-parallel-size", type=_positive, default=1)
    r.add_argument("--target-pipeline-model-parallel-size", type=_positive, default=1)
    r.add_argument("--use-distributed-optimizer", action="store_true")

    v = sub.add_parser("verify", help="compare a checkpoint with transformers (logits, greedy tokens); any TP/PP under torchrun")
    v.add_argument("--hf", required=True, help="HF model directory to compare with")
    v.add_argument("--load", required=True, help="megatron_growloop checkpoint")
    v.add_argument("--tensor-model-parallel-size", type=_positive, default=1)
    v.add_argument("--pipeline-model-parallel-size", type=_positive, default=1)
    v.add_argument("--prompt", action="append", default=[], help="text prompt (needs the checkpoint's tokenizer)")
    v.add_argument("--token-prompt", action="append", default=[], help="comma-separated token ids")
    v.add_argument("--new-tokens", type=int, default=32)
    v.add_argument("--tolerance", type=float, default=1e-4, help="max relative logit error")
    v.add_argument("--json", default=None, help="write the report here")

    g = sub.add_parser("grown-to-looped",
                       help="tie the copies a depth-grown checkpoint made of one block into a looped checkpoint")
    g.add_argument("--load", required=True, help="grown checkpoint (its growloop.json records the layer lineage)")
    g.add_argument("--block", required=True, metavar="S:E",
                   help="layers S..E-1: consecutive copies of one block (see python -m megatron_growloop.growth.lineage)")
    g.add_argument("--tie", choices=["mean", "first", "source"], default="mean",
                   help="the recurrent block's weights: the mean of the copies, the first copy, or the copy closest "
                        "to the source (oldest lineage)")
    g.add_argument("--repeats", type=_positive, default=None, help="k of the loop (default: the number of copies)")
    g.add_argument("--out", required=True, help="new checkpoint (save) directory")
    g.add_argument("--probe-length", type=_positive, default=64,
                   help="tokens per sequence of the logit comparison with the grown model")
    g.add_argument("--json", default=None, help="write the report here")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    finally:
        teardown()


def _main(argv: Optional[List[str]] = None) -> int:
    with cli_errors(PROG):
        args = build_parser().parse_args(argv)
        if args.command == "hf-to-mcore":

            path = hf_to_mcore(
                args.hf, args.out, args.target_tensor_parallel_size, args.target_pipeline_model_parallel_size,
                args.make_vocab_size_divisible_by, args.seq_length, args.ignore_loop,
            )
            print(f"checkpoint: {path}", flush=True)
            return 0
        if args.command == "mcore-to-hf":

            path = mcore_to_hf(args.load, args.out, args.dtype, args.loop_repeats, args.repeat_block,
                               args.vocab_size, args.max_shard_size)
            print(f"hf model: {path}", flush=True)
            return 0
        if args.command == "reshard":

            path = reshard(args.load, args.out, args.target_tensor_parallel_size,
                           args.target_pipeline_model_parallel_size, args.use_distributed_optimizer)

            if dist.get_rank() == 0:
                print(f"checkpoint: {path}", flush=True)
            return 0
        if args.command == "grown-to-looped":
            report = grown_to_looped(args.load, args.out, args.block, args.tie, args.repeats, args.probe_length)
            print(format_tie_report(report), flush=True)
            print(f"checkpoint: {report['checkpoint']}", flush=True)
            dump(report, args.json)
            return 0
        if args.command == "verify":

            try:
                tokens = [[int(t) for t in s.split(",") if t.strip()] for s in args.token_prompt]
            except ValueError:
                raise UsageError(f"--token-prompt must be comma-separated integers, got {args.token_prompt!r}") from None

            world, mp = int(os.environ.get("WORLD_SIZE", "1")), args.tensor_model_parallel_size * args.pipeline_model_parallel_size
            if world % mp:
                raise UsageError(f"verify at TP x PP = {mp} needs a world size divisible by {mp} (torchrun --nproc_per_node {mp}); got {world}")
            init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
            report = verify(args.hf, args.load, args.prompt, tokens, args.new_tokens, args.tolerance)

            if dist.get_rank() == dist.get_world_size() - 1:
                print(format_report(report), flush=True)
                print("REPORT " + json.dumps({k: v for k, v in report.items() if k != "prompts"}), flush=True)
                dump(report, args.json)
            return 0 if report["ok"] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
