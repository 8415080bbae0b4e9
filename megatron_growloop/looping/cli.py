"""Loop-related command-line flags shared by pretraining, evaluation and generation.

Training (``megatron_growloop.pretrain``): ``--loop``, ``--retrofit-loop``,
``--loop-repeats``, ``--loop-repeats-schedule``, randomized recurrence
(``--loop-repeats-dist``, ``--loop-backprop-depth`` and their curricula, see
:mod:`.recurrence`) and ``--eval-loop-repeats`` (:func:`add_loop_args`,
:func:`validate_loop_args`).  Inference tools (generation, evaluation, analysis):
``--loop-repeats`` and ``--repeat-block`` (:func:`add_inference_loop_args`,
:func:`validate_inference_loop_args`).

Everything that can be checked before a process group exists is checked here, so a
bad spec fails with one ``error:`` line before anything is built or written.  The
functions are pure: the caller reads the ``--load`` checkpoint and passes its
``arch`` record.
"""

from __future__ import annotations

from typing import Optional

from ..errors import UsageError
from .recurrence import DISTRIBUTIONS, WARMUP_STYLES, parse_repeats_list, settings_from_flags
from .spec import LoopSpec, RepeatBlock, parse_repeats_schedule


def add_loop_args(parser) -> None:
    g = parser.add_argument_group("looping")
    g.add_argument("--loop", default=None,
                   help="train a looped model: 'LxK' (Loop(L×k)) or 'e-LxK-d' (Loop(e-L×k-d)); "
                        "--num-layers then counts unique layers (defaults to e+L+d)")
    g.add_argument("--retrofit-loop", default=None, metavar="START:END:R",
                   help="with --load of a plain model: continue training with layers START..END-1 "
                        "applied R times (retrofitted recurrence); the checkpoint then records the loop")
    g.add_argument("--loop-repeats", type=int, default=None,
                   help="change k of a loaded looped model (e.g. for a new training phase)")
    g.add_argument("--loop-repeats-schedule", default=None, metavar="ITER:K[,ITER:K]",
                   help="change k during training: after ITER completed iterations train with k=K "
                        "(e.g. 1000:2,2000:4); gradient synchronisation is re-learned at each change")
    g.add_argument("--loop-repeats-dist", choices=list(DISTRIBUTIONS), default=None,
                   help="randomized recurrence (Huginn): draw k for every step from this distribution, "
                        "seeded by (--seed, iteration): the same on every rank and after a resume")
    g.add_argument("--loop-repeats-mean", type=int, default=None,
                   help="mean k of --loop-repeats-dist (the k validation and the checkpoint use); "
                        "fixed: default the loop's k")
    g.add_argument("--loop-repeats-max", type=int, default=None,
                   help="largest k drawn (default: uniform 2*mean-1, poisson-lognormal 4*mean)")
    g.add_argument("--loop-backprop-depth", type=int, default=None, metavar="N",
                   help="back-propagate through only the last N applications of the recurrent block; "
                        "the earlier ones run without autograd (default: all)")
    g.add_argument("--loop-repeats-mean-warmup-iters", type=int, default=0,
                   help="curriculum (retrofitting-recurrence): raise the mean k from "
                        "--loop-repeats-mean-start to --loop-repeats-mean over this many iterations")
    g.add_argument("--loop-repeats-mean-start", type=int, default=1)
    g.add_argument("--loop-backprop-depth-warmup-iters", type=int, default=0,
                   help="curriculum: raise the backprop depth from --loop-backprop-depth-start to "
                        "--loop-backprop-depth over this many iterations")
    g.add_argument("--loop-backprop-depth-start", type=int, default=1)
    g.add_argument("--loop-curriculum-style", choices=list(WARMUP_STYLES), default="linear",
                   help="shape of both warm-ups (HF warmup_stable_decay: linear or 1-sqrt)")
    g.add_argument("--eval-loop-repeats", default=None, metavar="K[,K...]",
                   help="at every --eval-interval also report the validation loss at each of these k "
                        "(same batches), e.g. 1,2,4,8")


def add_inference_loop_args(parser) -> None:
    """``--loop-repeats`` / ``--repeat-block`` for tools that load a trained model."""
    g = parser.add_argument_group("looping at inference")
    g.add_argument("--loop-repeats", type=int, default=None,
                   help="run a looped checkpoint with k=K recurrences instead of its trained k")
    g.add_argument("--repeat-block", action="append", default=[], metavar="START:END:R",
                   help="run effective-depth positions START..END-1 R times in total (R=1: unchanged); "
                        "repeatable; positions count layer applications (after --loop-repeats)")


