"""Command-line arguments of ``megatron_growloop.pretrain``.

Flag names follow Megatron-LM's ``pretrain_gpt.py`` wherever the concept
exists, so existing launch scripts need few changes.  Loop flags come from
:mod:`megatron_growloop.looping.cli`; extensions (depth growth) contribute their
flags through ``extra_args_providers``, as Megatron-LM's ``pretrain(...)`` takes
``extra_args_provider``.

:func:`parse_args` does everything that can be done before any process group
exists -- flags, the model preset, the ``--load`` checkpoint's metadata (read once),
every consistency check -- and returns a :class:`Launch`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import ArgumentParser, UsageError
from ..looping.cli import add_loop_args, validate_loop_args
from ..looping.spec import LoopSpec, build_schedule, check_stage_sizes
from ..model.arch import LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_LOW_FREQ_FACTOR, LLAMA3_ORIGINAL_MAX_POSITIONS, Arch
from ..model.implementation import ATTENTION_BACKENDS, Implementation, add_fusion_args
from ..model.parallel import stage_sizes_from_layout
from ..model.presets import PRESETS, ModelPreset, get_preset
from ..platform import has_cuda, te_importable
from .reliability_args import (
    add_reliability_args,
    check_depth_against_checkpoint,
    check_float_flags,
    check_reliability_flags,
    check_save_path,
)
from .ckpt_select import fallback_before_parse
from .resume import apply_checkpoint_args, find_resume

ArgsProvider = Callable[[argparse.ArgumentParser], None]
ArgsValidator = Callable[[argparse.Namespace], None]
ArgsPreparer = Callable[[argparse.Namespace, int], None]
"""``(args, world_size)``: an extension's step that must run before the generic checks."""


@dataclass(frozen=True)
class Launch:
    """What ``pretrain`` decided before any process group exists."""

    args: argparse.Namespace
    resume: Optional[Dict[str, Any]] = None
    """``growloop.json`` of the ``--load`` checkpoint (None: starting from scratch)."""


