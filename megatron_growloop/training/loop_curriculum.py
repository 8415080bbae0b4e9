"""``--loop-repeats-schedule ITER:K[,ITER:K]``: change k of a looped model during training.

A :class:`~.controller.Controller`: before each step it sets the k that
:func:`~megatron_growloop.looping.spec.repeats_at` gives for the iteration, through
:meth:`Trainer.set_loop_repeats` (which also makes the DDP bucket groups re-learn their
gradient-ready counts).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..looping.spec import repeats_at
from .controller import Controller


class LoopRepeatsCurriculum(Controller):
    def __init__(self, pairs: List[Tuple[int, int]]):
        self.pairs = list(pairs)
        self.base_repeats: Optional[int] = None

    def setup(self, trainer, resume: Optional[Dict[str, Any]]) -> None:
        self.base_repeats = trainer.arch.loop.repeats

    def before_step(self, trainer) -> None:
        current = trainer.arch.loop.repeats
        k = repeats_at(self.pairs, trainer.state.iteration, self.base_repeats)
        if k != current:
            trainer.set_loop_repeats(k)
            trainer.log_text(
                f"iteration {trainer.state.iteration}: loop repeats {current} -> {k} "
                f"(Loop({trainer.arch.loop}), effective depth {trainer.unwrapped.effective_depth})"
            )
