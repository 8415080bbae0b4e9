"""The SDPA core attention (``--attention-backend sdpa``, the local spec's default) computes what
megatron-core's unfused ``DotProductAttention`` computes: forward outputs and gradients within
fp32 rounding (tolerance 1e-5 absolute on losses and gradients of O(1-10); observed <= 2e-6;
bf16: within 2^-6 of the fp32 result relative to its scale, as the unfused module),
for MHA, GQA and MQA, looped models, full and selective recomputation and cached generation,
with the same checkpoint keys.  TP=2 with sequence parallelism: tests/test_fastpath_parallel.py."""

from __future__ import annotations

import pytest
import torch

from looping_util import VOCAB, batch, loss_and_grads, max_abs_diff, tiny_arch

TOL = 1e-5


def _build(backend: str, num_layers: int = 4, seed: int = 0, cfg=None, loop=None, repeat_blocks=(), **extra):
    """A seeded tiny model with ``--attention-backend backend``; ``extra``: Arch or Implementation
    fields; ``cfg``: TransformerConfig fields neither record carries (dropout, softmax scale)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_growloop.looping.spec import RepeatBlock
    from megatron_growloop.model import gpt
    from megatron_growloop.model.implementation import Implementation
    from megatron_growloop.model.parallel import ParallelLayout

    impl = Implementation(attention_backend=backend,
                          **{k: extra.pop(k) for k in list(extra) if k in Implementation.__dataclass_fields__})
    build_config = gpt.build_transformer_config

    def with_overrides(*args, **kwargs):
        config = build_config(*args, **kwargs)
        for name, value in (cfg or {}).items():
            setattr(config, name, value)
        return config

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    gpt.build_transformer_config = with_overrides
    try:
        return gpt.build_model(tiny_arch(num_layers, loop, **extra), ParallelLayout(), impl,
                               [RepeatBlock.parse(b) for b in repeat_blocks])
    finally:
        gpt.build_transformer_config = build_config


def _core(model):
    return model.decoder.layers[0].self_attention.core_attention


def test_default_local_backend_is_sdpa_and_unfused_is_megatrons(dist_1rank):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_growloop.model.attention import SDPAttention
    from megatron_growloop.model.fusions import RMSNorm
    from megatron_growloop.model.implementation import Implementation

    assert Implementation().core_attention == "sdpa"
    assert type(_core(_build("auto"))) is SDPAttention
    assert type(_core(_build("unfused"))) is DotProductAttention
    assert type(_core(_build("local"))) is DotProductAttention
    model = _build("sdpa")
    assert isinstance(model.decoder.final_layernorm, RMSNorm)
    assert isinstance(model.decoder.layers[0].input_layernorm, RMSNorm)


@pytest.mark.parametrize("groups", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_forward_and_gradients_equal_unfused(dist_1rank, groups):
    a, b = _build("sdpa", num_query_groups=groups), _build("unfused", num_query_groups=groups)
    la, ga = loss_and_grads(a)
    lb, gb = loss_and_grads(b)
    assert float((la - lb).abs().max()) <= TOL
    assert max_abs_diff(ga, gb) <= TOL


def test_looped_model_equals_unfused(dist_1rank):
    a, b = _build("sdpa", loop="1-2x3-1"), _build("unfused", loop="1-2x3-1")
    assert a.effective_depth == 8
    la, ga = loss_and_grads(a)
    lb, gb = loss_and_grads(b)
    assert float((la - lb).abs().max()) <= TOL
    assert max_abs_diff(ga, gb) <= TOL


@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="selective"),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
], ids=["selective", "full"])
def test_recomputation_equals_no_recomputation(dist_1rank, recompute):
    """Selective recomputation re-runs exactly the core attention (megatron's checkpointed
    attention); full recomputation re-runs whole layers -- both reproduce the gradients."""
    plain = _build("sdpa", loop="1-2x2-1")
    recomputed = _build("sdpa", loop="1-2x2-1", **recompute)
    assert recomputed.decoder.layers[0].self_attention.checkpoint_core_attention == (
        recompute["recompute_granularity"] == "selective")
    la, ga = loss_and_grads(plain)
    lb, gb = loss_and_grads(recomputed)
    assert float((la - lb).abs().max()) <= TOL
    assert max_abs_diff(ga, gb) <= TOL


def test_softmax_scale_is_honoured(dist_1rank):
    """A configured softmax scale (TransformerConfig.softmax_scale) changes both backends alike."""
    a = _build("sdpa", cfg=dict(softmax_scale=0.5))
    b = _build("unfused", cfg=dict(softmax_scale=0.5))
    assert _core(a).sdpa_scale == 0.5
    la, _ = loss_and_grads(a)
    lb, _ = loss_and_grads(b)
    default, _ = loss_and_grads(_build("sdpa"))
    assert float((la - lb).abs().max()) <= TOL
    assert float((la - default).abs().max()) > 1e-3


def test_attention_dropout_draws_the_unfused_mask(dist_1rank):
    """With attention dropout both backends drop the same probabilities (same RNG tracker stream,
    one Bernoulli draw per [b, heads, sq, sk] entry), so training steps agree exactly."""
    a = _build("sdpa", cfg=dict(attention_dropout=0.3))
    b = _build("unfused", cfg=dict(attention_dropout=0.3))
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(5, force_reset_rng=True)
    la, ga = loss_and_grads(a)
    model_parallel_cuda_manual_seed(5, force_reset_rng=True)
    lb, gb = loss_and_grads(b)
    assert float((la - lb).abs().max()) <= TOL
    assert max_abs_diff(ga, gb) <= TOL
    a.eval()
    tokens, pos = batch()
    with torch.no_grad():  # dropout is off in eval mode: deterministic
        assert torch.equal(a(tokens, pos, None), a(tokens, pos, None))
    model_parallel_cuda_manual_seed(6, force_reset_rng=True)
    lc, _ = loss_and_grads(a)
    assert float((la - lc).abs().max()) > 1e-4  # another seed, other masks


def test_query_block_against_longer_keys_is_causal_from_the_bottom_right(dist_1rank):
    """A prompt chunk appended to a KV cache (sq < sk): query i sees keys 0..sk-sq+i (the unfused
    module only supports sq == sk or a single query)."""
    from megatron_growloop.model.attention import SDPAttention

    core = _core(_build("sdpa"))
    assert isinstance(core, SDPAttention)
    g = torch.Generator().manual_seed(0)
    sq, sk, b, heads, groups, d = 3, 7, 2, 4, 2, 16
    q = torch.randn(sq, b, heads, d, generator=g)
    k = torch.randn(sk, b, groups, d, generator=g)
    v = torch.randn(sk, b, groups, d, generator=g)
    out = core(q, k, v, None)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, kk) / d ** 0.5
    allowed = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    ref = torch.einsum("bhqk,kbhd->qbhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vv)
    assert torch.allclose(out, ref.reshape(sq, b, heads * d), atol=1e-6)
    # one query position (decoding) attends to every cached key, as the unfused module
    unfused = _core(_build("unfused"))
    assert torch.allclose(core(q[-1:], k, v, None), unfused(q[-1:], k, v, None), atol=1e-6)
    # an explicit mask (True = masked out, megatron's convention) replaces the causal one
    mask = torch.rand(b, 1, sq, sk, generator=g) > 0.6
    mask[..., 0] = False
    assert torch.allclose(core(q, k, v, mask), unfused(q, k, v, mask), atol=1e-6)


def test_cached_generation_equals_uncached_and_unfused(dist_1rank):
    """Greedy generation with the per-application KV cache (looped + repeated block) equals
    generation without the cache, and the unfused backend's tokens."""
    from megatron_growloop.model.generate import greedy_generate

    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, VOCAB, (2, 7), generator=g)
    models = {name: _build(name, seed=3, loop="1-2x3-1", repeat_blocks=("0:3:2",), init_method_std=0.3)
              for name in ("sdpa", "unfused")}
    outs = {(name, cache): greedy_generate(m, prompt, 12, use_cache=cache)
            for name, m in models.items() for cache in (True, False)}
    ref = outs[("unfused", False)]
    assert len(set(ref[:, 7:].flatten().tolist())) > 3  # not degenerate
    for key, out in outs.items():
        assert torch.equal(out, ref), key


