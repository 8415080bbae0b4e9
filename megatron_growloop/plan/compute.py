"""FLOPs per step (the project's accounting) and an estimated step time.

FLOPs are :mod:`megatron_growloop.accounting`'s model FLOPs: ``3 x`` the forward pass per
trained token at the model's *effective* depth (every application of a looped block), so
growth stages and loops are counted as they run; recomputation is not model FLOPs.  With
randomized recurrence a step's FLOPs are those of the k it runs and the figures per step are
expectations over the law of k (``looping.recurrence.repeats_pmf``); with truncated backprop only
the applications that back-propagate a gradient count their backward (the trainer's accounting,
``accounting.ArchShape.training_flops_per_token``).

The step time is an estimate for ranking layouts, not a measurement.  ``--assume-mfu`` is the
fraction of peak a GPU reaches on model FLOPs when nothing else gets in the way; on top of that
the estimate charges what a layout adds (Megatron-LM's usual accounting, Narayanan et al. 2021):

* the 1F1B pipeline bubble and imbalance: a step takes ``(M + PP - 1)`` times the slowest
  stage's micro-batch time (first stage: embedding; last stage: LM head);
* recomputation: a full one repeats the layers' forward pass (+1/3 of their work), a selective
  one the core attention's;
* tensor-parallel collectives, not overlapped: four all-reduce equivalents of the residual
  stream per layer application (two forward, two backward) at the NVLink bandwidth within a
  node, the inter-node bandwidth beyond;
* pipeline sends of the stage boundary activations (forward and backward);
* data-parallel gradient reduction (and the distributed optimizer's parameter all-gather),
  unless ``--overlap-grad-reduce`` (``--overlap-param-gather``) hides it behind the backward pass;
* truncated backprop: an application without autograd costs its forward pass only (and half the
  tensor-parallel collectives); the prelude's backward over zeros is charged (it runs).

Randomized recurrence: the expected step time over the law of k (every micro-batch of a step
runs the same k, so a step is a pipeline at that k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..growth.flops import planned_training_flops
from .inputs import Cluster, RunSetup
from .kernels import DTYPE_BYTES
from .memory import StageMemory


def flops_per_step(setup: RunSetup) -> float:
    """Model FLOPs of one step (the expectation over k with randomized recurrence)."""
    arch = setup.arch
    tokens = setup.global_batch * arch.seq_length
    if setup.recurrence is not None and setup.step is None:
        return sum(p * flops_per_step(step) for p, step in setup.step_law())
    loop = setup.step_loop
    if loop is None:
        return float(tokens) * arch.shape.training_flops_per_token(arch.effective_depth, arch.seq_length)
    n = setup.step[1] if setup.step is not None else None
    return float(tokens) * arch.shape.training_flops_per_token(loop.effective_depth, arch.seq_length,
                                                               loop.backward_depth(n))


def peak_flops_per_gpu(setup: RunSetup, cluster: Cluster) -> float:
    return cluster.peak_tflops * 1e12 * (2 if setup.impl.fp8_format else 1)


@dataclass(frozen=True)
class StepTime:
    seconds: float
    ideal_seconds: float
    """The same FLOPs at the assumed MFU on every GPU, with nothing else charged."""
    bottleneck_stage: int
    stage_seconds: List[float]
    tp_comm_seconds: float
    dp_comm_seconds: float


def _collective_bw(cluster: Cluster, group: int, stride: int) -> float:
    """Bandwidth (bytes/s) of a collective over ``group`` ranks placed ``stride`` ranks apart
    (megatron's rank order puts TP fastest, then DP, then PP)."""
    inside = group * stride <= cluster.gpus_per_node
    return (cluster.intra_node_gbs if inside else cluster.inter_node_gbs) * 1e9


def step_time(setup: RunSetup, cluster: Cluster, stages: List[StageMemory]) -> StepTime:
    """The estimated step time (expected over k with randomized recurrence)."""
    if setup.recurrence is None or setup.step is not None:
        return _step_time(setup, cluster, stages)
    law = [(p, _step_time(step, cluster, stages)) for p, step in setup.step_law()]
    stage_seconds = [sum(p * t.stage_seconds[i] for p, t in law) for i in range(setup.layout.pp)]
    return StepTime(
        seconds=sum(p * t.seconds for p, t in law),
        ideal_seconds=sum(p * t.ideal_seconds for p, t in law),
        bottleneck_stage=max(range(setup.layout.pp), key=lambda i: stage_seconds[i]),
        stage_seconds=stage_seconds,
        tp_comm_seconds=sum(p * t.tp_comm_seconds for p, t in law),
        dp_comm_seconds=sum(p * t.dp_comm_seconds for p, t in law),
    )


def _step_time(setup: RunSetup, cluster: Cluster, stages: List[StageMemory]) -> StepTime:
    arch = setup.arch
    tp, pp, dp = setup.layout.tp, setup.layout.pp, setup.dp
    s, b = arch.seq_length, setup.micro_batch_size
    tokens = s * b
    shape = arch.shape
    rate = peak_flops_per_gpu(setup, cluster) * cluster.assume_mfu
    layer_fwd = shape.layer_forward_flops_per_token(s)
    head_fwd = shape.head_forward_flops_per_token()
    rc = setup.impl.recompute_granularity
    extra_fwd = layer_fwd if rc == "full" else (4 * s * shape.attn_dim if rc == "selective" else 0)
    e = DTYPE_BYTES[setup.impl.dtype]
    boundary = e * tokens * arch.hidden_size
    tp_bw = _collective_bw(cluster, tp, 1)
    tp_per_app = 4 * 2 * (tp - 1) / tp * boundary / tp_bw if tp > 1 else 0.0
    pp_send = 2 * boundary / (tp if setup.sequence_parallel else 1) / _collective_bw(cluster, 2, tp * dp) if pp > 1 else 0.0
    times, tp_total = [], 0.0
    apps, grad_apps = setup.stage_applications(), setup.stage_grad_applications()
    for st in stages:
        a, g = apps[st.pp_rank], grad_apps[st.pp_rank]
        flops = tokens * ((a - g) * layer_fwd + g * (3 * layer_fwd + extra_fwd)
                          + (3 * head_fwd if st.pp_rank == pp - 1 else 0))
        t_tp = (g + (a - g) / 2) * tp_per_app
        tp_total = max(tp_total, t_tp)
        times.append(flops / tp / rate + t_tp + pp_send)
    m = setup.num_microbatches
    slowest = max(range(pp), key=lambda i: times[i])
    pipeline = (m + pp - 1) * times[slowest]
    dp_comm = 0.0
    if dp > 1:
        bw = _collective_bw(cluster, dp, tp)
        grads = max(st.buffer_numel for st in stages)
        if setup.distributed_optimizer:
            rs = (dp - 1) / dp * 4 * grads / bw
            ag = (dp - 1) / dp * e * grads / bw
            dp_comm = (0.0 if setup.overlap_grad_reduce else rs) + (0.0 if setup.overlap_param_gather else ag)
        else:
            dp_comm = 0.0 if setup.overlap_grad_reduce else 2 * (dp - 1) / dp * 4 * grads / bw
    ideal = flops_per_step(setup) / (setup.gpus * rate)
    return StepTime(pipeline + dp_comm, ideal, slowest, times, tp_total * (m + pp - 1), dp_comm)


def training_flops(setup: RunSetup, train_iters: Optional[int]) -> Optional[float]:
    """Model FLOPs of the whole run (growth-aware), when ``--train-iters`` is known."""
    if not train_iters:
        return None
    arch, plan = setup.arch, setup.growth
    tokens = setup.global_batch * arch.seq_length
    if plan is None and setup.recurrence is not None:  # the curricula change the law of k during their warm-ups
        total = 0.0
        for iters, mean, depth in setup.recurrence.phases(train_iters):
            law = setup.recurrence.pmf(mean)
            total += iters * sum(p * flops_per_step(setup.at_step(k, depth)) for k, p in law.items())
        return total
    if plan is None:
        return float(train_iters) * flops_per_step(setup)
    return planned_training_flops(plan, arch.shape, arch.seq_length, tokens, max(train_iters, plan.grow_iters))["grown"]
