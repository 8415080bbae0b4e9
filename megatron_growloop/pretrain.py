"""Entry point: ``torchrun --nproc_per_node N -m megatron_growloop.pretrain [flags]``.

Run ``python -m megatron_growloop.pretrain --help`` for the flags (Megatron-LM names).
"""

from __future__ import annotations

import sys
import warnings
from typing import List, Optional

from .errors import cli_errors

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")


def main(argv: Optional[List[str]] = None) -> dict:
    with cli_errors("megatron_growloop.pretrain"):
        from .training.arguments import parse_args

        args = parse_args(argv)
        from .training.trainer import Trainer

        trainer = Trainer(args)
        trainer.setup()
        summary = trainer.train()
        if trainer.is_logging_rank:
            print(f"done: {summary['iteration']} iterations, final loss "
                  f"{summary['final_loss'] if summary['final_loss'] is None else round(summary['final_loss'], 4)}",
                  flush=True)
            if summary["checkpoint"]:
                print(f"checkpoint: {summary['checkpoint']}", flush=True)
            if summary["tensorboard_dir"]:
                print(f"tensorboard logs: {summary['tensorboard_dir']}  (tensorboard --logdir {summary['tensorboard_dir']})",
                      flush=True)
        from .training.initialize import teardown

        teardown()
        return summary


if __name__ == "__main__":
    main(sys.argv[1:])
