"""The looped transformer block: megatron-core's ``TransformerBlock`` walking a schedule.

``config.num_layers`` counts *unique* layers, so parameters, checkpoint keys,
pipeline offsets and Hugging Face mappings are exactly those of an ordinary
model.  What changes is the order in which the block applies its layers: the
block holds a *local schedule* (indices into ``self.layers``) and, for the
duration of a forward pass, presents megatron-core's own forward with the
sequence of scheduled applications instead of the list of unique layers.  All
of megatron-core's forward logic (viewless tensors, sequence-parallel RNG,
FP8 contexts, full activation recomputation, the final norm) is reused as is.

Each application is wrapped in a light :class:`_Application` object.  During
inference with a KV cache it temporarily gives the attention module a per-
application ``layer_number`` so that repeated applications of one layer get
their own cache slots (megatron-core keys the static KV cache by
``layer_number``).  Outside inference the layer runs untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from megatron.core.transformer.transformer_block import TransformerBlock

from ..errors import UsageError
from . import truncation
from .spec import stage_local_schedule


@dataclass
class ApplicationCall:
    """What an application hook sees: one application of one layer.

    ``position`` is the global effective-depth index (0-based), ``layer_index`` the
    global unique-layer index; ``kwargs`` are the arguments the layer was called
    with (``hidden_states`` is the application's input), ``output`` its output
    hidden states.  Calling ``layer(**kwargs)`` again re-runs the application.
    """

    position: int
    layer_index: int
    layer: Any
    kwargs: Dict[str, Any]
    output: Any


ApplicationHook = Callable[[ApplicationCall], Optional[Any]]


class _Application:
    """One application of a unique layer at a given position of the schedule."""

    __slots__ = ("layer", "slot", "block")

    def __init__(self, layer, slot: int, block: "LoopedTransformerBlock"):
        self.layer = layer
        self.slot = slot  # 1-based: effective-depth position + 1, unique over the whole model
        self.block = block

    @property
    def layer_number(self) -> int:
        # FP8/FP4 per-layer contexts are keyed by the unique layer.
        return self.layer.layer_number

    def __getattr__(self, name):
        return getattr(self.layer, name)

    def _run(self, *args, **kwargs):
        if kwargs.get("inference_context") is None:
            return self.layer(*args, **kwargs)
        attn = self.layer.self_attention
        saved = attn.layer_number
        attn.layer_number = self.slot  # each application gets its own KV-cache slot
        try:
            return self.layer(*args, **kwargs)
        finally:
            attn.layer_number = saved

    def __call__(self, *args, **kwargs):
        out = self._run(*args, **kwargs)
        hooks = self.block._application_hooks
        if hooks:
            hidden, context = out
            call = ApplicationCall(self.slot - 1, self.layer.layer_number - 1, self.layer, kwargs, hidden)
            for hook in list(hooks.values()):
                replaced = hook(call)
                if replaced is not None:
                    call.output = replaced
            out = (call.output, context)
        return out


class _HookHandle:
    def __init__(self, hooks: dict, key: int):
        self.hooks, self.key = hooks, key

    def remove(self) -> None:
        self.hooks.pop(self.key, None)


class LoopedTransformerBlock(TransformerBlock):
    """A ``TransformerBlock`` whose forward applies its layers in schedule order.

    The global schedule is set by :meth:`set_global_schedule` (the model builder
    does this from the loop spec); with the identity schedule the block is
    numerically the parent class.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unique_layers_per_rank = len(self.layers)
        self._layer_offset = (self.layers[0].layer_number - 1) if len(self.layers) else 0
        self.local_schedule: List[int] = list(range(len(self.layers)))
        self._identity = True
        self._slot_offset = 0
        self._view_depth = 0
        self._view: Optional[List[_Application]] = None
        self._application_hooks: Dict[int, ApplicationHook] = {}
        self._next_hook = 0
        self._no_grad_local: Optional[Tuple[int, int]] = None  # truncated backprop (see truncation.py)
        self._active_parts: Optional[truncation.Parts] = None

    def register_application_hook(self, hook: ApplicationHook) -> _HookHandle:
        """Call ``hook(ApplicationCall)`` after every layer application (analysis tools).

        A hook may return a tensor to replace the application's output hidden states.
        Returns a handle with ``remove()``.
        """
        key = self._next_hook
        self._next_hook += 1
        self._application_hooks[key] = hook
        return _HookHandle(self._application_hooks, key)

    # ------------------------------------------------------------------ schedule
    def set_global_schedule(self, schedule: Sequence[int], stage_first_layer: Optional[int] = None,
                            no_grad_positions: Optional[Tuple[int, int]] = None):
        """Install the model-wide schedule; this stage runs its contiguous part of it.

        ``no_grad_positions``: effective-depth positions ``[start, end)`` that run without
        autograd while gradients are enabled (truncated backprop, :mod:`.truncation`)."""
        first = self._layer_offset if stage_first_layer is None else stage_first_layer
        local = stage_local_schedule(schedule, first, self._unique_layers_per_rank)
        positions = [p for p, idx in enumerate(schedule) if first <= idx < first + self._unique_layers_per_rank]
        self._slot_offset = positions[0] if positions else 0
        if len(local) == 0 and self._unique_layers_per_rank:
            raise UsageError(
                f"the schedule never applies layers {first}..{first + self._unique_layers_per_rank - 1}"
            )
        self.local_schedule = local
        self._identity = local == list(range(self._unique_layers_per_rank))
        self._view = None
        self._no_grad_local = None
        if no_grad_positions is not None:
            lo = max(no_grad_positions[0] - self._slot_offset, 0)
            hi = min(no_grad_positions[1] - self._slot_offset, len(local))
            self._no_grad_local = (lo, hi) if lo < hi else None

    @property
    def num_applications(self) -> int:
        return len(self.local_schedule)

    def _applications(self) -> List[_Application]:
        if self._view is None:
            self._view = [
                _Application(self.layers[idx], self._slot_offset + pos + 1, self)
                for pos, idx in enumerate(self.local_schedule)
            ]
        return self._view

    def _get_layer(self, layer_number: int):
        """The ``layer_number``-th *application* (0-based) of this stage.

        megatron-core's full activation recomputation (``_checkpointed_forward``)
        looks layers up through this method, in the forward pass *and again when it
        recomputes during the backward pass* -- by then the scheduled view of
        ``self.layers`` is gone, so the lookup must go through the schedule here.
        """
        if self._is_identity() and not self._application_hooks:
            return self.layers[layer_number]
        return self._applications()[layer_number]

    def _is_identity(self) -> bool:
        return self._identity

    def _check_recompute(self) -> None:
        """megatron-core's uniform full recomputation walks chunks of ``recompute_num_layers``
        applications and would index past the last one if the chunk size does not divide them."""
        cfg = self.config
        if cfg.recompute_granularity == "full" and cfg.recompute_method == "uniform" and cfg.recompute_num_layers:
            parts = self._active_parts
            segments = [len(parts[0]), len(parts[2])] if parts else [len(self.local_schedule)]
            truncation.check_uniform_chunks(segments, cfg.recompute_num_layers)

    @contextmanager
    def _scheduled_view(self):
        """Present the scheduled applications as ``self.layers`` to the parent forward.

        ``nn.Module`` keeps submodules in ``_modules``; an entry in the instance
        ``__dict__`` shadows it for attribute access only, so parameters, state
        dicts and hooks still see the unique layers.
        """
        if (self._is_identity() and not self._application_hooks) or self._view_depth:
            yield
            return
        apps = self._applications()
        if self._no_grad_local is not None and torch.is_grad_enabled():
            self._active_parts = truncation.split(apps, *self._no_grad_local)
            apps = [*self._active_parts[0], self._active_parts[1], *self._active_parts[2]]
        self.__dict__["layers"] = apps
        self.num_layers_per_pipeline_rank = len(apps)
        self._view_depth += 1
        try:
            yield
        finally:
            self._view_depth -= 1
            self._active_parts = None
            del self.__dict__["layers"]
            self.num_layers_per_pipeline_rank = self._unique_layers_per_rank

    def _checkpointed_forward(self, hidden_states, **kwargs):
        """Full recomputation: with truncated backprop, megatron-core's own method runs on the
        applications before and after the no-grad span (:func:`truncation.checkpointed_forward`)."""
        if self._active_parts is not None:
            return truncation.checkpointed_forward(
                TransformerBlock._checkpointed_forward, self, self._active_parts, hidden_states, kwargs)
        return super()._checkpointed_forward(hidden_states=hidden_states, **kwargs)

    def forward(self, *args, **kwargs):
        with self._scheduled_view():
            if self.training and self.config.recompute_granularity == "full":
                self._check_recompute()
            return super().forward(*args, **kwargs)
