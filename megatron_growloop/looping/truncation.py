"""Truncated backprop through the recurrence: early applications of the block without autograd.

With ``config.loop_backprop_depth = n`` and ``k > n`` recurrences, the first ``(k - n) * L``
applications of the recurrent block run under ``torch.no_grad()`` (no graph, no saved
activations) and gradients flow through the last ``n * L`` only -- Huginn's
``iterate_forward`` (``seal-rg/recurrent-pretraining``, ``recpre/model_dynamic.py``), which
runs ``num_steps_no_grad`` steps under ``torch.no_grad()`` and then ``num_steps_with_grad``.

Huginn's recurrent block re-injects the prelude output at every step, so its prelude always
gets gradients; a ``Loop(e-L×k-d)`` has no injection, and the state entering the first
gradient application does not depend differentiably on anything before the cut.  A plain
``detach().requires_grad_()`` at the cut would leave the prelude, and under pipeline
parallelism the earlier *stages*, out of the backward graph: megatron-core's schedule would
then send no input gradient to the previous stage (``backward_step`` returns ``x.grad`` =
None, ``send_backward`` sends nothing, the previous stage waits forever), and DDP's
gradient hooks of the prelude's parameters would not fire (megatron-core's
``_ParamAndGradBucketGroup`` requires every parameter of a bucket group to report ready).
:class:`_Boundary` therefore joins the no-grad state to the graph with a **zero** gradient
for its source: the graph, the pipeline messages and the hook firings are those of the
untruncated model, the gradients are those of the truncated one (prelude and embedding get
exactly zero from this micro-batch, as after a ``detach``).  The price is the prelude's
backward over zeros (not counted as model FLOPs, see :meth:`LoopSpec.backward_depth`).

In megatron-core's forward the no-grad applications appear as one layer
(:class:`NoGradSpan`).  With full activation recomputation the span must not sit inside a
checkpointed chunk (it would be recomputed in the backward pass for nothing), so
:func:`checkpointed_forward` runs megatron-core's ``_checkpointed_forward`` on the
applications before and after the span and the span in between.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from ..errors import UsageError


class _Boundary(torch.autograd.Function):
    """Forward: the no-grad state.  Backward: a zero gradient for the cut's input."""

    @staticmethod
    def forward(ctx, state: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        ctx.source = (source.shape, source.dtype, source.device)
        return state.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.source
        return None, torch.zeros(shape, dtype=dtype, device=device)


def join(state: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``state`` (computed without autograd from ``source``) as a graph node whose gradient
    with respect to ``source`` is zero."""
    if not source.requires_grad:
        return state
    return _Boundary.apply(state, source)


class NoGradSpan:
    """Consecutive applications that run without autograd, called by megatron-core's forward
    as if they were one layer; returns the joined state (:func:`join`)."""

    def __init__(self, applications: Sequence[Any]):
        self.applications = list(applications)

    @property
    def layer_number(self) -> int:  # megatron-core keys per-layer FP8/FP4 contexts by it
        return self.applications[0].layer_number

    def __getattr__(self, name):
        if name == "applications":
            raise AttributeError(name)
        return getattr(self.applications[0], name)

    def __call__(self, hidden_states, **kwargs):
        source = hidden_states
        context = kwargs.pop("context", None)
        with torch.no_grad():
            for app in self.applications:
                hidden_states, context = app(hidden_states=hidden_states, context=context, **kwargs)
        return join(hidden_states, source), context


Parts = Tuple[List[Any], NoGradSpan, List[Any]]


def split(applications: Sequence[Any], start: int, end: int) -> Parts:
    """``(before, span, after)`` for local applications ``start..end-1`` without autograd."""
    apps = list(applications)
    return apps[:start], NoGradSpan(apps[start:end]), apps[end:]


class _Part:
    """What megatron-core's ``_checkpointed_forward`` sees as ``self`` for one part of the
    applications: their count, their lookup (also used when the backward pass recomputes a
    chunk, after the forward has returned) and, for the ``block`` method, a config whose
    ``recompute_num_layers`` counts on from the previous part."""

    def __init__(self, block, applications: Sequence[Any], config):
        self.__dict__.update(_block=block, _apps=list(applications), config=config,
                             num_layers_per_pipeline_rank=len(applications))

    def _get_layer(self, index: int):
        return self._apps[index]

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._block, name)


def checkpointed_forward(parent: Callable, block, parts: Parts, hidden_states, kwargs: Dict[str, Any]):
    """megatron-core's ``TransformerBlock._checkpointed_forward`` (``parent``) over the
    applications before the span and after it; the span runs in between, not checkpointed."""
    before, span, after = parts
    cfg = block.config
    after_cfg = cfg
    if cfg.recompute_method == "block":  # "the first N applications of the stage" across both parts
        after_cfg = copy.copy(cfg)
        after_cfg.recompute_num_layers = max(0, cfg.recompute_num_layers - len(before))
    if before:
        hidden_states = parent(_Part(block, before, cfg), hidden_states=hidden_states, **kwargs)
    hidden_states, _ = span(
        hidden_states=hidden_states,
        attention_mask=kwargs.get("attention_mask"),
        context=kwargs.get("context"),
        context_mask=kwargs.get("context_mask"),
        rotary_pos_emb=kwargs.get("rotary_pos_emb"),
        attention_bias=kwargs.get("attention_bias"),
        inference_context=None,
        packed_seq_params=kwargs.get("packed_seq_params"),
        padding_mask=kwargs.get("padding_mask"),
    )
    return parent(_Part(block, after, after_cfg), hidden_states=hidden_states, **kwargs)


def check_uniform_chunks(segments: Sequence[int], chunk: int) -> None:
    """megatron-core's uniform recomputation walks chunks of ``chunk`` applications and indexes
    past the last one unless ``chunk`` divides every segment it walks."""
    if not any(n % chunk for n in segments):
        return
    if len(segments) == 1:
        what = f"the {segments[0]} layer applications of this pipeline stage"
    else:
        what = ("the applications with autograd before and after the truncated recurrence "
                f"({' and '.join(map(str, segments))})")
    raise UsageError(f"--recompute-num-layers {chunk} must divide {what} with --recompute-method uniform "
                     "(or use --recompute-method block)")
