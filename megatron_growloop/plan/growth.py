"""Growth: memory at every stage of the growth plan and during each growth step.

A growth step (:mod:`megatron_growloop.growth.apply`) takes the model and optimizer state of
the current depth into model space and keeps it in a *transfer* (:mod:`~megatron_growloop.growth.transfer`),
releases the old model, builds the deeper one (re-balanced over the pipeline stages) and loads
it from the transfer.  Per rank:

* **source**: the old stage's weights, gradients and optimizer states (device);
* **target**: the new stage's (device); the source is released before the target is built, so
  the device holds one of them at a time;
* **save transient** (device): with the distributed optimizer, megatron gathers the model-space
  optimizer state over the data-parallel ranks bucket by bucket on the device
  (``DistributedOptimizer.get_parameter_state_dp_zero``): ``4 x (bucket + bucket/DP)`` bytes,
  one bucket being the whole buffer unless ``--overlap-grad-reduce``;
* **transfer buffer** (host memory on a GPU machine, the same memory on a CPU): the old
  stage's weights (with the distributed optimizer the whole padded parameter buffer) and its
  model-space optimizer state -- fp32 main parameters and both Adam moments, gathered over DP
  with the distributed optimizer (``3 x 4`` bytes per element of the unpadded buffer), or
  referenced as they are without it -- plus what ``load`` hands out on top: the layers the
  exchange receives from other stages (layers that move to this stage), a copy for every
  further new layer of this stage that reads an old layer already handed out (LIDAS/MIDAS
  duplicate layers), and, for every new layer of the stage, the merged SwiGLU ``linear_fc1``
  (weights and each optimizer state: megatron saves its gate and up halves as two sharded
  tensors and concatenates them on load, ``apply_swiglu_sharded_factory`` in
  ``transformer/mlp.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .inputs import RunSetup
from .kernels import DTYPE_BYTES
from .memory import StageMemory, stage_memory
from .params import count, layer_tensors


@dataclass(frozen=True)
class GrowthStepRank:
    pp_rank: int
    source: int
    target: int
    save_transient: int
    transfer: int
    received_layers: int
    copied_layers: int

    @property
    def device_peak(self) -> int:
        return max(self.source + self.save_transient, self.target)


@dataclass(frozen=True)
class GrowthStep:
    index: int
    from_layers: int
    to_layers: int
    before_iteration: int
    src: List[int]
    ranks: List[GrowthStepRank]


@dataclass(frozen=True)
class GrowthStage:
    index: int
    num_layers: int
    iterations: int
    stages: List[StageMemory]


def _optimizer_bytes_per_element(setup: RunSetup) -> int:
    """Model-space optimizer state per parameter element in the transfer."""
    if setup.distributed_optimizer or setup.impl.dtype != "fp32":
        return 12  # fp32 main param + exp_avg + exp_avg_sq
    return 8  # fp32 without the distributed optimizer: the main params are the weights


def growth_step(setup: RunSetup, index: int, src: List[int], before_iteration: int) -> GrowthStep:
    """Step ``index`` (0-based) from ``setup``'s depth to ``len(src)`` layers."""
    old, new = setup, setup.at_depth(len(src))
    old_mem, new_mem = stage_memory(old), stage_memory(new)
    e = DTYPE_BYTES[setup.impl.dtype]
    opt = _optimizer_bytes_per_element(setup)
    tensors = layer_tensors(setup.arch, setup.layout.tp)
    fc1 = sum(t.numel for t in tensors if t.name.endswith("linear_fc1.weight"))
    per_layer = count(tensors) * (e + opt)
    old_sizes, new_sizes = old.stage_sizes(), new.stage_sizes()
    ranks = []
    lo_old = lo_new = 0
    for r, (om, nm) in enumerate(zip(old_mem, new_mem)):
        held = set(range(lo_old, lo_old + old_sizes[r]))
        wanted = [src[g] for g in range(lo_new, lo_new + new_sizes[r])]
        lo_old += old_sizes[r]
        lo_new += new_sizes[r]
        received = len(set(wanted) - held)
        copies = len(wanted) - len(set(wanted))
        if setup.distributed_optimizer:
            saved = e * om.buffer_numel + 12 * om.buffer_numel_unpadded
            bucket = om.buffer_numel
            if setup.overlap_grad_reduce:
                bucket = min(bucket, max(40_000_000, 1_000_000 * setup.dp))
            transient = 4 * (bucket + bucket // setup.dp) if setup.device == "cuda" else 0
        else:
            saved = (e + opt) * om.params
            transient = 0
        transfer = (saved + received * per_layer + copies * (per_layer - fc1 * (e + opt))
                    + len(wanted) * fc1 * (e + opt))
        ranks.append(GrowthStepRank(r, om.static, nm.static, transient, transfer, received, copies))
    return GrowthStep(index, old.arch.num_layers, new.arch.num_layers, before_iteration, list(src), ranks)


def growth_plan_memory(setup: RunSetup):
    """``(stages, steps)`` of ``setup.growth`` (None when the run does not grow)."""
    plan = setup.growth
    if plan is None:
        return None
    maps = plan.maps
    stages, steps = [], []
    for i, (depth, iters) in enumerate(zip(plan.stage_depths, plan.budgets)):
        at = setup.at_depth(depth)
        stages.append(GrowthStage(i, depth, iters, stage_memory(at)))
        if i < len(maps):
            steps.append(growth_step(at, i, maps[i], plan.growth_iterations[i]))
    return stages, steps


def growth_peak(stages: List[GrowthStage], steps: List[GrowthStep]) -> Optional[int]:
    worst = [max(s.peak for s in g.stages) for g in stages] + [max(r.device_peak for r in s.ranks) for s in steps]
    return max(worst) if worst else None
