"""How a model is executed: layer implementation, precision, kernels, recomputation.

:class:`Implementation` is the one place for everything that changes *how* the same
architecture runs but not *what* it computes: Transformer Engine or the local spec,
the attention backend, bf16/fp16/FP8, CUDA graphs, activation recomputation and the
kernel fusions.  Flags that Megatron-LM has keep their Megatron-LM names
(``megatron/training/arguments.py``); :meth:`Implementation.config_kwargs` is their
translation into megatron-core ``TransformerConfig`` fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from megatron.core.transformer.enums import AttnBackend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Implementation:
    transformer_impl: str = "local"
    attention_backend: str = "auto"
    dtype: str = "fp32"
    fp8_format: Optional[str] = None
    fp8_recipe: str = "delayed"
    cuda_graph_impl: str = "none"
    cuda_graph_warmup_steps: int = 3
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None

    @classmethod
    def from_args(cls, args) -> "Implementation":
        full = getattr(args, "recompute_granularity", None) == "full"
        return cls(
            transformer_impl=getattr(args, "transformer_impl", None) or "local",
            attention_backend=getattr(args, "attention_backend", None) or "auto",
            dtype="bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32",
            fp8_format=getattr(args, "fp8_format", None),
            fp8_recipe=getattr(args, "fp8_recipe", None) or "delayed",
            cuda_graph_impl=getattr(args, "cuda_graph_impl", None) or "none",
            cuda_graph_warmup_steps=int(getattr(args, "cuda_graph_warmup_steps", 3)),
            recompute_granularity=getattr(args, "recompute_granularity", None),
            recompute_method=getattr(args, "recompute_method", None) if full else None,
            recompute_num_layers=getattr(args, "recompute_num_layers", None) if full else None,
        )

    @property
    def params_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def half(self) -> bool:
        """bf16 or fp16: the model is wrapped in megatron-core's ``Float16Module``."""
        return self.dtype != "fp32"

    def describe(self) -> str:
        """One phrase for start-up lines: layer implementation, attention backend, precision."""
        attention = self.attention_backend if self.transformer_impl == "transformer_engine" else "local"
        fp8 = f", FP8 {self.fp8_format}/{self.fp8_recipe}" if self.fp8_format else ""
        return f"impl {self.transformer_impl}, attention {attention}, {self.dtype}{fp8}"

    def warnings(self, cuda: bool, fallback: Optional[str] = None) -> List[str]:
        """What a user on a GPU should not miss: a silent fallback, or fp32 where bf16 is the norm."""
        out = [fallback] if fallback else []
        if cuda and self.dtype == "fp32":
            out.append("running in fp32 on a GPU: pass --bf16 (Megatron-LM's usual precision) unless fp32 is intended")
        return out

    def config_kwargs(self) -> Dict[str, Any]:
        """megatron-core ``TransformerConfig`` fields for this implementation."""

        dtype = self.params_dtype
        kw: Dict[str, Any] = dict(
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=self.dtype == "bf16",
            fp16=self.dtype == "fp16",
            recompute_granularity=self.recompute_granularity,
            recompute_method=self.recompute_method,
            recompute_num_layers=self.recompute_num_layers,
            bias_activation_fusion=False,
        )
        if self.transformer_impl == "transformer_engine":
            kw["attention_backend"] = AttnBackend[self.attention_backend]
            if self.fp8_format:
                kw["fp8"] = self.fp8_format
                kw["fp8_recipe"] = self.fp8_recipe
        else:
            kw["attention_backend"] = AttnBackend.local
        if self.cuda_graph_impl not in (None, "none"):
            kw["cuda_graph_impl"] = self.cuda_graph_impl
            kw["cuda_graph_warmup_steps"] = self.cuda_graph_warmup_steps
        return kw