def validate_inference_loop_args(args) -> None:
    if args.loop_repeats is not None and args.loop_repeats < 1:
        raise UsageError(f"--loop-repeats must be >= 1, got {args.loop_repeats}")
    args.repeat_block = [str(RepeatBlock.parse(b, what="--repeat-block")) for b in (args.repeat_block or [])]


def resolve_loop(args, arch: Optional[dict]) -> Optional[str]:
    """The loop this run trains with: ``--loop``, or the checkpoint's loop (``arch``: its
    architecture record, None without a checkpoint), turned by ``--retrofit-loop`` /
    ``--loop-repeats``.  Raises for inconsistent combinations."""
    if arch is None:
        if args.retrofit_loop:
            raise UsageError("--retrofit-loop needs --load CHECKPOINT (it continues training a model)")
        if args.loop_repeats is not None:
            if not args.loop:
                raise UsageError("--loop-repeats needs a looped model: --load a looped checkpoint or give --loop")
            return str(LoopSpec.parse(args.loop).with_repeats(args.loop_repeats))
        return args.loop
    num_layers = int(arch.get("num_layers", args.num_layers))
    ckpt_loop = arch.get("loop")
    loop = ckpt_loop
    if args.retrofit_loop:
        block = RepeatBlock.parse(args.retrofit_loop, what="--retrofit-loop")
        if block.end > num_layers:
            raise UsageError(
                f"--retrofit-loop {block} lies outside the model: --load {args.load!r} has layers "
                f"0..{num_layers - 1}"
            )
        target = str(LoopSpec.from_block(num_layers, block))
        if ckpt_loop and ckpt_loop != target:
            raise UsageError(
                f"--retrofit-loop {block}: --load {args.load!r} is already looped (Loop({ckpt_loop})); "
                "change its k with --loop-repeats instead"
            )
        loop = target  # equal to the checkpoint's loop when resuming a retrofit run
    elif args.loop:
        if LoopSpec.parse(args.loop) != (LoopSpec.parse(ckpt_loop) if ckpt_loop else None):
            what = f"Loop({ckpt_loop})" if ckpt_loop else "not looped"
            raise UsageError(
                f"--loop {args.loop} does not match --load {args.load!r}, which is {what}: use "
                "--retrofit-loop START:END:R to loop a plain checkpoint or --loop-repeats K to change k"
            )
    if args.loop_repeats is not None:
        if not loop:
            raise UsageError(f"--loop-repeats: the checkpoint {args.load!r} has no loop (use --retrofit-loop)")
        loop = str(LoopSpec.parse(loop).with_repeats(args.loop_repeats))
    return loop


def validate_loop_args(args, arch: Optional[dict] = None, explicit_num_layers: bool = True) -> None:
    """Check the loop flags against each other and the checkpoint's ``arch`` record; afterwards
    ``args.loop`` is the loop this run trains with (``--retrofit-loop`` and ``--loop-repeats``
    applied) and ``args.loop_repeats_curriculum`` the parsed ``--loop-repeats-schedule``."""
    loop = LoopSpec.parse(args.loop) if args.loop else None
    if loop is not None:
        if args.num_layers != loop.unique_layers:
            if explicit_num_layers:
                raise UsageError(
                    f"--loop {args.loop} has {loop.unique_layers} unique layers but --num-layers is "
                    f"{args.num_layers}"
                )
            args.num_layers = loop.unique_layers
        args.loop = str(loop)
    if args.retrofit_loop:
        RepeatBlock.parse(args.retrofit_loop, what="--retrofit-loop")
        if args.loop:
            raise UsageError("use either --loop (train from scratch) or --retrofit-loop (continue), not both")
    if args.loop_repeats is not None and args.loop_repeats < 1:
        raise UsageError(f"--loop-repeats must be >= 1, got {args.loop_repeats}")
    args.loop_repeats_curriculum = (
        parse_repeats_schedule(args.loop_repeats_schedule) if args.loop_repeats_schedule else []
    )
    _match_checkpoint_k(args, arch)
    resolved = resolve_loop(args, arch)
    if args.loop_repeats_schedule and not resolved:
        raise UsageError("--loop-repeats-schedule needs a looped model (--loop, --retrofit-loop or a looped --load)")
    args.loop = resolved
    looped = bool(resolved)
    _validate_recurrence_args(args)
    if looped and args.fp8_format and args.fp8_recipe == "delayed":
        raise UsageError(
            "looped blocks cannot use --fp8-recipe delayed: Transformer Engine does not support one "
            "module running several times in one FP8 autocast region; use --fp8-recipe tensorwise "
            "(Hopper), mxfp8 (Blackwell) or blockwise"
        )
    if looped and args.cuda_graph_impl not in (None, "none"):
        raise UsageError(
            "CUDA graphs capture one call per layer and cannot replay a looped block: use "
            "--cuda-graph-impl none with --loop/--retrofit-loop/looped checkpoints"
        )