def build_parser(prog: str = "megatron_growloop.pretrain",
                 extra_args_providers: Sequence[ArgsProvider] = ()) -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog,
        description="Pretrain a (looped or depth-grown) SmolLM-style GPT on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", default="tiny", help=f"one of: {', '.join(PRESETS)}")
    g.add_argument("--num-layers", type=int, help="number of unique layers (starting depth when growing)")
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--group-query-attention", action="store_true", help="accepted for Megatron-LM compatibility")
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--kv-channels", type=int)
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--use-rope-scaling", dest="rope_scaling", action="store_true",
                   help="Llama-3.x RoPE frequency scaling (on for the llama3.* presets)")
    g.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="Llama-3.x RoPE scaling factor (default: the preset's, else 8)")
    g.add_argument("--rope-low-freq-factor", type=float, default=None,
                   help="Llama-3.x RoPE low-frequency factor (default 1, as in every Llama-3.x config.json)")
    g.add_argument("--rope-high-freq-factor", type=float, default=None,
                   help="Llama-3.x RoPE high-frequency factor (default 4)")
    g.add_argument("--rope-original-max-position-embeddings", type=int, default=None,
                   help="Llama-3.x RoPE original context length (default 8192)")
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--init-method-std", type=float)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default=None,
                   help="default: transformer_engine when importable on GPU, else local")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="auto: Transformer Engine's choice, or sdpa (torch's fused kernel) on the local spec")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None)
    g.add_argument("--fp8-recipe", choices=["tensorwise", "delayed", "mxfp8", "blockwise"], default="delayed")
    g.add_argument("--cuda-graph-impl", choices=["none", "local", "transformer_engine"], default="none",
                   help="CUDA graphs of the transformer layers (GPU; not with loops or growth)")
    g.add_argument("--cuda-graph-warmup-steps", type=int, default=3,
                   help="training steps before the graphs are captured (megatron-core's default)")
    g.add_argument("--te-rng-tracker", action="store_true",
                   help="Transformer Engine's RNG tracker (turned on for CUDA graphs as Megatron-LM does)")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-layout", default=None,
                   help="Megatron-LM layout string, e.g. 'Et*3|t*4|t*4|t*3L'; default: balanced by layer applications")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl on GPU, gloo on CPU")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel size")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--exit-interval", type=int, default=None, help="stop (after saving) at this iteration")
    g.add_argument("--dry-run", action="store_true",
                   help="print the layout planner's line for this run (parameters, memory per rank, FLOPs) and "
                        "exit 0 without starting a process group or writing anything")

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", choices=["adam"], default="adam")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="cosine")
    g.add_argument("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"], default="linear")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="checkpoint directory (or one iter_* directory) to resume from")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the architecture (and the tokenizer, unless --tokenizer-model is given) from the --load "
                        "checkpoint; explicitly given architecture flags still win")
    g.add_argument("--finetune", action="store_true", help="load weights only; reset iteration, optimizer and data position")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer's state in model space (loads at any TP/PP/DP; gathers "
                        "the state over DP ranks at every save); default: dp_reshardable as in Megatron-LM (fully "
                        "parallel save, loads at another DP size but the same TP/PP)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="PREFIX or 'W1 PREFIX1 W2 PREFIX2 ...'; default: the embedded corpus")
    g.add_argument("--cooldown-data-path", nargs="+", default=None,
                   help="blend used from --cooldown-start-iter on (e.g. math-heavy); same syntax as --data-path")
    g.add_argument("--cooldown-start-iter", type=int, default=None,
                   help="default: the first iteration of the WSD decay")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=None,
                   help="data loader worker processes per rank; default 2 on a GPU (Megatron-LM's), 0 on a CPU "
                        "(workers would compete with training for the same cores); batches are pinned on a GPU")
    g.add_argument("--mock-data", action="store_true", help="random tokens (throughput runs)")
    g.add_argument("--tokenizer-type", choices=["HuggingFaceTokenizer", "ByteTokenizer"], default="HuggingFaceTokenizer")
    g.add_argument("--tokenizer-model", default=None, help="HF tokenizer dir, tokenizer.json, .gguf, or 'smollm2' (default)")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary for --mock-data")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None, help="default: <save>/tensorboard when --save is set")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--metrics-file", default=None,
                   help="append one JSON line per iteration (loss, lr, grad norm, depth, FLOPs) to this file")

    add_fusion_args(p)
    add_loop_args(p)
    for provider in extra_args_providers:
        provider(p)
    add_reliability_args(p)
    return p


# Architecture flags a preset fills: the fields a preset and the architecture record share.
PRESET_ARCH_FIELDS = tuple(
    f.name for f in fields(ModelPreset) if f.name in {a.name for a in fields(Arch)}
)


