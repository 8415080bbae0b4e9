"""Fused operations without Transformer Engine compute what the unfused path computes (fp32,
tolerance 1e-5 absolute on losses and gradients of O(1-10)), and the fusion flags resolve to
what this machine can run (Megatron-LM names and defaults)."""

from __future__ import annotations

import pytest
import torch

from looping_util import loss_and_grads, max_abs_diff
from test_attention_sdpa import TOL, _build


def test_rms_norm_equals_the_unfused_formula_and_torch_rmsnorm():
    from types import SimpleNamespace

    from megatron_growloop.model.fusions import RMSNorm, rms_norm_reference

    cfg = SimpleNamespace(params_dtype=torch.float32, sequence_parallel=True, normalization="RMSNorm")
    norm = RMSNorm(cfg, 48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    ref = torch.nn.RMSNorm(48, eps=1e-5)  # megatron-core's WrappedTorchNorm builds this
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(5, 2, 48, requires_grad=True)
    y = norm(x)
    assert torch.allclose(y, rms_norm_reference(x, norm.weight, 1e-5), atol=1e-6)
    assert torch.allclose(y, ref(x), atol=1e-6)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gr,) = torch.autograd.grad(rms_norm_reference(x, norm.weight, 1e-5).square().sum(), x)
    assert torch.allclose(gx, gr, atol=1e-5)
    assert list(norm.state_dict()) == ["weight"]
    # finalize_model_grads all-reduces gradients of weights marked so under sequence parallelism
    assert norm.weight.sequence_parallel is True


@pytest.mark.parametrize("flag", ["bias_swiglu_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion"])
def test_megatron_fused_kernels_equal_unfused(dist_1rank, flag):
    """megatron-core's SwiGLU, bias-dropout-add and native vocab-parallel cross-entropy kernels
    (torch.compile'd, no TE) -- requested explicitly, since on CPU they are off by default."""
    fused = _build("sdpa", **{flag: True})
    plain = _build("sdpa", **{flag: False})
    field = {"bias_swiglu_fusion": "bias_activation_fusion"}.get(flag, flag)
    assert getattr(fused.config, field) is True and getattr(plain.config, field) is False
    la, ga = loss_and_grads(fused)
    lb, gb = loss_and_grads(plain)
    assert float((la - lb).abs().max()) <= TOL
    if flag == "cross_entropy_loss_fusion":
        # megatron-core's native kernel returns the logits gradient in bf16 whatever the training
        # precision (megatron/core/fusions/fused_cross_entropy.py, calculate_gradients): the
        # gradients agree to bf16 precision (relative 2^-8), not to fp32's
        scale = max(float(g.abs().max()) for g in gb.values())
        assert 1e-5 < max_abs_diff(ga, gb) <= scale * 2 ** -8
    else:
        assert max_abs_diff(ga, gb) <= TOL


