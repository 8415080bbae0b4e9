"""The parallel layout a model is built for (megatron-core's ``ModelParallelConfig`` part).

:class:`ParallelLayout` says how many tensor- and pipeline-parallel ranks share the
model and which unique layers each pipeline stage holds.  It is separate from the
architecture (:class:`~megatron_growloop.model.arch.Arch`): the same checkpoint loads at
any layout, and growth keeps the layout while the architecture deepens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from megatron.core import parallel_state
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

from ..errors import UsageError
from ..looping.spec import RepeatBlock, balanced_stage_sizes, check_stage_sizes
from .arch import Arch


def stage_sizes_from_layout(layout: str, pp: int) -> List[int]:
    """Parse Megatron-LM layout syntax (``Et*3|t*4|tL``, ``(tt|)*2``) into unique layers per stage."""
    try:
        stages = PipelineParallelLayerLayout.parse_str_to_list(layout)
    except Exception as exc:  # noqa: BLE001 - megatron raises assorted errors
        raise UsageError(f"invalid --pipeline-model-parallel-layout {layout!r}: {exc}") from None
    if len(stages) != pp:
        raise UsageError(
            f"--pipeline-model-parallel-layout {layout!r} has {len(stages)} stages but "
            f"--pipeline-model-parallel-size is {pp} (virtual pipeline stages are not supported)"
        )
    return [sum(1 for t in st if t == LayerType.decoder) for st in stages]


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    pipeline_layout: Optional[str] = None
    """Megatron-LM ``--pipeline-model-parallel-layout`` string; None balances layer applications."""

    @classmethod
    def from_args(cls, args) -> "ParallelLayout":
        return cls(
            tp=int(args.tensor_model_parallel_size),
            pp=int(args.pipeline_model_parallel_size),
            sequence_parallel=bool(getattr(args, "sequence_parallel", False)) and args.tensor_model_parallel_size > 1,
            pipeline_layout=getattr(args, "pipeline_model_parallel_layout", None) or None,
        )

    @classmethod
    def current(cls) -> "ParallelLayout":
        """The layout of the initialised megatron-core parallel state (inference tools)."""
        return cls(
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
        )

    def stage_sizes(self, arch: Arch, repeat_blocks: Sequence[RepeatBlock] = ()) -> Optional[List[int]]:
        """Unique layers per pipeline stage (None when PP=1).

        An explicit layout is checked against the model; otherwise stages get balanced
        numbers of layer *applications* (repeat blocks included) and never cut a loop."""
        if self.pp == 1:
            return None
        schedule = arch.schedule(repeat_blocks)
        if self.pipeline_layout:
            sizes = stage_sizes_from_layout(self.pipeline_layout, self.pp)
            if sum(sizes) != arch.num_layers:
                raise UsageError(
                    f"--pipeline-model-parallel-layout {self.pipeline_layout!r} places {sum(sizes)} layers "
                    f"but the model has {arch.num_layers}"
                )
            check_stage_sizes(schedule, sizes, f"--pipeline-model-parallel-layout {self.pipeline_layout!r}")
            return sizes
        if self.pp > arch.num_layers:
            raise UsageError(
                f"{arch.num_layers} layers cannot be split over {self.pp} pipeline stages "
                "(every stage needs at least one layer)"
            )
        return balanced_stage_sizes(schedule, arch.num_layers, self.pp)
