"""Loop-related command-line flags shared by pretraining, evaluation and analysis."""

from __future__ import annotations

from ..errors import UsageError
from .spec import LoopSpec, RepeatBlock


def add_loop_args(parser) -> None:
    g = parser.add_argument_group("looping")
    g.add_argument("--loop", default=None,
                   help="train a looped model: 'LxK' (Loop(L×k)) or 'e-LxK-d' (Loop(e-L×k-d)); "
                        "--num-layers then counts unique layers (defaults to e+L+d)")
    g.add_argument("--retrofit-loop", default=None, metavar="START:END:R",
                   help="with --load: continue training with layers START..END-1 applied R times "
                        "(retrofitted recurrence); the checkpoint then records the loop")
    g.add_argument("--loop-repeats", type=int, default=None,
                   help="change k of a loaded looped model (e.g. for a new training phase)")


def validate_loop_args(args) -> None:
    loop = LoopSpec.parse(args.loop) if args.loop else None
    if loop is not None:
        explicit = getattr(args, "_explicit_num_layers", None)
        if args.num_layers != loop.unique_layers:
            if explicit:
                raise UsageError(
                    f"--loop {args.loop} has {loop.unique_layers} unique layers but --num-layers is "
                    f"{args.num_layers}"
                )
            args.num_layers = loop.unique_layers
        args.loop = str(loop)
    if args.retrofit_loop:
        RepeatBlock.parse(args.retrofit_loop, what="--retrofit-loop")
        if not args.load:
            raise UsageError("--retrofit-loop needs --load CHECKPOINT (it continues training a model)")
        if args.loop:
            raise UsageError("use either --loop (train from scratch) or --retrofit-loop (continue), not both")
    if args.loop_repeats is not None and args.loop_repeats < 1:
        raise UsageError(f"--loop-repeats must be >= 1, got {args.loop_repeats}")
    looped = bool(args.loop or args.retrofit_loop)
    if looped and args.fp8_format and args.fp8_recipe == "delayed":
        raise UsageError(
            "looped blocks cannot use --fp8-recipe delayed: Transformer Engine does not support one "
            "module running several times in one FP8 autocast region; use --fp8-recipe tensorwise "
            "(Hopper), mxfp8 (Blackwell) or blockwise"
        )
    if looped and args.cuda_graph_impl not in (None, "none"):
        raise UsageError(
            "CUDA graphs capture one call per layer and cannot replay a looped block: use "
            "--cuda-graph-impl none with --loop/--retrofit-loop"
        )
