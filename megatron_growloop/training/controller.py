"""Controllers: code that changes a running training job between steps.

Depth growth, a curriculum on the number of loop repeats, and similar policies act
on the model between training steps.  They do so as *controllers*: objects the
trainer calls at fixed points, which see the trainer only through its public
interface (``arch``, ``layout``, ``state``, ``model_space_state()``, ``rebuild()``,
``set_loop_repeats()``, ``set_loop_backprop_depth()``, ``log_text()``/``log_scalars()``).
The trainer never imports them -- ``pretrain.py`` composes them, as Megatron-LM's
``pretrain_gpt.py`` passes providers into ``pretrain(...)``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional


class Controller:
    """Base class with no-op hooks; subclasses override what they need."""

    def setup(self, trainer, resume: Optional[Dict[str, Any]]) -> None:
        """After the model is built and the checkpoint (``resume``: its metadata) loaded."""

    def before_step(self, trainer) -> None:
        """Before every training step (may rebuild the model or change k)."""

    def after_step(self, trainer) -> None:
        """After every training step, before logging, validation and saving."""

    def checkpoint_metadata(self, trainer) -> Dict[str, Any]:
        """Entries this controller adds to ``growloop.json``."""
        return {}

    def describe(self) -> Optional[str]:
        """One line for the start-up log, or None."""
        return None

    def finish(self, trainer) -> Dict[str, Any]:
        """Entries for the end-of-training summary."""
        return {}
