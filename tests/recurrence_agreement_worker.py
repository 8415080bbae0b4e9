"""torchrun worker for test_recurrence_parallel.py: every rank draws k with the randomized-
recurrence controller (seed from argv, or the rank's own with ``--per-rank-seed``) and runs
its cross-rank agreement check; prints ``AGREE`` or ``DISAGREE <message>``."""

import sys

import torch.distributed as dist

from megatron_growloop.looping.recurrence import settings_from_flags
from megatron_growloop.training.random_recurrence import RandomRecurrence


class _Trainer:
    """The controller's view of a trainer: k, the iteration, the backprop depth, logging."""

    class _Loop:
        repeats = 3

    class _Arch:
        loop = None

    def __init__(self):
        self.arch = self._Arch()
        self.arch.loop = self._Loop()
        self.state = type("S", (), {"iteration": 0})()

    def set_loop_repeats(self, k):
        self.arch.loop.repeats = k

    def set_loop_backprop_depth(self, n):
        pass


def main():
    dist.init_process_group("gloo")
    seed = dist.get_rank() if "--per-rank-seed" in sys.argv else 5
    ctl = RandomRecurrence(settings_from_flags("poisson-lognormal", 4, None, None, loop_repeats=3, seed=seed))
    trainer = _Trainer()
    for it in range(20):
        trainer.state.iteration = it
        ctl.before_step(trainer)
    try:
        ctl.check_agreement()
        print("AGREE", flush=True)
    except RuntimeError as exc:
        print(f"DISAGREE {exc}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