def test_checkpoint_keys_do_not_depend_on_the_backend(dist_1rank):
    """Same state dict and sharded state dict keys: a checkpoint saved with one backend loads
    strictly into the other (TE_ONLY_EXTRA_STATE placeholders are added on save for both)."""
    a, b = _build("sdpa"), _build("unfused")
    assert list(a.state_dict()) == list(b.state_dict())
    assert sorted(a.sharded_state_dict()) == sorted(b.sharded_state_dict())
    b.load_state_dict(a.state_dict(), strict=True)
    la, _ = loss_and_grads(a)
    lb, _ = loss_and_grads(b)
    assert float((la - lb).abs().max()) <= TOL


def test_bad_backend_choices_are_one_line_errors():
    from megatron_growloop.errors import UsageError
    from megatron_growloop.model.implementation import Implementation

    with pytest.raises(UsageError, match="Transformer Engine kernel"):
        Implementation(attention_backend="flash")
    with pytest.raises(UsageError, match="local spec"):
        Implementation(transformer_impl="transformer_engine", attention_backend="sdpa")
    with pytest.raises(UsageError, match="unknown --attention-backend"):
        Implementation(attention_backend="xformers")


BF16_TOL = 2 ** -6  # relative to the largest fp32 value of each tensor: ~4 bf16 roundings (2^-8 each); observed <= 2^-7.8


@pytest.mark.parametrize("groups", [4, 2], ids=["mha", "gqa"])
def test_bf16_sdpa_and_unfused_agree_with_the_fp32_reference(dist_1rank, groups):
    """Both kernels exist on the CPU in bf16: SDPA's output and input gradients are as close to
    the fp32 result as the unfused module's (each within BF16_TOL x max|fp32| of it, and of each
    other; both errors observed at ~2^-8 of the scale)."""
    sdpa = _core(_build("sdpa", num_query_groups=groups))
    unfused = _core(_build("unfused", num_query_groups=groups))
    g = torch.Generator().manual_seed(2)
    s, b, heads, d = 32, 2, 4, 16
    q32 = torch.randn(s, b, heads, d, generator=g)
    k32 = torch.randn(s, b, groups, d, generator=g)
    v32 = torch.randn(s, b, groups, d, generator=g)
    w = torch.randn(s, b, heads * d, generator=g)

    def run(core, dtype):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q32, k32, v32))
        out = core(q, k, v, None)
        (out.float() * w).sum().backward()
        return [out.float()] + [t.grad.float() for t in (q, k, v)]

    ref = run(unfused, torch.float32)
    a, u = run(sdpa, torch.bfloat16), run(unfused, torch.bfloat16)
    for x, y, r in zip(a, u, ref):
        tol = BF16_TOL * float(r.abs().max())
        assert float((x - r).abs().max()) <= tol
        assert float((y - r).abs().max()) <= tol
        assert float((x - y).abs().max()) <= tol
    assert float((a[0] - ref[0]).abs().max()) > 0  # bf16 really ran