def test_torch_compile_of_the_layers_equals_eager(dist_1rank):
    """--torch-compile: every transformer layer compiled (looped model, full recomputation)."""
    from megatron_growloop.model.fusions import compile_layers

    kw = dict(loop="1-2x2-1", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    eager, compiled = _build("sdpa", **kw), _build("sdpa", **kw)
    assert compile_layers(compiled) == 4
    assert list(compiled.state_dict()) == list(eager.state_dict())
    la, ga = loss_and_grads(eager)
    lb, gb = loss_and_grads(compiled)
    assert float((la - lb).abs().max()) <= TOL
    assert max_abs_diff(ga, gb) <= TOL


def test_fusion_defaults_follow_megatron_lm_where_the_kernel_exists():
    from megatron_growloop.model.fusions import Kernels
    from megatron_growloop.model.implementation import Implementation

    cpu, gpu, te = Kernels(), Kernels(cuda=True), Kernels(cuda=True, transformer_engine=True)
    default = Implementation()
    assert default.fusions(cpu) == dict(masked_softmax_fusion=False, bias_activation_fusion=False,
                                        bias_dropout_fusion=False, apply_rope_fusion=False,
                                        cross_entropy_loss_fusion=False, cross_entropy_fusion_impl="native",
                                        gradient_accumulation_fusion=False, persist_layer_norm=False)
    on_gpu = default.fusions(gpu)
    assert on_gpu["bias_activation_fusion"] and on_gpu["bias_dropout_fusion"]
    assert not on_gpu["apply_rope_fusion"] and not on_gpu["masked_softmax_fusion"]
    assert default.fusions(te)["apply_rope_fusion"]
    assert not Implementation(apply_rope_fusion=False).fusions(te)["apply_rope_fusion"]
    assert not Implementation(bias_swiglu_fusion=False).fusions(gpu)["bias_activation_fusion"]
    assert Implementation(bias_swiglu_fusion=True).fusions(cpu)["bias_activation_fusion"]
    assert Implementation(masked_softmax_fusion=True).fusions(Kernels(cuda=True, masked_softmax_cuda=True))[
        "masked_softmax_fusion"]


def test_fusion_flags_parse_with_megatron_lm_names():
    from megatron_growloop.errors import UsageError
    from megatron_growloop.model.fusions import Kernels
    from megatron_growloop.model.implementation import Implementation
    from megatron_growloop.training.arguments import build_parser

    p = build_parser()
    default = Implementation.from_args(p.parse_args([]))
    assert (default.masked_softmax_fusion, default.bias_swiglu_fusion, default.bias_dropout_fusion,
            default.apply_rope_fusion, default.cross_entropy_loss_fusion) == (True, None, None, True, False)
    a = p.parse_args(["--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
                      "--no-rope-fusion", "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te",
                      "--torch-compile", "--attention-backend", "unfused"])
    impl = Implementation.from_args(a)
    assert (impl.masked_softmax_fusion, impl.bias_swiglu_fusion, impl.bias_dropout_fusion, impl.apply_rope_fusion,
            impl.cross_entropy_loss_fusion, impl.cross_entropy_fusion_impl, impl.torch_compile,
            impl.core_attention) == (False, False, False, False, True, "te", True, "unfused")
    with pytest.raises(UsageError, match="needs Transformer Engine"):
        impl.fusions(Kernels())
    assert impl.fusions(Kernels(cuda=True, transformer_engine=True))["cross_entropy_fusion_impl"] == "te"


def test_grad_accum_fusion_is_off_for_looped_layers_where_it_would_overwrite_main_grad():
    """TE's wgrad GEMM writes main_grad with accumulate=False for the is_first_microbatch call: in a
    loop that is the first application, whose backward runs last (issue 12, item 6). A plain or
    grown model keeps Megatron-LM's default-on fusion where the kernel exists; a loop or a repeat
    block turns it off, and the start-up phrase says why."""
    from megatron_growloop.model.arch import Arch
    from megatron_growloop.model.config import build_transformer_config, looped
    from megatron_growloop.model.fusions import Kernels
    from megatron_growloop.model.implementation import Implementation
    from megatron_growloop.looping.spec import RepeatBlock

    te = Implementation(transformer_impl="transformer_engine")
    te_kernels = Kernels(cuda=True, transformer_engine=True)
    assert te.fusions(te_kernels)["gradient_accumulation_fusion"]
    assert not te.fusions(te_kernels, looped=True)["gradient_accumulation_fusion"]
    assert not Implementation(transformer_impl="transformer_engine",
                              gradient_accumulation_fusion=False).fusions(te_kernels)["gradient_accumulation_fusion"]
    local = Implementation()
    assert local.fusions(Kernels(cuda=True, grad_accum_fusion_cuda=True))["gradient_accumulation_fusion"]
    assert not local.fusions(Kernels(cuda=True))["gradient_accumulation_fusion"]  # no apex: off
    assert "grad-accum fusion off: looped layers" in te.fusion_summary(te_kernels, looped=True)
    assert "grad-accum" in te.fusion_summary(te_kernels) and "off" not in te.fusion_summary(te_kernels)

    shape = dict(hidden_size=64, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=128, kv_channels=16,
                 seq_length=32, max_position_embeddings=32, padded_vocab_size=256)
    plain = Arch(num_layers=4, **shape)
    loop = Arch(num_layers=2, loop="2x2", **shape)
    assert not looped(plain) and looped(loop) and looped(plain, (RepeatBlock.parse("1:3:2"),))
    # the config a looped model is built with never carries the fusion; Megatron-LM's
    # deallocate_pipeline_outputs is always on
    cfg = build_transformer_config(loop)
    assert cfg.gradient_accumulation_fusion is False and cfg.deallocate_pipeline_outputs is True
