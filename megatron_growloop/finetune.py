"""Supervised fine-tuning: ``[torchrun ...] python -m megatron_growloop.finetune [flags]``.

The same trainer as ``megatron_growloop.pretrain`` -- megatron-core model, DDP, Megatron
optimizer, pipeline schedules, every TP/PP/DP layout, the same checkpoints -- with other
datasets: like Megatron-LM's ``pretrain_gpt.py --sft``, which swaps ``GPTDataset`` for
``SFTDataset`` in its ``train_valid_test_datasets_provider``, this module hands the trainer a
datasets provider of packed prompt/answer sequences (:mod:`megatron_growloop.data.packing`)
whose ``loss_mask`` covers the answers only.  There is no second training loop.

Starting point (Megatron-LM's ``--pretrained-checkpoint``, ``megatron/training/checkpointing.py``
at core_v0.16.1: used when ``--load`` holds no checkpoint, with ``--finetune`` semantics):

* ``--pretrained-checkpoint CKPT`` -- any megatron_growloop checkpoint (plain, looped, grown);
* ``--hf DIR`` -- a Hugging Face directory, converted once (cached) by
  :mod:`megatron_growloop.convert`;
* neither -- a freshly initialised model (tests, toy tasks).

The architecture is the starting checkpoint's (``--use-checkpoint-args`` is implied);
weights are loaded, the optimizer, iteration and data position start fresh.  With ``--save X
--load X`` an interrupted fine-tune resumes from ``X`` instead.  ``--retrofit-loop S:E:R``
fine-tunes with a block repeated (retrofitted recurrence).

Data (``--sft-data`` or ``--sft-tasks``) is read, tokenised and checked before anything is
built or written; a bad line is a one-line error naming it.

Schedule: ``--epochs E`` (Megatron-LM's ``tasks/finetune_utils.py``:
``train_iters = epochs x iterations per epoch``) or ``--train-iters``; ``--lr``,
``--lr-warmup-iters`` or ``--lr-warmup-fraction`` (Megatron-LM: a fraction of
``--lr-decay-iters``), ``--lr-decay-style`` and the other ``pretrain`` flags.
"""

from __future__ import annotations

import fcntl
import math
import os
import subprocess
import sys
import warnings
from typing import Any, Dict, List, Optional

from .data.packing import PACKING_MODES, PackedSFTDataset
from .data.sft import fingerprint, read_jsonl, tokenize_examples
from .data.tokenizer import build_tokenizer
from .errors import UsageError, cli_errors
from .eval import primitives
from .eval.sft_tasks import DEFAULT_HELDOUT_ITEMS, sft_examples
from .paths import cache_dir
from .training.arguments import Launch, parse_args
from .training.checkpointing import META_NAME, TRACKER
from .training.controller import Controller
from .training.run_guard import run_training
from .training.trainer import Trainer

PROG = "megatron_growloop.finetune"
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")

# Fine-tuning defaults that differ from pretraining's (every other flag keeps pretrain's default).
SFT_DEFAULTS = {"lr": 1e-4, "train_iters": None, "log_interval": 1}


def add_sft_args(parser) -> None:
    parser.description = ("Supervised fine-tuning (loss on answers only, packed sequences) of a megatron_growloop "
                          "checkpoint or a Hugging Face model, on the pretraining trainer.")
    parser.set_defaults(**SFT_DEFAULTS)
    g = parser.add_argument_group("supervised fine-tuning: start")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--pretrained-checkpoint", default=None,
                     help="checkpoint to fine-tune (weights only), used when --load holds no checkpoint (Megatron-LM)")
    src.add_argument("--hf", default=None, help="Hugging Face model directory to fine-tune (converted once, cached)")

    g = parser.add_argument_group("supervised fine-tuning: data")
    g.add_argument("--sft-data", nargs="+", default=None, metavar="FILE.jsonl",
                   help='JSONL files, one {"prompt": ..., "answer": ...} object per line')
    g.add_argument("--sft-tasks", default=None,
                   help="reasoning primitives generated on the fly, e.g. va_code_d1,va_code_d2 (equal shares)")
    g.add_argument("--sft-examples", type=int, default=None,
                   help="number of examples (required with --sft-tasks; with --sft-data: the first N)")
    g.add_argument("--sft-seed", type=int, default=0,
                   help="seed of the generated examples and of the example order (varies the data set)")
    g.add_argument("--sft-num-fewshot", type=int, default=0,
                   help="solved demonstrations in each generated prompt (evaluate with the same number)")
    g.add_argument("--sft-template", default=primitives.DEFAULT_TEMPLATE, help="prompt template of generated examples")
    g.add_argument("--sft-heldout-items", type=int, default=DEFAULT_HELDOUT_ITEMS,
                   help="generated training questions never equal the first N evaluation items of each task")
    g.add_argument("--sft-heldout-seed", type=int, default=0, help="the evaluation seed those items use (eval --seed)")
    g.add_argument("--sft-packing", choices=PACKING_MODES, default="pack",
                   help="pack: several examples per sequence, block-diagonal attention; pad: one per sequence")
    g.add_argument("--epochs", type=float, default=None,
                   help="passes over the fine-tuning sequences (default 1 unless --train-iters is given)")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="LR warm-up as a fraction of --lr-decay-iters (Megatron-LM); excludes --lr-warmup-iters")