def _match_checkpoint_k(args, arch: Optional[dict]) -> None:
    """A randomized run's checkpoint records the mean k, not the k of ``--loop`` or
    ``--retrofit-loop``: take the checkpoint's k when the loops differ only in k, so that a
    relaunch with the same flags resumes."""
    ckpt_loop = (arch or {}).get("loop")
    if not (args.loop_repeats_dist and args.loop_repeats_mean is not None and ckpt_loop):
        return
    saved = LoopSpec.parse(ckpt_loop)
    if args.loop and LoopSpec.parse(args.loop).with_repeats(1) == saved.with_repeats(1):
        args.loop = str(saved)
    if args.retrofit_loop:
        block = RepeatBlock.parse(args.retrofit_loop, what="--retrofit-loop")
        num_layers = int(arch.get("num_layers", args.num_layers))
        if block.end <= num_layers and LoopSpec.from_block(num_layers, block).with_repeats(1) == saved.with_repeats(1):
            args.retrofit_loop = f"{block.start}:{block.end}:{saved.repeats}"


def _validate_recurrence_args(args) -> None:
    """Randomized recurrence and ``--eval-loop-repeats`` against the resolved ``args.loop``;
    sets ``args.loop_recurrence`` (None without those flags) and ``args.eval_loop_repeats``
    (a tuple), and puts ``args.loop`` at the nominal k (the mean)."""
    given = (args.loop_repeats_dist or args.loop_backprop_depth is not None or args.loop_repeats_mean is not None
             or args.loop_repeats_max is not None)
    if given and not args.loop:
        raise UsageError("--loop-repeats-dist/--loop-backprop-depth need a looped model "
                         "(--loop, --retrofit-loop or a looped --load)")
    if args.loop_repeats_dist and args.loop_repeats_schedule:
        raise UsageError("use either --loop-repeats-schedule (k per phase) or --loop-repeats-dist (k per step), "
                         "not both; the mean k has its own curriculum (--loop-repeats-mean-warmup-iters)")
    loop = LoopSpec.parse(args.loop) if args.loop else None
    args.loop_recurrence = settings_from_flags(
        args.loop_repeats_dist, args.loop_repeats_mean, args.loop_repeats_max, args.loop_backprop_depth,
        loop.repeats if loop else 1, args.seed,
        mean_start=args.loop_repeats_mean_start, mean_warmup_iters=args.loop_repeats_mean_warmup_iters,
        backprop_depth_start=args.loop_backprop_depth_start,
        backprop_depth_warmup_iters=args.loop_backprop_depth_warmup_iters,
        warmup_style=args.loop_curriculum_style,
    )
    rec = args.loop_recurrence
    if rec is not None and rec.dist is not None:
        args.loop = str(loop.with_repeats(rec.nominal_repeats))
    if (rec is not None and getattr(args, "recompute_granularity", None) == "full"
            and getattr(args, "recompute_method", None) == "uniform" and (args.recompute_num_layers or 1) > 1):
        raise UsageError(
            f"--recompute-num-layers {args.recompute_num_layers} with --recompute-method uniform must divide the "
            "layer applications of every step, which vary with randomized or truncated recurrence: use "
            "--recompute-num-layers 1 or --recompute-method block"
        )
    if args.eval_loop_repeats is not None and not isinstance(args.eval_loop_repeats, tuple):
        args.eval_loop_repeats = parse_repeats_list(args.eval_loop_repeats)
        if not args.loop:
            raise UsageError("--eval-loop-repeats needs a looped model (--loop, --retrofit-loop or a looped --load)")
        if not getattr(args, "eval_interval", None):
            raise UsageError("--eval-loop-repeats needs --eval-interval N (validation runs every N iterations)")
