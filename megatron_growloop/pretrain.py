"""Entry point: ``torchrun --nproc_per_node N -m megatron_growloop.pretrain [flags]``.

Run ``python -m megatron_growloop.pretrain --help`` for the flags (Megatron-LM names).
Like Megatron-LM's ``pretrain_gpt.py`` this module composes the run: the trainer, plus
the extensions that act on it (depth growth contributes its flags, their checks and a
controller); the training loop itself never imports them.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import List, Optional

from .errors import cli_errors
from .growth.cli import add_growth_args, growth_controller, validate_growth_args
from .plan.startup import announce
from .training.arguments import Launch, parse_args
from .training.initialize import init_distributed, rng_options, teardown
from .training.run_guard import guarded_run
from .training.trainer import Trainer

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")


def parse_pretrain_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> Launch:
    """``pretrain``'s flags: the trainer's plus the growth extension's."""
    return parse_args(argv, world_size, extra_args_providers=[add_growth_args],
                      extra_validators=[validate_growth_args])


def build_trainer(launch: Launch) -> Trainer:
    """The trainer with the controllers the flags ask for."""
    grower = growth_controller(launch.args)
    return Trainer(launch, [grower] if grower is not None else [])


def main(argv: Optional[List[str]] = None) -> dict:
    with cli_errors("megatron_growloop.pretrain"):
        launch = parse_pretrain_args(argv)
        plan = announce(launch, int(os.environ.get("WORLD_SIZE", "1")))  # the planner's line, as Megatron-LM
        if launch.args.dry_run:
            return {"dry_run": True, "plan": plan.to_json()}
        a = launch.args
        init_distributed(a.tensor_model_parallel_size, a.pipeline_model_parallel_size, backend=a.distributed_backend,
                         timeout_minutes=a.distributed_timeout_minutes, seed=a.seed, **rng_options(a))
        # one writer per --save, leftovers of interrupted saves, the validated --load checkpoint
        with guarded_run(launch) as launch:
            trainer = build_trainer(launch)
            trainer.setup()
            summary = trainer.train()
        if trainer.is_logging_rank:
            loss = summary["final_loss"]
            print(f"done: {summary['iteration']} iterations, final loss {loss if loss is None else round(loss, 4)}",
                  flush=True)
            if summary["checkpoint"]:
                print(f"checkpoint: {summary['checkpoint']}", flush=True)
            if summary["tensorboard_dir"]:
                print(f"tensorboard logs: {summary['tensorboard_dir']}  (tensorboard --logdir {summary['tensorboard_dir']})",
                      flush=True)
        teardown()
        return summary


if __name__ == "__main__":
    main(sys.argv[1:])
