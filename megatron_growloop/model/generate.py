"""Greedy generation and full-sequence logits for :class:`GrowLoopGPTModel` (PP=1, any TP).

With ``use_cache=True`` a megatron-core ``StaticInferenceContext`` holds the KV
cache; the looped block gives every *application* of a layer its own cache slot
(see :mod:`megatron_growloop.looping.block`), so a looped or block-repeated
model decodes exactly as it computes without a cache.

The decoding loop keeps per-token work outside the model to a minimum: it runs under
``torch.inference_mode`` (cheaper dispatch than ``no_grad`` for the many small ops of a
one-token step), writes tokens into one preallocated buffer, slices positions from one
precomputed range, and reads the stop condition back to the host only every
:data:`STOP_CHECK_INTERVAL` tokens (each read is a device synchronisation on a GPU).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from ..errors import UsageError

STOP_CHECK_INTERVAL = 8


def _check_pp() -> None:
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise UsageError("generation runs with pipeline parallel size 1 (use TP to split the model)")


def _positions(start: int, length: int, batch: int, device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device).unsqueeze(0).expand(batch, length)


@torch.no_grad()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits ``[batch, seq, vocab]`` (gathered over TP if the model was built so)."""
    _check_pp()
    was_training = model.training
    model.eval()
    try:
        return model(tokens, _positions(0, tokens.shape[1], tokens.shape[0], tokens.device), None)
    finally:
        model.train(was_training)


def greedy_generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    use_cache: bool = True,
    stop_token: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Greedy continuation of ``prompt`` (``[batch, seq]`` token ids); returns ``[batch, seq+new]``.

    ``vocab_size`` masks padded vocabulary rows out of the argmax.  Generation stops early
    when every sequence has produced ``stop_token`` (later positions of a finished sequence
    hold ``stop_token``).
    """
    _check_pp()
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    b, s = prompt.shape
    limit = getattr(model, "max_sequence_length", None)
    if limit is not None and s + max_new_tokens > limit:
        raise UsageError(
            f"prompt of {s} tokens + {max_new_tokens} new tokens exceeds the model's context of {limit}"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out, written = _decode(model, prompt, max_new_tokens, use_cache, stop_token, vocab_size)
    finally:
        model.train(was_training)
    return out[:, :written].clone()  # a normal tensor (inference tensors refuse autograd and in-place use)


def _decode(model, prompt, max_new_tokens, use_cache, stop_token, vocab_size):
    b, s = prompt.shape
    total = s + max_new_tokens
    out = torch.empty(b, total, dtype=prompt.dtype, device=prompt.device)
    out[:, :s] = prompt
    positions = _positions(0, total, b, prompt.device)
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    ctx = StaticInferenceContext(b, total) if use_cache else None
    written = s
    for t in range(s, total):
        if ctx is None:
            step_logits = model(out[:, :t], positions[:, :t], None)
        else:
            # prefill the prompt once, then feed only the newest token; the cache keeps the rest
            start = ctx.sequence_len_offset
            step_logits = model(out[:, start:t], positions[:, start:t], None, inference_context=ctx,
                                runtime_gather_output=True)
            ctx.sequence_len_offset = t
        last = step_logits[:, -1, :]
        if vocab_size is not None:
            last = last[:, :vocab_size]
        nxt = last.argmax(dim=-1)
        if stop_token is not None:
            nxt = nxt.masked_fill(done, stop_token)
            done |= nxt == stop_token
        out[:, t] = nxt
        written = t + 1
        if stop_token is not None and (written - s) % STOP_CHECK_INTERVAL == 0 and bool(done.all()):
            break
    if stop_token is not None:
        # end at the step where the last sequence stopped, as a check after every token would
        finished = ((out[:, s:written] == stop_token).cumsum(1) > 0).all(0).nonzero()
        if len(finished):
            written = s + int(finished[0]) + 1
    return out, written
