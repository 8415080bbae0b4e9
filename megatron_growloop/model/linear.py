"""megatron-core's tensor-parallel linear layers with a plain ``F.linear`` path for inference at TP=1.

``ColumnParallelLinear.forward`` and ``RowParallelLinear.forward``
(``megatron/core/tensor_parallel/layers.py``, megatron-core 0.16.1) always go through three
``torch.autograd.Function``s -- ``_CopyToModelParallelRegion``, ``LinearWithGradAccumulationAndAsyncCommunication``
(or ``LinearWithFrozenWeight``) and ``_ReduceFromModelParallelRegion`` -- also under
``torch.no_grad``/``torch.inference_mode`` and at tensor-parallel size 1, where the two
communication functions are identities and the product is ``matmul(x, w.t()) (+ bias)``.  Each
``Function.apply`` costs several microseconds of Python and dispatch; a one-token decoding step of
a 30-layer model makes 120 of these products, so on a CPU this overhead was measured as a
visible share of the per-token time against Hugging Face (``benchmarks/cpu_vs_hf.py``).

:class:`ColumnParallelLinear` and :class:`RowParallelLinear` are the same modules (subclasses:
same constructor, parameters and sharded state dict) whose forward, when gradients are off and
the tensor-parallel group has one rank, computes exactly what the parent's forward computes
there -- ``F.linear(x, w)`` then ``+ bias`` as the parent adds it -- without the Functions.
Training, or any TP > 1, runs the parent's forward unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel


def _single_rank(module) -> bool:
    group = module.tp_group
    return group is None or group.size() == 1


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's ``ColumnParallelLinear`` with a direct ``F.linear`` when no gradient is
    recorded and TP=1 (gathering the output over one rank is the identity)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inference_fast_path = _single_rank(self)

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        if not self.inference_fast_path or torch.is_grad_enabled() or weight is not None:
            return super().forward(input_, weight, runtime_gather_output)
        output = F.linear(input_, self.weight)
        if self.skip_bias_add:
            return output, self.bias
        if self.bias is not None:
            output = output + self.bias
        return output, None


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's ``RowParallelLinear`` with a direct ``F.linear`` when no gradient is
    recorded and TP=1 (the all-reduce over one rank is the identity)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inference_fast_path = _single_rank(self) and not self.explicit_expert_comm

    def forward(self, input_: torch.Tensor):
        if not self.inference_fast_path or torch.is_grad_enabled():
            return super().forward(input_)
        output = F.linear(input_, self.weight)
        if self.skip_bias_add:
            return output, self.bias
        if self.bias is not None:
            output = output + self.bias
        return output, None
