"""The CPU compatibility layer maps CUDA requests to the CPU, and only when CUDA is absent."""

import pytest
import torch

from megatron_growloop import platform
from megatron_growloop.platform import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU layer is inactive on GPU machines")


def test_activation_is_idempotent_and_reports_cpu():
    assert platform.setup() == "cpu"
    assert platform.setup() == "cpu"
    assert cpu.is_active()
    assert platform.dist_backend() == "gloo"
    assert platform.device() == torch.device("cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda"), 0])
def test_factory_device_arguments_are_rewritten(device):
    platform.setup()
    t = torch.zeros(3, device=device)
    assert t.device.type == "cpu"
    assert torch.empty(2, 2, device=device).device.type == "cpu"
    assert torch.ones(1).to(device).device.type == "cpu"


def test_cuda_calls_are_harmless():
    platform.setup()
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.pin_memory() is x
    m = torch.nn.Linear(2, 2)
    assert m.cuda() is m
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        s.wait_stream(torch.cuda.current_stream())


def test_type_names_match_megatron_optimizer_checks():
    platform.setup()
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    # explicit conversions still work
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64


def test_cuda_rng_is_the_cpu_generator():
    platform.setup()
    torch.cuda.manual_seed(7)
    state = torch.cuda.get_rng_state()
    a = torch.rand(4)
    torch.cuda.set_rng_state(state)
    b = torch.rand(4)
    assert torch.equal(a, b)
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(4), a)


def test_megatron_rng_tracker_forks_cpu_state(dist_1rank):
    platform.setup()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(3)
    # forking draws from the tracker's own state and restores the default one
    assert torch.equal(torch.get_rng_state(), before)
    with get_cuda_rng_tracker().fork():
        inside2 = torch.rand(3)
    assert not torch.equal(inside, inside2)  # the tracker state advanced


def test_backward_pass_keeps_cuda_requests_mapped():
    """Code run inside backward (megatron's re-entrant recomputation re-runs layer forwards
    there) must still see ``device="cuda"`` mapped to the CPU, also after ``Tensor.backward()``."""
    platform.setup()
    seen = []

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(torch.ones(2, device="cuda").device.type)
            return g * 2

    x = torch.ones(3, requires_grad=True)
    Recompute.apply(x).sum().backward()
    torch.autograd.backward(Recompute.apply(x).sum())
    torch.autograd.grad(Recompute.apply(x).sum(), x)
    assert seen == ["cpu", "cpu", "cpu"]
    assert torch.equal(x.grad, torch.full((3,), 4.0))



def test_ordinary_ops_are_not_intercepted():
    """Only calls that must be rewritten are wrapped: no torch-function mode sees every op
    (it made each small op ~60% more expensive), and compute functions are the originals."""
    platform.setup()
    assert not torch.overrides._get_current_function_mode_stack()
    for name in ("matmul", "add", "softmax", "cat"):
        assert not hasattr(getattr(torch, name), "__wrapped__"), name
    assert hasattr(torch.empty, "__wrapped__") and hasattr(torch.Tensor.to, "__wrapped__")


def test_tensor_methods_and_new_factories_map_devices():
    platform.setup()
    x = torch.ones(2)
    assert x.to(device="cuda").device.type == "cpu"
    assert x.to("cuda", torch.float64).dtype == torch.float64
    assert x.to(torch.device("cuda", 0), non_blocking=True).device.type == "cpu"
    assert x.new_zeros(3, device="cuda").device.type == "cpu"
    assert x.new_tensor([1.0], device=0).device.type == "cpu"
    assert torch.zeros(2, pin_memory=True).device.type == "cpu"
    assert x.to(torch.float16).dtype == torch.float16  # dtype-only conversions untouched


def test_meta_device_context_reaches_wrapped_factories():
    """torch.device("meta") (used by transformers' from_pretrained) must still put factory results
    on the meta device when the CPU layer was installed before torch cached its constructor table."""
    from torch.utils import _device

    platform.setup()
    cpu.deactivate()
    _device._device_constructors.cache_clear()
    cpu.activate()
    with torch.device("meta"):
        assert torch.tensor([1.0]).is_meta
        assert torch.arange(3).is_meta
        assert torch.empty(2).is_meta
    assert not torch.tensor([1.0]).is_meta
