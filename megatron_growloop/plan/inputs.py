"""What the planner plans: a training run (:class:`RunSetup`) on a cluster (:class:`Cluster`).

The run is the project's three records -- :class:`~megatron_growloop.model.arch.Arch`,
:class:`~megatron_growloop.model.parallel.ParallelLayout`,
:class:`~megatron_growloop.model.implementation.Implementation` -- plus the data-parallel
size, the batch and the optimizer settings of ``pretrain``, and randomized recurrence
(``--loop-repeats-dist``, ``--loop-backprop-depth``: :class:`~megatron_growloop.looping.recurrence.RecurrenceSettings`).

With randomized recurrence ``arch`` holds the nominal k (the mean): the trainer builds the model
and splits the pipeline at that k and only changes the schedule per step, so the stage sizes stay
those of the nominal k.  :meth:`RunSetup.at_step` is one step at a given k and backprop depth;
the planner sizes memory at the largest k and averages FLOPs and time over the law of k.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from ..errors import UsageError
from ..growth.plan import GrowthPlan
from ..looping.recurrence import RecurrenceSettings
from ..model.arch import Arch
from ..model.implementation import Implementation
from ..model.parallel import ParallelLayout

GB = 1e9  # the planner reports decimal gigabytes


@dataclass(frozen=True)
class Cluster:
    gpu_memory_gb: float = 80.0
    peak_tflops: float = 989.0
    """Dense bf16 peak of one GPU (H100 SXM: 989); FP8 runs use twice this."""
    assume_mfu: float = 0.40
    gpus_per_node: int = 8
    intra_node_gbs: float = 450.0
    """Per-GPU collective bandwidth inside a node (NVLink), GB/s."""
    inter_node_gbs: float = 50.0
    """Per-GPU collective bandwidth between nodes (400 Gb/s InfiniBand), GB/s."""


@dataclass(frozen=True)
class RunSetup:
    arch: Arch
    layout: ParallelLayout
    impl: Implementation
    dp: int = 1
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    growth: Optional[GrowthPlan] = None
    train_iters: Optional[int] = None
    device: str = "cuda"
    """``cuda`` for GPU runs; ``cpu`` plans the CPU kernels (the tests measure there)."""
    grow_transfer: str = "memory"
    """How growth steps carry the state (``--grow-transfer``): ``memory`` or ``checkpoint``."""
    recurrence: Optional[RecurrenceSettings] = None
    """k drawn per step and/or truncated backprop (None: every step runs the arch's k, full backprop)."""
    step: Optional[Tuple[int, Optional[int]]] = None
    """``(k, backprop depth)`` of one step (:meth:`at_step`); None: the run as a whole."""

    def __post_init__(self):
        if self.dp < 1:
            raise UsageError(f"data-parallel size must be >= 1, got {self.dp}")
        if self.micro_batch_size < 1:
            raise UsageError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        gbs = self.global_batch
        if gbs < 1 or gbs % (self.micro_batch_size * self.dp):
            raise UsageError(
                f"--global-batch-size {gbs} is not a multiple of micro batch x data-parallel size = "
                f"{self.micro_batch_size}x{self.dp}"
            )
        if self.arch.seq_length > self.arch.max_position_embeddings:
            raise UsageError(f"--seq-length {self.arch.seq_length} exceeds --max-position-embeddings "
                             f"{self.arch.max_position_embeddings}")
        self.arch.check_parallel(self.layout.tp, self.layout.pp)
        if self.layout.sequence_parallel and self.arch.seq_length % self.layout.tp:
            raise UsageError(f"--seq-length {self.arch.seq_length} must be divisible by TP {self.layout.tp} "
                             "with --sequence-parallel")
        if self.impl.recompute_granularity == "full" and (self.impl.recompute_num_layers or 1) < 1:
            raise UsageError(f"--recompute-num-layers must be >= 1, got {self.impl.recompute_num_layers}")
        if self.recurrence is not None and self.arch.loop is None:
            raise UsageError("--loop-repeats-dist/--loop-backprop-depth need a looped model (--loop)")
        if self.recurrence is not None and self.growth is not None:
            raise UsageError("growing a looped model is not supported: drop --loop-repeats-dist/--loop-backprop-depth "
                             "or --grow-method")

    @property
    def global_batch(self) -> int:
        return self.global_batch_size if self.global_batch_size is not None else self.micro_batch_size * self.dp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch_size * self.dp)

    @property
    def gpus(self) -> int:
        return self.layout.tp * self.layout.pp * self.dp

    @property
    def sequence_parallel(self) -> bool:
        return self.layout.sequence_parallel and self.layout.tp > 1

    def at_depth(self, num_layers: int) -> "RunSetup":
        """The same run with the model at another depth (a growth stage)."""
        return replace(self, arch=self.arch.with_depth(num_layers))

    def at_step(self, repeats: int, backprop_depth: Optional[int]) -> "RunSetup":
        """One training step of this run at k = ``repeats`` with this backprop depth (None: full)."""
        return replace(self, step=(int(repeats), backprop_depth))

    def worst_step(self) -> "RunSetup":
        """The step that keeps the most activations: the largest k, the final backprop depth
        (applications with autograd never decrease with k or the depth); the run itself without
        randomized recurrence."""
        rec = self.recurrence
        if rec is None or self.step is not None:
            return self
        return self.at_step(rec.largest_repeats, rec.final_backprop_depth)

    def step_law(self) -> List[Tuple[float, "RunSetup"]]:
        """``(probability, step)`` over the k of a step at the final mean and backprop depth."""
        rec = self.recurrence
        if rec is None or self.step is not None:
            return [(1.0, self)]
        return [(p, self.at_step(k, rec.final_backprop_depth)) for k, p in sorted(rec.pmf().items()) if p > 0]

    @property
    def step_loop(self):
        """The loop a step runs (the arch's, at the step's k)."""
        loop = self.arch.loop
        if loop is None or self.step is None:
            return loop
        return loop.with_repeats(self.step[0])

    def stage_sizes(self) -> List[int]:
        """Unique layers per pipeline stage (the whole model when PP=1)."""
        return list(_stage_sizes(self.arch, self.layout))

    def _per_stage(self, positions) -> List[int]:
        sizes = self.stage_sizes()
        out, lo = [], 0
        for n in sizes:
            out.append(sum(1 for i in positions if lo <= i < lo + n))
            lo += n
        return out

    def stage_applications(self) -> List[int]:
        """Layer applications per pipeline stage (a looped block counts k times)."""
        loop = self.step_loop
        schedule = loop.schedule() if loop is not None else list(range(self.arch.num_layers))
        return self._per_stage(schedule)

    def stage_grad_applications(self) -> List[int]:
        """Layer applications per stage that run with autograd (keep activations, run a backward
        pass): all of them but the early recurrences of a truncated backprop
        (``looping/truncation.py``; the prelude keeps running with autograd)."""
        loop = self.step_loop
        if loop is None:
            return self.stage_applications()
        schedule = loop.schedule()
        cut = loop.no_grad_positions(self.step[1] if self.step is not None else None)
        if cut is not None:
            schedule = schedule[:cut[0]] + schedule[cut[1]:]
        return self._per_stage(schedule)


_SIZES: Dict[tuple, Tuple[int, ...]] = {}


def _stage_sizes(arch: Arch, layout: ParallelLayout) -> Tuple[int, ...]:
    """Balancing depends only on the schedule, PP and an explicit layout string (cached: the
    layout search asks for the same split at every TP size)."""
    key = (arch.num_layers, arch.loop, layout.pp, layout.pipeline_layout)
    if key not in _SIZES:
        sizes = ParallelLayout(pp=layout.pp, pipeline_layout=layout.pipeline_layout).stage_sizes(arch)
        _SIZES[key] = tuple(sizes) if sizes is not None else (arch.num_layers,)
    return _SIZES[key]
