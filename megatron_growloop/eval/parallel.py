"""Distributed plumbing for evaluation: every rank runs the same driver loop in lock-step.

* Tensor parallel: the model's forward is collective; logits come back gathered, so
  every TP rank computes the same numbers.
* Pipeline parallel: forwards go through megatron-core's forward-only pipeline
  schedule; the last stage computes the (small) results and broadcasts them to the
  other stages of its pipeline.
* Data parallel: work is sharded over the data-parallel ranks and gathered back,
  so every rank ends with every result.

Only the *driver* rank (global rank 0) prints and writes files.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

T = TypeVar("T")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def is_driver() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def pp_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size() if initialized() else 1


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size() if initialized() else 1


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank() if initialized() else 0


def broadcast_from_last_stage(obj: Any) -> Any:
    """Give every stage of this pipeline the object computed on its last stage."""
    if pp_size() == 1:
        return obj
    box = [obj if parallel_state.is_pipeline_last_stage() else None]
    dist.broadcast_object_list(
        box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return box[0]


def shard(items: Sequence[T]) -> List[int]:
    """Indices of ``items`` this data-parallel rank works on (round robin)."""
    n, r = dp_size(), dp_rank()
    return list(range(r, len(items), n))


def gather_sharded(total: int, mine: List[int], results: List[Any]) -> List[Any]:
    """Reassemble per-index results computed by all data-parallel ranks."""
    if dp_size() == 1:
        out: List[Any] = [None] * total
        for i, r in zip(mine, results):
            out[i] = r
        return out
    parts: List[Any] = [None] * dp_size()
    dist.all_gather_object(parts, list(zip(mine, results)), group=parallel_state.get_data_parallel_group())
    out = [None] * total
    for part in parts:
        for i, r in part:
            out[i] = r
    return out


def pipeline_forward(
    model,
    tokens: torch.Tensor,
    post: Callable[[torch.Tensor], Any],
    labels: Optional[torch.Tensor] = None,
) -> Any:
    """Run ``model`` on ``tokens`` ``[batch, seq]`` and return ``post(output)`` on every rank.

    ``output`` is the logits ``[batch, seq, vocab]`` (gathered over TP), or the per-token
    loss ``[batch, seq]`` when ``labels`` are given.  With PP > 1 the forward goes through
    megatron-core's forward-only pipeline schedule and ``post`` runs on the last stage.
    """
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)

    def call(m):
        if labels is not None:
            return m(tokens, positions, None, labels=labels)
        return m(tokens, positions, None, runtime_gather_output=True)

    if pp_size() == 1:
        with torch.no_grad():
            return post(call(model))


    def step(data_iterator, m):
        next(data_iterator)
        out = call(m)

        def collect(output_tensor, non_loss_data=False):
            return post(output_tensor)

        return out, collect

    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            decoder_seq_length=s,
            forward_only=True,
            collect_non_loss_data=True,
        )
    result = store[0] if parallel_state.is_pipeline_last_stage() else None
    return broadcast_from_last_stage(result)
