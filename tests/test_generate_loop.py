"""The generation loop (preallocated buffer, inference mode, stop checks every few tokens) returns
exactly what a token-by-token reference loop returns, early stops included."""

from __future__ import annotations

import torch

from looping_util import VOCAB
from test_attention_sdpa import _build


def _reference(model, prompt, new, stop=None):
    """One full forward per token; stop as soon as every row has produced ``stop``."""
    from megatron_growloop.model.generate import logits

    out, done = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool)
    for _ in range(new):
        nxt = logits(model, out)[:, -1].argmax(-1)
        if stop is not None:
            nxt = torch.where(done, torch.full_like(nxt, stop), nxt)
            done |= nxt == stop
        out = torch.cat([out, nxt[:, None]], 1)
        if stop is not None and bool(done.all()):
            break
    return out


def test_generation_equals_the_reference_loop_with_and_without_stops(dist_1rank):
    from megatron_growloop.model.generate import greedy_generate

    model = _build("sdpa", seed=3, loop="1-2x3-1", init_method_std=0.3)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, VOCAB, (2, 6), generator=g)
    plain = greedy_generate(model, prompt, 12)
    assert torch.equal(plain, _reference(model, prompt, 12))
    assert not plain.is_inference() and not plain.requires_grad
    # a stop token produced by one row only: the other row runs to the end, the first is padded
    stop = int(plain[0, 6 + 3])
    out = greedy_generate(model, prompt, 12, stop_token=stop)
    assert torch.equal(out, _reference(model, prompt, 12, stop))
    # every row stops at the 4th new token: the output ends there although the loop checks every 8
    same = prompt[:1].expand(2, -1).contiguous()
    stop = int(greedy_generate(model, same, 12)[0, 6 + 3])
    out = greedy_generate(model, same, 12, stop_token=stop, use_cache=False)
    ref = _reference(model, same, 12, stop)
    assert torch.equal(out, ref) and out.shape[1] <= 6 + 4
