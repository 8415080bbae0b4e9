"""Memory of every (TP rank, pipeline stage) of a training run: weights, gradients, optimizer
states, activations and the peak.

* **weights**: the parameters in the params dtype; with the distributed optimizer megatron's DDP
  moves them into one padded contiguous buffer (``param_and_grad_buffer.py``);
* **grads**: DDP's contiguous main-grad buffer, fp32 (the trainer sets ``grad_reduce_in_fp32``);
* **optimizer**: Adam's two fp32 moments plus, in 16-bit training, the fp32 main parameters;
  megatron's distributed optimizer shards them over the data-parallel ranks
  (``optimizer/distrib_optimizer.py``; an fp32 run's main parameters are views of the weights);
* **activations**: the saved tensors of :mod:`.activations` for every micro-batch in flight:
  the 1F1B schedule (``pipeline_parallel/schedules.py``) runs ``min(PP - stage, M)`` forward
  passes before stage ``stage`` starts its first backward pass; each in-flight micro-batch also
  keeps the input it received (its stage output is freed once sent: ``deallocate_pipeline_outputs``
  is on, as in Megatron-LM), and the micro-batch being back-propagated peaks as
  :func:`.activations.stage_peak_bytes` says;
  with randomized recurrence the step with the largest k (``--loop-repeats-max``), and with
  truncated backprop only the applications that run with autograd keep activations (the early
  recurrences run under ``torch.no_grad()``, ``looping/truncation.py``);
* **peak**: all of it plus the largest transient: in 16-bit training the last stage's logits
  exist in both 16 and 32 bits during the loss (megatron's cross entropy works on an fp32 copy).

Not counted: the CUDA context, NCCL and allocator workspaces, fragmentation, and kernel
workspaces (a few GB on a GPU; lower ``--gpu-memory-gb`` to keep a margin).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from . import activations as act
from .inputs import RunSetup
from .kernels import DTYPE_BYTES, Kernels
from .params import count, grad_buffer_numel, stage_tensors


@dataclass(frozen=True)
class StageMemory:
    """One pipeline stage; every TP (and DP) rank of the stage holds the same."""

    pp_rank: int
    layers: int
    applications: int
    params: int
    in_flight: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    pipeline_buffers: int
    """Of ``activations``: the stage outputs (and received inputs) the schedule keeps per micro-batch."""
    buffer_numel: int
    buffer_numel_unpadded: int

    @property
    def static(self) -> int:
        """Weights, gradients and optimizer states: what lives between steps."""
        return self.weights + self.grads + self.optimizer

    @property
    def peak(self) -> int:
        return self.static + self.activations + self.transient


def ddp_bucket_size(setup: RunSetup):
    """megatron-core DDP's bucket size (``distributed_data_parallel.py``): one bucket per buffer
    unless gradient reduction overlaps the backward pass."""
    return max(40_000_000, 1_000_000 * setup.dp) if setup.overlap_grad_reduce else None


def kernels_of(setup: RunSetup) -> Kernels:
    return Kernels.of(setup.impl, device=setup.device)


def stage_memory(setup: RunSetup) -> List[StageMemory]:
    setup = setup.worst_step()
    arch, tp, pp = setup.arch, setup.layout.tp, setup.layout.pp
    sizes = setup.stage_sizes()
    apps = setup.stage_applications()
    grad_apps = setup.stage_grad_applications()
    k = kernels_of(setup)
    e_param = DTYPE_BYTES[setup.impl.dtype]
    half = setup.impl.dtype != "fp32"
    mb = act.MicroBatch(arch.seq_length, setup.micro_batch_size, tp, setup.sequence_parallel)
    rc = act.Recompute.of(setup.impl)
    m = setup.num_microbatches
    te = setup.impl.transformer_impl == "transformer_engine"
    out = []
    for rank in range(pp):
        tensors = stage_tensors(arch, tp, pp, rank, sizes, te_names=te)
        params = count(tensors)
        numel, unpadded = grad_buffer_numel(tensors, setup.dp, setup.distributed_optimizer, ddp_bucket_size(setup))
        first, last = rank == 0, rank == pp - 1
        weights = (numel if setup.distributed_optimizer else params) * e_param
        grads = numel * 4
        per_param_opt = 12 if half else 8
        optimizer = (per_param_opt * numel) // setup.dp if setup.distributed_optimizer else per_param_opt * params
        in_flight = min(pp - rank, m)
        stored = act.stage_stored_bytes(arch, k, mb, grad_apps[rank], first, last, rc)
        peak_one = act.stage_peak_bytes(arch, k, mb, grad_apps[rank], first, last, rc)
        boundary = k.act_bytes * arch.hidden_size * mb.tokens_sp
        pipeline = 0  # the stage's output tensor is freed once sent (deallocate_pipeline_outputs)
        if not first and not act._norm_keeps_its_input(k):
            pipeline += boundary  # the received input (the first norm saves a copy instead)
        once = act.rope_table_bytes(arch, mb, grad_apps[rank], rc)  # shared by the micro-batches in flight
        activations = (in_flight - 1) * (stored - once) + peak_one + in_flight * pipeline
        transient = k.act_bytes * mb.tokens * (arch.padded_vocab_size // tp) if (last and half) else 0
        out.append(StageMemory(rank, sizes[rank], apps[rank], params, in_flight, weights, grads, optimizer,
                               activations, transient, in_flight * pipeline, numel, unpadded))
    return out
