"""Growth flags of ``megatron_growloop.pretrain`` and the plan they describe.

:func:`add_growth_args` and :func:`validate_growth_args` are the extension hooks that
``pretrain`` passes to :func:`megatron_growloop.training.arguments.parse_args`;
:func:`growth_controller` turns validated flags into the
:class:`~.controller.GrowthController` of the run (None without ``--grow-method``).
"""

from __future__ import annotations

import os
from typing import Optional

from ..errors import UsageError
from .controller import GrowthController, GrowthOptions
from .operators import GROW_METHODS
from .plan import GrowthPlan


def add_growth_args(parser) -> None:
    g = parser.add_argument_group("depth growth")
    g.add_argument("--grow-method", choices=list(GROW_METHODS), default=None,
                   help="grow depth during training (MIDAS, LIDAS or stacking); --num-layers is the start depth")
    g.add_argument("--grow-block-size", type=int, default=4, help="B: layers inserted per growth step")
    g.add_argument("--grow-final-layers", type=int, default=None, help="final depth")
    g.add_argument("--grow-schedule", choices=["prop"], default="prop", help="stage budgets: PROP-alpha")
    g.add_argument("--grow-alpha", type=float, default=1.0)
    g.add_argument("--grow-iters", type=int, default=None,
                   help="T: iterations of the growth phase (all stages incl. the first at full depth)")
    g.add_argument("--grow-transfer", choices=["auto", "memory", "exchange", "checkpoint"], default="auto",
                   help="how a growth step carries the state to the rebuilt model: in host memory, each rank its "
                        "own shards, with what moves between ranks (layers changing pipeline stage, distributed-"
                        "optimizer ranges changing DP rank) sent point to point ('memory'; 'auto' and the former "
                        "'exchange' are the same), or through a scratch checkpoint ('checkpoint', gathers the "
                        "distributed optimizer's state)")
    g.add_argument("--grow-scratch-dir", default=None,
                   help="directory for the temporary checkpoint of a growth step, visible to all ranks "
                        "(default: /dev/shm on one node, else <save>/growth_scratch)")
    g.add_argument("--grow-dump-dir", default=None,
                   help="inspection: after every growth step save the freshly grown state (before any training "
                        "at the new depth) as a checkpoint under DIR/step_<s> (the growth tests compare it "
                        "with the pre-growth checkpoint)")


def plan_from_args(args) -> Optional[GrowthPlan]:
    """The growth plan of validated flags (None without ``--grow-method``)."""
    if not args.grow_method:
        return None
    return GrowthPlan.build(args.grow_method, args.grow_block_size, args.num_layers, args.grow_final_layers,
                            args.grow_iters, args.grow_alpha)


def validate_growth_args(args) -> None:
    if not args.grow_method:
        for name in ("grow_final_layers", "grow_iters"):
            if getattr(args, name) is not None:
                raise UsageError(f"--{name.replace('_', '-')} needs --grow-method")
        return
    if args.grow_final_layers is None or args.grow_iters is None:
        raise UsageError("--grow-method needs --grow-final-layers and --grow-iters")
    if args.loop or args.retrofit_loop:
        raise UsageError("growing a looped model is not supported: drop --loop/--retrofit-loop or --grow-method")
    if getattr(args, "cuda_graph_impl", "none") not in (None, "none"):
        raise UsageError(
            "--cuda-graph-impl with --grow-method: CUDA graphs are captured for one model and a growth step "
            "rebuilds it (the graphs are not re-captured); use --cuda-graph-impl none"
        )
    if getattr(args, "pipeline_model_parallel_layout", None):
        raise UsageError(
            "--pipeline-model-parallel-layout is fixed to one depth; drop it with --grow-method "
            "(growth balances the layers over the pipeline stages at every depth)"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (args.grow_transfer == "checkpoint" and not args.grow_scratch_dir and not args.save
            and int(os.environ.get("LOCAL_WORLD_SIZE", str(world))) != world):
        raise UsageError(
            "--grow-transfer checkpoint on several nodes writes its scratch checkpoint under --save (every rank "
            "must read it): give --save or a shared --grow-scratch-dir"
        )
    plan = plan_from_args(args)
    last = plan.growth_iterations[-1]
    if args.train_iters <= last:
        raise UsageError(
            f"--train-iters {args.train_iters} ends before the last growth step (at iteration {last} of "
            f"--grow-iters {args.grow_iters}): the run would never reach --grow-final-layers {args.grow_final_layers}"
        )


def growth_controller(args) -> Optional[GrowthController]:
    plan = plan_from_args(args)
    return GrowthController(plan, GrowthOptions.from_args(args)) if plan is not None else None
