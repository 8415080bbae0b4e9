"""Greedy decoding with a KV cache equals decoding without one for looped and
block-repeated models -- which needs one cache slot per *application* of a layer."""

from __future__ import annotations

import pytest
import torch

from looping_util import VOCAB, build

PROMPT_LEN, NEW = 7, 12


def _model(num_layers, loop=None, blocks=()):
    # A large init std makes the random model's predictions depend strongly on the context,
    # so a corrupted cache changes the greedy tokens.
    m = build(num_layers, loop, blocks, seed=3, init_method_std=0.3)
    m.eval()
    return m


def _prompt():
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, VOCAB, (2, PROMPT_LEN), generator=g)


def _generate(model, use_cache):
    from megatron_growloop.model.generate import greedy_generate

    return greedy_generate(model, _prompt(), NEW, use_cache=use_cache)


@pytest.mark.parametrize(
    "num_layers,loop,blocks",
    [(4, "1-2x3-1", ()), (4, None, ("1:3:3",)), (4, "1-2x2-1", ("0:3:2",))],
)
def test_cache_equals_no_cache(dist_1rank, num_layers, loop, blocks):
    """Greedy generation with the KV cache == without (looped / block-repeated models)."""
    model = _model(num_layers, loop, blocks)
    assert model.effective_depth > num_layers
    with_cache = _generate(model, True)
    without = _generate(model, False)
    assert with_cache.shape == (2, PROMPT_LEN + NEW)
    assert torch.equal(with_cache, without)
    # the continuation is not degenerate (the random model predicts varied tokens)
    assert len(set(with_cache[:, PROMPT_LEN:].flatten().tolist())) > 3


def test_cached_logits_match_full_forward(dist_1rank):
    """The logits of an incremental decode step equal those of a full forward pass."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_growloop.model.generate import logits

    model = _model(4, "1-2x3-1")
    tokens = _prompt()
    full = logits(model, tokens)
    ctx = StaticInferenceContext(2, PROMPT_LEN)
    pos = torch.arange(PROMPT_LEN).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        model(tokens[:, :-1], pos[:, :-1], None, inference_context=ctx, runtime_gather_output=True)
        ctx.sequence_len_offset += PROMPT_LEN - 1
        step = model(tokens[:, -1:], pos[:, -1:], None, inference_context=ctx, runtime_gather_output=True)
    assert torch.allclose(step[:, -1], full[:, -1], atol=1e-4), float((step[:, -1] - full[:, -1]).abs().max())
    # one cache slot per application (8), not per unique layer (4)
    assert len(ctx.key_value_memory_dict) == model.effective_depth == 8


def test_one_slot_per_layer_would_corrupt_the_cache(dist_1rank):
    """Control: keying the cache by unique layer (megatron-core's default) makes repeated
    applications overwrite each other's keys/values, and cached decoding then differs."""
    model = _model(4, "1-2x3-1")
    reference = _generate(model, False)
    apps = model.decoder._applications()
    for app in apps:
        app.slot = app.layer.layer_number  # collide: all applications of a layer share a slot
    try:
        corrupted = _generate(model, True)
    finally:
        model.apply_schedule()  # rebuild the applications with their own slots
    assert not torch.equal(corrupted, reference)
    assert torch.equal(_generate(model, True), reference)


def test_changing_k_between_generations(dist_1rank):
    """k can change between generations without rebuilding; each k decodes consistently."""
    model = _model(4, "1-2x2-1")
    outs = {}
    for k in (1, 3, 2):
        model.set_loop_repeats(k)
        assert model.effective_depth == 2 + 2 * k
        outs[k] = _generate(model, True)
        assert torch.equal(outs[k], _generate(model, False))
    assert not torch.equal(outs[1], outs[3])
