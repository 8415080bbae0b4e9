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
from .training.run_guard import run_training
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
        return run_training(launch, build_trainer)


if __name__ == "__main__":
    main(sys.argv[1:])