def apply_preset(args) -> None:
    """Fill architecture fields from ``--model-preset`` unless given explicitly."""
    preset = get_preset(args.model_preset)
    for name in PRESET_ARCH_FIELDS:
        if getattr(args, name, None) is None:
            setattr(args, name, getattr(preset, name))
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if preset.rope_scaling:
        args.rope_scaling = True
    for name, default in (("rope_scaling_factor", 8.0), ("rope_low_freq_factor", LLAMA3_LOW_FREQ_FACTOR),
                          ("rope_high_freq_factor", LLAMA3_HIGH_FREQ_FACTOR),
                          ("rope_original_max_position_embeddings", LLAMA3_ORIGINAL_MAX_POSITIONS)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.kv_channels is None:
        if args.hidden_size % args.num_attention_heads:
            raise UsageError(
                f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                f"{args.num_attention_heads} (or set --kv-channels)"
            )
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if not args.untie_embeddings_and_output_weights and not preset.tie_embeddings:
        args.untie_embeddings_and_output_weights = True


def validate_args(args, world_size: int, resume: Optional[Dict[str, Any]] = None,
                  extra_validators: Sequence[ArgsValidator] = (), explicit_num_layers: bool = True,
                  planning: bool = False) -> None:
    """Check everything that can be checked before any process group exists.

    ``planning``: for the layout planner, which plans a run on another machine -- Transformer
    Engine need not be importable here, and it is the default implementation (as on a GPU)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                 "train_iters", "num_layers", "hidden_size", "num_attention_heads", "seq_length",
                 "log_interval", "eval_iters"):
        v = getattr(args, name)
        if v is None or v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if world_size % (tp * pp):
        raise UsageError(
            f"world size {world_size} is not divisible by tensor x pipeline parallel size {tp}x{pp}"
        )
    if getattr(args, "num_workers", None) is None:
        args.num_workers = 2 if has_cuda() else 0
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    if args.num_attention_heads % tp:
        raise UsageError(
            f"--num-attention-heads {args.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
    if args.num_query_groups % tp and tp % args.num_query_groups:
        raise UsageError(
            f"--num-query-groups {args.num_query_groups} and --tensor-model-parallel-size {tp}: "
            "one must divide the other"
        )
    if args.num_attention_heads % args.num_query_groups:
        raise UsageError(
            f"--num-attention-heads {args.num_attention_heads} is not divisible by "
            f"--num-query-groups {args.num_query_groups}"
        )
    if args.ffn_hidden_size % tp:
        raise UsageError(f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by TP size {tp}")
    if args.seq_length > args.max_position_embeddings:
        raise UsageError(
            f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}"
        )
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise UsageError(
            f"--global-batch-size {args.global_batch_size} is not divisible by micro batch x data "
            f"parallel size = {args.micro_batch_size}x{dp}"
        )
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False
    if args.sequence_parallel and args.seq_length % tp:
        raise UsageError(f"--seq-length {args.seq_length} must be divisible by TP {tp} with --sequence-parallel")
    if args.bf16 and args.fp16:
        raise UsageError("choose at most one of --bf16 and --fp16")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise UsageError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than --lr-decay-iters {args.lr_decay_iters}"
        )
    check_float_flags(args)
    if not planning:  # the planner plans a run on another machine: its --save need not exist here
        check_save_path(args.save)
    check_reliability_flags(args)
    if args.min_lr > args.lr:
        raise UsageError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.lr_decay_style == "WSD":
        if args.lr_wsd_decay_iters is None:
            raise UsageError("--lr-decay-style WSD needs --lr-wsd-decay-iters (length of the cooldown)")
        if not 0 < args.lr_wsd_decay_iters <= args.lr_decay_iters:
            raise UsageError(
                f"--lr-wsd-decay-iters {args.lr_wsd_decay_iters} must be in 1..--lr-decay-iters ({args.lr_decay_iters})"
            )
    if args.cooldown_data_path and args.cooldown_start_iter is None:
        if args.lr_decay_style != "WSD":
            raise UsageError("--cooldown-data-path needs --cooldown-start-iter (or --lr-decay-style WSD)")
        args.cooldown_start_iter = args.lr_decay_iters - args.lr_wsd_decay_iters
    if args.save_interval is not None and args.save_interval < 1:
        raise UsageError(f"--save-interval must be >= 1, got {args.save_interval}")
    if args.eval_interval is not None and args.eval_interval < 1:
        raise UsageError(f"--eval-interval must be >= 1, got {args.eval_interval}")
    if args.tokenizer_type == "HuggingFaceTokenizer" and not args.tokenizer_model:
        args.tokenizer_model = "smollm2"
    if args.tensorboard_dir is None and args.save:
        args.tensorboard_dir = os.path.join(args.save, "tensorboard")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise UsageError("--overlap-param-gather needs --use-distributed-optimizer")
    # Loop checks first: refusing FP8-delayed / CUDA graphs for looped blocks must not
    # depend on Transformer Engine being installed.
    validate_loop_args(args, (resume or {}).get("arch"), explicit_num_layers)
    if args.rope_scaling and not 0 < args.rope_low_freq_factor < args.rope_high_freq_factor:
        raise UsageError(
            f"--rope-low-freq-factor {args.rope_low_freq_factor:g} and --rope-high-freq-factor "
            f"{args.rope_high_freq_factor:g}: Llama-3 RoPE scaling needs 0 < low < high"
        )
    args.impl_fallback = None
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if (planning or (has_cuda() and te_importable())) else "local"
        if has_cuda() and args.transformer_impl == "local":
            args.impl_fallback = "Transformer Engine is not importable: the local layer spec runs (pip install .[gpu])"
    if args.transformer_impl == "transformer_engine" and args.attention_backend == "local":
        # megatron/training/arguments.py: "--attention-backend local is only supported with --spec local"
        raise UsageError("--attention-backend local is only supported with --transformer-impl local")
    if args.transformer_impl == "transformer_engine" and not planning and not te_importable():
        raise UsageError(
            "--transformer-impl transformer_engine: Transformer Engine is not importable here "
            "(install the gpu extra on a CUDA machine, or use --transformer-impl local)"
        )
    if args.fp8_format and args.transformer_impl != "transformer_engine":
        raise UsageError("--fp8-format needs --transformer-impl transformer_engine")
    Implementation.from_args(args).fusions()  # refuses impossible backend/fusion combinations
    for validate in extra_validators:
        validate(args)
    if args.cuda_graph_impl != "none":
        if not has_cuda():
            raise UsageError(f"--cuda-graph-impl {args.cuda_graph_impl} needs a GPU (CUDA graphs); use --cuda-graph-impl none")
        if args.cuda_graph_impl == "transformer_engine" and not te_importable():
            raise UsageError("--cuda-graph-impl transformer_engine needs Transformer Engine (pip install .[gpu])")
        if args.cuda_graph_warmup_steps < 0:
            raise UsageError(f"--cuda-graph-warmup-steps must be >= 0, got {args.cuda_graph_warmup_steps}")
    if pp > 1 and args.pipeline_model_parallel_layout:
        # a user-given stage boundary must not cut a recurrent block (checked before anything is built)
        sizes = stage_sizes_from_layout(args.pipeline_model_parallel_layout, pp)
        num_layers = int((resume or {}).get("arch", {}).get("num_layers", args.num_layers))
        if args.loop and sum(sizes) == num_layers:
            check_stage_sizes(build_schedule(num_layers, LoopSpec.parse(args.loop)), sizes,
                              f"--pipeline-model-parallel-layout {args.pipeline_model_parallel_layout!r}")
    if pp > args.num_layers:
        raise UsageError(
            f"--num-layers {args.num_layers} cannot be split over --pipeline-model-parallel-size {pp} "
            "(every stage needs at least one layer)"
        )


def parse_args(
    argv: Optional[List[str]] = None,
    world_size: Optional[int] = None,
    extra_args_providers: Sequence[ArgsProvider] = (),
    extra_validators: Sequence[ArgsValidator] = (),
    planning: bool = False,
    before_resume: Sequence[ArgsPreparer] = (),
    before_validate: Sequence[ArgsPreparer] = (),
    prog: str = "megatron_growloop.pretrain",
) -> Launch:
    """Parse and check ``pretrain`` flags; read the ``--load`` checkpoint's metadata once.
    ``planning``: see :func:`validate_args` (the layout planner, ``prog`` its name).

    Extensions hook in at two points: ``before_resume`` may change which checkpoint
    ``--load`` names (fine-tuning's ``--pretrained-checkpoint``), ``before_validate``
    sees the flags with the preset and checkpoint architecture applied (fine-tuning
    derives ``--train-iters`` from ``--epochs`` there)."""
    args = build_parser(prog, extra_args_providers=extra_args_providers).parse_args(argv)
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    for prepare in before_resume:  # may name another --load (fine-tuning's --pretrained-checkpoint)
        prepare(args, world)
    fallback_before_parse(args)  # before --load is read: a damaged latest may be replaced
    resume = find_resume(args)
    if args.use_checkpoint_args:
        apply_checkpoint_args(args, resume)
    explicit_num_layers = args.num_layers is not None
    apply_preset(args)
    for prepare in before_validate:
        prepare(args, world)
    validate_args(args, world, resume, extra_validators, explicit_num_layers, planning)
    check_depth_against_checkpoint(args, resume, explicit_num_layers)
    return Launch(args, resume)
