"""Growth: memory at every stage of the growth plan and during each growth step.

A growth step (:mod:`megatron_growloop.growth.controller`) keeps the model and optimizer state
of the current depth in a *transfer* (:mod:`megatron_growloop.growth.transfer`), releases the
old model, builds the deeper one (re-balanced over the pipeline stages) and fills it from the
transfer.  Per rank:

* **source**: the old stage's weights, gradients and optimizer states (device);
* **target**: the new stage's (device); the source is released before the target is built, so
  the device holds one of them at a time;
* **save transient** (device): none for the in-memory transfer (it copies tensor by tensor);
  for ``--grow-transfer checkpoint`` megatron gathers the distributed optimizer's model-space
  state over the data-parallel ranks bucket by bucket on the device
  (``DistributedOptimizer.get_parameter_state_dp_zero``): ``4 x (bucket + bucket/DP)`` bytes,
  one bucket being the whole buffer unless ``--overlap-grad-reduce``;
* **transfer buffer** (host memory on a GPU machine; what
  :attr:`~megatron_growloop.growth.transfer.MemoryTransfer.host_bytes` reports): the rank's own
  shards -- the old stage's weights and its optimizer state: with the distributed optimizer only
  this DP rank's range of every parameter (fp32 main param and both Adam moments, 12 bytes per
  element, nothing gathered), without it the model-space state of the stage (12 bytes per
  element in bf16, the two moments in fp32); plus what it receives (layers that move to this
  stage; with the distributed optimizer, the ranges of the new buffer layout this DP rank did
  not own); plus a copy for every further new layer of the stage that reads an old layer already
  handed out (LIDAS/MIDAS duplicate layers).  The largest of the stage's DP ranks is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from .inputs import RunSetup
from .kernels import DTYPE_BYTES
from .memory import StageMemory, ddp_bucket_size, stage_memory
from .params import buffer_layout, stage_tensors

LAYER_PREFIX = "decoder.layers."


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
    """Model-space optimizer state per parameter element (without the distributed optimizer)."""
    if setup.impl.dtype != "fp32":
        return 12  # fp32 main param + exp_avg + exp_avg_sq
    return 8  # fp32: the main params are the weights


def _global_names(tensors, first_layer: int) -> List[str]:
    """Stage-local tensor names with global layer indices (``decoder.layers.<g>.``)."""
    out = []
    for t in tensors:
        if t.name.startswith(LAYER_PREFIX):
            local, rest = t.name[len(LAYER_PREFIX):].split(".", 1)
            out.append(f"{LAYER_PREFIX}{first_layer + int(local)}.{rest}")
        else:
            out.append(t.name)
    return out


def _source(name: str, src: List[int]) -> str:
    if not name.startswith(LAYER_PREFIX):
        return name
    g, rest = name[len(LAYER_PREFIX):].split(".", 1)
    return f"{LAYER_PREFIX}{src[int(g)]}.{rest}"


def _gaps(lo: int, hi: int, held) -> List[Tuple[int, int]]:
    if held is None or held[1] <= lo or held[0] >= hi:
        return [(lo, hi)]
    return [(a, b) for a, b in ((lo, held[0]), (held[1], hi)) if a < b]


def _memory_transfer_bytes(old: RunSetup, new: RunSetup, src: List[int], r: int) -> int:
    """:attr:`MemoryTransfer.host_bytes` of pipeline stage ``r`` (its largest DP rank)."""
    e = DTYPE_BYTES[old.impl.dtype]
    tp, pp, te = old.layout.tp, old.layout.pp, old.impl.transformer_impl == "transformer_engine"
    old_sizes, new_sizes = old.stage_sizes(), new.stage_sizes()
    old_t = stage_tensors(old.arch, tp, pp, r, old_sizes, te_names=te)
    new_t = stage_tensors(new.arch, tp, pp, r, new_sizes, te_names=te)
    old_names = _global_names(old_t, sum(old_sizes[:r]))
    new_names = _global_names(new_t, sum(new_sizes[:r]))
    numel = {n: t.numel for n, t in zip(old_names, old_t)}
    numel.update({_source(n, src): t.numel for n, t in zip(new_names, new_t)})
    sources = [_source(n, src) for n in new_names]
    held = set(old_names)
    received = sum(numel[s] for s in set(sources) - held)
    copies = sum(numel[s] for s in sources) - sum(numel[s] for s in set(sources))
    state = e if old.distributed_optimizer else e + _optimizer_bytes_per_element(old)
    base = state * (sum(numel[n] for n in old_names) + received + copies)
    if not old.distributed_optimizer:
        return base
    bucket = ddp_bucket_size(old)
    old_layout = buffer_layout(old_t, old.dp, True, bucket)
    new_layout = buffer_layout(new_t, new.dp, True, bucket)
    to_global_old = dict(zip((t.name for t in old_t), old_names))
    to_global_new = dict(zip((t.name for t in new_t), new_names))
    worst = 0
    for d in range(old.dp):
        owned = {to_global_old[k]: v for k, v in old_layout.dp_ranges(old.dp, d).items()}
        wanted = {to_global_new[k]: v for k, v in new_layout.dp_ranges(new.dp, d).items()}
        missing = {(_source(n, src), a, b) for n, (lo, hi) in wanted.items()
                   for a, b in _gaps(lo, hi, owned.get(_source(n, src)))}
        elements = sum(hi - lo for lo, hi in owned.values()) + sum(b - a for _, a, b in missing)
        worst = max(worst, base + 12 * elements)
    return worst


def growth_step(setup: RunSetup, index: int, src: List[int], before_iteration: int) -> GrowthStep:
    """Step ``index`` (0-based) from ``setup``'s depth to ``len(src)`` layers."""
    old, new = setup, setup.at_depth(len(src))
    old_mem, new_mem = stage_memory(old), stage_memory(new)
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
        transient = 0
        if setup.grow_transfer == "checkpoint" and setup.distributed_optimizer and setup.device == "cuda":
            bucket = om.buffer_numel
            if setup.overlap_grad_reduce:
                bucket = min(bucket, max(40_000_000, 1_000_000 * setup.dp))
            transient = 4 * (bucket + bucket // setup.dp)
        transfer = _memory_transfer_bytes(old, new, src, r) if setup.grow_transfer == "memory" else 0
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
