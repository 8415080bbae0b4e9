"""Which kernels a run uses, as far as they decide what autograd keeps for the backward pass.

The planner counts the tensors megatron-core's modules save for backward; that depends on
the layer spec and on a few kernel choices, all of which :class:`~megatron_growloop.model.implementation.Implementation`
fixes.  :meth:`Kernels.of` is the one translation from it (keep it in step with
``Implementation.config_kwargs``: the fusions come from ``Implementation.fusions`` for the device).

``device`` matters for one thing only: torch's ``rms_norm`` has a fused CUDA kernel that
saves its input and the fp32 reciprocal RMS, while the CPU composite upcasts to fp32 and
saves the fp32 input and the fp32 normalised tensor as well (``torch/_refs`` /
``aten/src/ATen/native/layer_norm.cpp``).  The local spec uses torch's norm on both.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.fusions import Kernels as FusionKernels

ATTENTION_FLASH_BACKENDS = ("flash", "fused", "auto")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Kernels:
    spec: str = "local"
    """``local`` (megatron-core local spec, torch ops) or ``transformer_engine``."""
    device: str = "cuda"
    attention: str = "unfused"
    """``unfused`` (scores and probabilities materialised, ``[b, heads, s, s]``), ``flash`` (TE) or
    ``sdpa`` (torch's fused kernel on the local spec: also keeps its own output)."""
    swiglu_fused: bool = False
    """megatron's ``bias_activation_fusion`` (``fusions/fused_bias_swiglu.py``): saves the fc1 output only."""
    rope_fused: bool = False
    """``apply_rope_fusion``: no cos/sin tables saved per layer."""
    dtype: str = "fp32"

    @property
    def act_bytes(self) -> int:
        """Bytes of one activation element (the params dtype; megatron computes in it)."""
        return DTYPE_BYTES[self.dtype]

    @classmethod
    def of(cls, impl, device: str = "cuda") -> "Kernels":
        if impl.transformer_impl == "transformer_engine":
            attention = "flash" if impl.attention_backend in ATTENTION_FLASH_BACKENDS else "unfused"
        else:  # SDPAttention (torch's fused kernel, the default) or megatron's local DotProductAttention
            attention = "sdpa" if impl.core_attention == "sdpa" else "unfused"
        fused = impl.fusions(FusionKernels(cuda=device == "cuda",
                                           transformer_engine=impl.transformer_impl == "transformer_engine"))
        return cls(
            spec=impl.transformer_impl,
            device=device,
            attention=attention,
            swiglu_fused=fused["bias_activation_fusion"],
            rope_fused=fused["apply_rope_fusion"],
            dtype=impl.dtype,
        )
