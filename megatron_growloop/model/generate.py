"""Greedy generation and full-sequence logits for :class:`GrowLoopGPTModel` (PP=1, any TP).

With ``use_cache=True`` a megatron-core ``StaticInferenceContext`` holds the KV
cache; the looped block gives every *application* of a layer its own cache slot
(see :mod:`megatron_growloop.looping.block`), so a looped or block-repeated
model decodes exactly as it computes without a cache.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from ..errors import UsageError


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


@torch.no_grad()
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
    when every sequence has produced ``stop_token``.
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
    out = prompt
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)

    def pick(last_logits: torch.Tensor) -> torch.Tensor:
        if vocab_size is not None:
            last_logits = last_logits[..., :vocab_size]
        return last_logits.argmax(dim=-1)

    try:
        if use_cache:
            ctx = StaticInferenceContext(b, s + max_new_tokens)

            def step(seq: torch.Tensor) -> torch.Tensor:
                # prefill the prompt once, then feed only the newest token; the cache keeps the rest
                new = seq[:, ctx.sequence_len_offset:]
                pos = _positions(ctx.sequence_len_offset, new.shape[1], b, seq.device)
                step_logits = model(new, pos, None, inference_context=ctx, runtime_gather_output=True)
                ctx.sequence_len_offset += new.shape[1]
                return step_logits[:, -1, :]
        else:
            def step(seq: torch.Tensor) -> torch.Tensor:
                return model(seq, _positions(0, seq.shape[1], b, seq.device), None)[:, -1, :]

        filler = torch.full((b,), stop_token if stop_token is not None else 0, dtype=prompt.dtype, device=prompt.device)
        for _ in range(max_new_tokens):
            nxt = torch.where(done, filler, pick(step(out)))
            out = torch.cat([out, nxt[:, None]], dim=1)
            if stop_token is not None:
                done |= nxt == stop_token
                if bool(done.all()):
                    break
    finally:
        model.train(was_training)
    return out