# ------------------------------------------------------------------------------ the start
def converted_hf_checkpoint(hf_dir: str) -> str:
    """The cached megatron checkpoint of ``hf_dir``, converted in a child process (conversion
    needs a one-rank process group; this runs before ours exists) under a file lock, so the
    ranks of one ``torchrun`` job convert once."""
    lock = cache_dir() / "finetune_hf.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        code = ("import sys; from megatron_growloop.errors import UsageError\n"
                "from megatron_growloop.eval.loader import hf_checkpoint\n"
                "try: print(hf_checkpoint(sys.argv[1]))\n"
                "except UsageError as e: print('error: ' + str(e)); sys.exit(2)")
        proc = subprocess.run([sys.executable, "-c", code, hf_dir], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (lines or proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise UsageError(f"--hf {hf_dir!r}: conversion failed: {last.removeprefix('error: ')}")
    return lines[-1]


def _has_checkpoint(path: Optional[str]) -> bool:
    return bool(path) and os.path.exists(os.path.join(path, TRACKER))


def resolve_start(args, world_size: int) -> None:
    """``--hf`` / ``--pretrained-checkpoint`` become ``--load P --finetune --use-checkpoint-args``
    unless ``--load`` already holds a checkpoint (resuming this fine-tune)."""
    for flag in ("data_path", "cooldown_data_path"):
        if getattr(args, flag):
            raise UsageError(f"--{flag.replace('_', '-')} is a pretraining flag; fine-tuning data is --sft-data or --sft-tasks")
    if args.mock_data:
        raise UsageError("--mock-data is a pretraining flag; fine-tuning data is --sft-data or --sft-tasks")
    if args.hf:
        args.pretrained_checkpoint = converted_hf_checkpoint(args.hf)
    if args.pretrained_checkpoint:
        if _has_checkpoint(args.load):
            args.use_checkpoint_args = True  # resume: the architecture is this fine-tune's own
            return
        pretrained = args.pretrained_checkpoint
        if not (_has_checkpoint(pretrained) or os.path.exists(os.path.join(pretrained, META_NAME))):
            raise UsageError(f"--pretrained-checkpoint {args.pretrained_checkpoint!r} holds no checkpoint")
        args.load = args.pretrained_checkpoint
        args.finetune = True
        args.use_checkpoint_args = True
    elif (_has_checkpoint(args.load) and not args.finetune
          and not (args.save and os.path.abspath(args.load) == os.path.abspath(args.save))):
        raise UsageError(
            f"--load {args.load!r} is not this run's --save directory: give the model to fine-tune as "
            "--pretrained-checkpoint (or --finetune to load its weights only)"
        )


# ------------------------------------------------------------------------------ the data
class SFTData:
    """Reads, tokenises and packs the fine-tuning data once, at argument time (nothing is
    built or written before it has been checked), then provides the trainer's datasets."""

    def __init__(self):
        self.examples = None
        self.dataset: Optional[PackedSFTDataset] = None
        self.record: Dict[str, Any] = {}

    def __call__(self, args, world_size: int) -> None:
        """A ``before_validate`` step of :func:`~megatron_growloop.training.arguments.parse_args`."""
        if bool(args.sft_data) == bool(args.sft_tasks):
            raise UsageError("give the fine-tuning data as exactly one of --sft-data FILE.jsonl or --sft-tasks TASKS")
        if args.sft_num_fewshot < 0:
            raise UsageError(f"--sft-num-fewshot must be >= 0, got {args.sft_num_fewshot}")
        tok_model = args.tokenizer_model
        if args.tokenizer_type == "HuggingFaceTokenizer" and not tok_model:
            tok_model = "smollm2"
        tokenizer = build_tokenizer(args.tokenizer_type, tok_model)
        if args.sft_tasks:
            if args.sft_examples is None:
                raise UsageError("--sft-tasks needs --sft-examples N (split equally over the tasks)")
            raw = sft_examples(args.sft_tasks, args.sft_examples, args.sft_seed, args.sft_num_fewshot,
                               args.sft_template, args.sft_heldout_items, args.sft_heldout_seed)
            source = {"tasks": primitives.resolve_tasks(args.sft_tasks), "num_fewshot": args.sft_num_fewshot,
                      "template": primitives.get_template(args.sft_template).name,
                      "heldout": {"items": args.sft_heldout_items, "seed": args.sft_heldout_seed}}
        else:
            raw = [ex for path in args.sft_data for ex in read_jsonl(path)]
            if args.sft_examples is not None:
                if args.sft_examples < 1:
                    raise UsageError(f"--sft-examples must be >= 1, got {args.sft_examples}")
                raw = raw[: args.sft_examples]
            source = {"files": list(args.sft_data)}
        examples = tokenize_examples(raw, tokenizer, args.seq_length)
        probe = PackedSFTDataset(examples, args.seq_length, args.sft_packing, seed=args.sft_seed)
        n_seq = probe.num_sequences
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        dp = max(1, world_size // max(1, tp * pp))
        gbs = args.global_batch_size or args.micro_batch_size * dp
        if args.epochs is not None:
            if args.train_iters is not None:
                raise UsageError("give either --epochs or --train-iters, not both")
            if args.epochs <= 0:
                raise UsageError(f"--epochs must be > 0, got {args.epochs}")
        if args.train_iters is None:
            epochs = 1.0 if args.epochs is None else args.epochs
            args.train_iters = max(1, math.ceil(epochs * n_seq / gbs))
        if args.lr_warmup_fraction is not None:
            if args.lr_warmup_iters:
                raise UsageError("give either --lr-warmup-fraction or --lr-warmup-iters, not both (Megatron-LM)")
            if not 0 <= args.lr_warmup_fraction < 1:
                raise UsageError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
            args.lr_warmup_iters = int(args.lr_warmup_fraction * (args.lr_decay_iters or args.train_iters))
        self.examples = examples
        self.record = {
            **source, "examples": len(examples), "seed": args.sft_seed, "packing": args.sft_packing,
            "epochs": round(args.train_iters * gbs / n_seq, 4), "train_iters": args.train_iters,
            "stats": probe.stats.to_dict(), "fingerprint": fingerprint(examples),
        }

    def provider(self, num_samples) -> tuple:
        """The trainer's datasets provider (Megatron-LM's ``train_valid_test_datasets_provider``)."""
        a = self._args
        self.dataset = PackedSFTDataset(self.examples, a.seq_length, a.sft_packing, seed=a.sft_seed,
                                        length=int(num_samples[0]), pad_id=0)
        return self.dataset, None, None

    def bind(self, args) -> "SFTData":
        self._args = args
        return self


class SFTRecord(Controller):
    """Records the fine-tuning data in ``growloop.json`` and refuses to resume on other data."""

    def __init__(self, data: SFTData):
        self.data = data

    def setup(self, trainer, resume) -> None:
        old = (resume or {}).get("sft") or {}
        if old and not trainer.args.finetune and old.get("fingerprint") != self.data.record["fingerprint"]:
            raise UsageError(
                f"--load {trainer.args.load!r} was fine-tuned on other data (fingerprint {old.get('fingerprint')}, "
                f"now {self.data.record['fingerprint']}): use another --save directory"
            )

    def checkpoint_metadata(self, trainer) -> Dict[str, Any]:
        return {"sft": self.data.record}

    def describe(self) -> Optional[str]:
        d = self.data.record
        st = d["stats"]
        what = ", ".join(d["tasks"]) if "tasks" in d else ", ".join(d["files"])
        return (f"fine-tuning on {d['examples']} examples ({what}, seed {d['seed']}): {st['sequences']} "
                f"{dict(pack='packed', pad='padded')[d['packing']]} sequences of {st['seq_length']} tokens, {100 * st['fill']:.1f}% filled, "
                f"{st['loss_tokens']} answer tokens with loss; {d['train_iters']} iterations = {d['epochs']:g} epochs")

    def finish(self, trainer) -> Dict[str, Any]:
        return {"sft": self.data.record}


def parse_finetune_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None,
                        data: Optional[SFTData] = None) -> Launch:
    data = data if data is not None else SFTData()
    launch = parse_args(argv, world_size, extra_args_providers=[add_sft_args], extra_validators=[_check_attention],
                        before_resume=[resolve_start], before_validate=[data], prog=PROG)
    data.bind(launch.args)
    return launch


def _check_attention(args) -> None:
    if args.sft_packing == "pack" and args.transformer_impl == "transformer_engine":
        raise UsageError(
            "--sft-packing pack keeps examples apart with an explicit attention mask, which Transformer Engine's "
            "causal attention ignores: use --sft-packing pad (or --transformer-impl local)"
        )


def main(argv: Optional[List[str]] = None) -> dict:
    with cli_errors(PROG):
        data = SFTData()
        launch = parse_finetune_args(argv, data=data)
        return run_training(launch, lambda launch: Trainer(launch, [SFTRecord(data)], datasets_provider=data.provider))


if __name__ == "__main__":
    main(sys.argv[1:])
