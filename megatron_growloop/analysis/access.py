"""Model access on the *effective-depth* axis (the model's unrolled layer applications).

:class:`AnalysisModel` wraps a :class:`~megatron_growloop.model.gpt.GrowLoopGPTModel`
(built with pipeline-parallel size 1) and offers what the analyses need:

* :meth:`AnalysisModel.trace` -- one forward that records, for every application
  ``k`` of the schedule, its input residual, its output residual and, on request,
  the attention and MLP sublayer outputs (before they are added to the residual),
  plus the arguments megatron-core called the layer with.  Applications are
  identified through the looped block's application hook
  (``register_application_hook``); sublayer outputs come from forward hooks on
  ``layer.self_attention`` / ``layer.mlp``, which fire once per application of a
  (possibly weight-tied) layer and are attributed to the application whose hook
  fires next.
* :meth:`AnalysisModel.resume` -- re-runs applications ``start..K-1`` from a given
  residual with the recorded arguments (``layer(**kwargs)``, megatron-core's own
  layer forward); used for interventions whose effect starts at ``start``.
* :meth:`AnalysisModel.run_layer` -- re-runs a single application on a modified input.
* :meth:`AnalysisModel.decode` -- the model's own final norm and output layer
  (logits sliced to the tokenizer's vocabulary).
* :meth:`AnalysisModel.intervene` -- installs an application hook for a whole
  forward (e.g. to replace an application's output).

Internally tensors stay in megatron-core's ``[seq, batch, hidden]`` layout; public
results are ``[batch, seq, ...]``.  Tensor parallelism works (without sequence
parallelism): the residual stream is replicated on every TP rank and logits are
gathered, so every rank computes the same numbers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state

from ..errors import UsageError
from ..eval.loader import describe_model, model_label


def check_supported(model) -> None:
    """Analyses need every layer in this process (PP=1) and a replicated residual stream."""

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise UsageError(
            "the analyses need every layer on one rank: run them with --pipeline-model-parallel-size 1 "
            "(tensor parallelism is fine)"
        )
    if getattr(model.config, "sequence_parallel", False):
        raise UsageError("the analyses need the full residual stream on every rank: disable --sequence-parallel")
    if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
        raise UsageError("the analyses need a whole model (embedding and output layer) on this rank")
    if not hasattr(model.decoder, "register_application_hook"):
        raise UsageError("the analyses need a GrowLoopGPTModel (megatron_growloop.model.gpt)")


@dataclass
class Trace:
    """What one forward recorded, per application ``k = 0..K-1`` (``[seq, batch, hidden]``).

    ``contribution(k) = outputs[k] - inputs[k]`` is application ``k``'s update of the
    residual stream; ``attn[k] + mlp[k]`` equals it for a pre-norm layer.
    """

    tokens: torch.Tensor  # [b, s]
    inputs: List[torch.Tensor]
    outputs: List[torch.Tensor]
    kwargs: List[Dict[str, Any]] = field(default_factory=list)
    attn: List[torch.Tensor] = field(default_factory=list)
    mlp: List[torch.Tensor] = field(default_factory=list)
    logits: Optional[torch.Tensor] = None  # [b, s, V] float32, real vocabulary only

    @property
    def depth(self) -> int:
        return len(self.outputs)

    def contribution(self, k: int) -> torch.Tensor:
        return self.outputs[k] - self.inputs[k]


class AnalysisModel:
    """A loaded model plus what is needed to read it on the effective-depth axis.

    ``vocab_size`` is the tokenizer's vocabulary (padded rows of the output layer are
    dropped before any softmax); ``info`` is :func:`megatron_growloop.eval.loader.describe_model`
    output (schedule, block and growth boundaries) and ``label`` a short name for plots.
    """

    def __init__(self, model, tokenizer=None, vocab_size: Optional[int] = None,
                 info: Optional[Dict[str, Any]] = None, label: Optional[str] = None):
        check_supported(model)
        self.model = model
        self.tokenizer = tokenizer
        if vocab_size is None:
            if tokenizer is None:
                raise UsageError("AnalysisModel needs a tokenizer or an explicit vocab_size")
            vocab_size = int(tokenizer.vocab_size)
        self.vocab_size = int(vocab_size)
        if info is None:

            info = describe_model(model)
        self.info = dict(info)
        if label is None:

            label = model_label(self.info)
        self.label = label
        self.model.eval()

    # ------------------------------------------------------------------ structure
    @property
    def depth(self) -> int:
        return self.model.effective_depth

    @property
    def schedule(self) -> List[int]:
        return list(self.model.schedule)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def describe(self) -> Dict[str, Any]:
        d = dict(self.info)
        d["label"] = self.label
        d["schedule"] = self.schedule
        d["effective_depth"] = self.depth
        return d

    # ------------------------------------------------------------------ forward
    def _positions(self, tokens: torch.Tensor) -> torch.Tensor:
        b, s = tokens.shape
        return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's own forward: ``[b, s, V]`` float32 logits over the real vocabulary."""
        tokens = tokens.to(self.device)
        out = self.model(tokens, self._positions(tokens), None)
        return out[..., : self.vocab_size].float()

    @contextmanager
    def intervene(self, hook: Callable):
        """Call ``hook(ApplicationCall)`` after every application during the block;
        a returned tensor replaces that application's output."""
        handle = self.model.decoder.register_application_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def trace(self, tokens: torch.Tensor, sublayers: bool = False, keep_kwargs: bool = False,
              logits: bool = True, hook: Optional[Callable] = None) -> Trace:
        """Run the model once, recording every application (see :class:`Trace`).

        ``hook`` (optional) is called as an application hook *before* recording, so a
        trace can also record an intervened forward.
        """
        tokens = tokens.to(self.device)
        K = self.depth
        inputs: List[Optional[torch.Tensor]] = [None] * K
        outputs: List[Optional[torch.Tensor]] = [None] * K
        kwargs: List[Optional[Dict[str, Any]]] = [None] * K
        attn: List[Optional[torch.Tensor]] = [None] * K if sublayers else []
        mlp: List[Optional[torch.Tensor]] = [None] * K if sublayers else []
        pending: Dict[str, List[torch.Tensor]] = {"attn": [], "mlp": []}
        handles = []

        def sub_hook(kind):
            def fn(module, args, out):
                o, bias = (out if isinstance(out, tuple) else (out, None))
                # clone: megatron's bias-dropout-add adds the residual into this tensor in place (eval mode)
                pending[kind].append(o.clone() if bias is None else o + bias)
            return fn

        if sublayers:
            for layer in self.model.decoder._modules["layers"]:
                handles.append(layer.self_attention.register_forward_hook(sub_hook("attn")))
                handles.append(layer.mlp.register_forward_hook(sub_hook("mlp")))

        def app_hook(call):
            out = call.output
            if hook is not None:
                replaced = hook(call)
                if replaced is not None:
                    out = replaced
            p = call.position
            inputs[p] = call.kwargs["hidden_states"]
            outputs[p] = out
            if keep_kwargs:
                kwargs[p] = dict(call.kwargs)
            if sublayers:
                if len(pending["attn"]) != 1 or len(pending["mlp"]) != 1:
                    raise RuntimeError(
                        f"application {p}: expected one attention and one MLP call, saw "
                        f"{len(pending['attn'])} and {len(pending['mlp'])}"
                    )
                attn[p] = pending["attn"].pop()
                mlp[p] = pending["mlp"].pop()
            return out if out is not call.output else None

        try:
            with self.intervene(app_hook):
                out = self.model(tokens, self._positions(tokens), None)
        finally:
            for h in handles:
                h.remove()
        if any(x is None for x in outputs):
            missing = [i for i, x in enumerate(outputs) if x is None]
            raise RuntimeError(f"applications {missing} did not run")
        return Trace(
            tokens=tokens, inputs=inputs, outputs=outputs,  # type: ignore[arg-type]
            kwargs=kwargs if keep_kwargs else [],  # type: ignore[arg-type]
            attn=attn, mlp=mlp,  # type: ignore[arg-type]
            logits=out[..., : self.vocab_size].float() if logits else None,
        )

    # ------------------------------------------------------------------ pieces
    def _layer(self, position: int):
        layers = self.model.decoder._modules["layers"]
        local = self.model.decoder.local_schedule[position]
        return layers[local]

    @staticmethod
    def _expand(kwargs: Dict[str, Any], hidden: torch.Tensor) -> Dict[str, Any]:
        kw = dict(kwargs)
        kw["hidden_states"] = hidden
        b_rec = kwargs["hidden_states"].shape[1]
        if hidden.shape[1] != b_rec:
            for name in ("attention_mask", "attention_bias", "padding_mask", "context", "context_mask",
                         "packed_seq_params", "inference_context"):
                if kw.get(name) is not None:
                    raise UsageError(f"cannot re-run an application on a larger batch with {name} set")
        return kw

    @torch.no_grad()
    def run_layer(self, position: int, kwargs: Dict[str, Any], hidden: torch.Tensor) -> torch.Tensor:
        """Re-run application ``position`` (recorded ``kwargs``) on ``hidden`` ``[s, b', h]``.

        ``b'`` may be a multiple of the recorded batch (the extra rows are new inputs)."""
        out, _ = self._layer(position)(**self._expand(kwargs, hidden))
        return out

    @torch.no_grad()
    def resume(self, trace: Trace, start: int, hidden: torch.Tensor,
               on_output: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> torch.Tensor:
        """Run applications ``start..K-1`` from residual ``hidden`` (the input of ``start``).

        ``on_output(k, input, output)`` sees every re-run application.  Returns the
        final residual (before the final norm)."""
        if not trace.kwargs:
            raise RuntimeError("resume() needs a trace recorded with keep_kwargs=True")
        h = hidden
        for k in range(start, trace.depth):
            out = self.run_layer(k, trace.kwargs[k], h)
            if on_output is not None:
                on_output(k, h, out)
            h = out
        return h

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.model.decoder.final_layernorm
        return hidden if norm is None else norm(hidden)

    def unembed(self, normed: torch.Tensor) -> torch.Tensor:
        """Output layer on final-normed ``[s, b, h]``: ``[b, s, V]`` logits (real vocabulary, float32)."""
        m = self.model
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(normed, weight=weight, runtime_gather_output=True)
        return logits.transpose(0, 1)[..., : self.vocab_size].float()

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of a residual ``[s, b, h]`` through the model's final norm and output layer."""
        return self.unembed(self.final_norm(hidden))

    def parameters_frozen(self):
        """Context manager: model parameters do not require gradients (lens training)."""
        return _frozen(self.model)


@contextmanager
def _frozen(model):
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


def seq_mask(lengths: Sequence[int], seq_len: int, device=None) -> torch.Tensor:
    """``[b, s]`` bool: True at the real (non-padding) positions of each row."""
    ar = torch.arange(seq_len, device=device)
    return ar.unsqueeze(0) < torch.as_tensor(list(lengths), device=device).unsqueeze(1)
