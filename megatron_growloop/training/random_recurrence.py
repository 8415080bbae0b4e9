"""``--loop-repeats-dist`` / ``--loop-backprop-depth``: randomized recurrence as a controller.

Before every step the controller draws k from the run's distribution
(:meth:`~megatron_growloop.looping.recurrence.RecurrenceSettings.repeats_at`: a generator
seeded by ``(seed, iteration)``, so every rank draws the same k and a resumed run the same
sequence) and sets it with :meth:`Trainer.set_loop_repeats`, and sets the backprop depth of
the step (:meth:`Trainer.set_loop_backprop_depth`; both follow their curricula).  After the
step it puts the model back at the nominal k (the final mean): validation, the checkpoint's
``arch.loop`` and the tools that load it see that k, and a relaunch with the same flags
resumes.  The draws are checked for agreement across all ranks at every ``--log-interval``
(one small all-reduce): a rank with another ``--seed`` would otherwise run another depth --
a hang under PP, silently wrong gradients under TP/DP.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from .. import platform
from ..looping.recurrence import RecurrenceSettings
from .controller import Controller

_MOD = (1 << 61) - 1


class RandomRecurrence(Controller):
    def __init__(self, settings: RecurrenceSettings):
        self.settings = settings
        self._checksum = 0
        self._drawn = 0
        self.last_repeats: Optional[int] = None

    def setup(self, trainer, resume: Optional[Dict[str, Any]]) -> None:
        if self.settings.dist is not None:
            trainer.set_loop_repeats(self.settings.nominal_repeats)
        trainer.set_loop_backprop_depth(self.settings.backprop_depth_at(trainer.state.iteration))

    def before_step(self, trainer) -> None:
        it = trainer.state.iteration
        if self.settings.dist is not None:
            k = self.settings.repeats_at(it)
            trainer.set_loop_repeats(k)
            self._checksum = (self._checksum * 1_000_003 + k * (it + 1)) % _MOD
            self._drawn += 1
        trainer.set_loop_backprop_depth(self.settings.backprop_depth_at(it))
        self.last_repeats = trainer.arch.loop.repeats

    def after_step(self, trainer) -> None:
        it = trainer.state.iteration
        k = trainer.arch.loop.repeats
        n = trainer.unwrapped.config.loop_backprop_depth
        trainer.log_scalars(it, {"loop/repeats": k, "loop/backprop-depth": k if n is None else min(k, n)})
        if self.settings.dist is None:
            return
        trainer.set_loop_repeats(self.settings.nominal_repeats)
        if it % trainer.args.log_interval == 0 or it == trainer.args.train_iters:
            self.check_agreement()

    def check_agreement(self) -> None:
        """Raise unless every rank drew the same k sequence since the last check."""
        if not dist.is_initialized() or dist.get_world_size() == 1 or not self._drawn:
            return
        t = torch.tensor([self._checksum, -self._checksum], dtype=torch.int64, device=platform.device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise RuntimeError(
                "ranks drew different loop repeats k (randomized recurrence); every rank must run with "
                "the same --seed and --loop-repeats-* flags"
            )
        self._checksum, self._drawn = 0, 0

    def checkpoint_metadata(self, trainer) -> Dict[str, Any]:
        return {"loop_recurrence": self.settings.to_meta()}

    def describe(self) -> Optional[str]:
        return self.settings.describe() or None

    def finish(self, trainer) -> Dict[str, Any]:
        self.check_agreement()
        return {"loop_recurrence": self.settings.to_meta()}
