"""torchrun driver for the planner's parallel activation test: every rank of a gloo TP x PP run
builds its part of a model and runs one training step through megatron-core's pipeline schedule
(1F1B, ``M`` micro-batches) while ``megatron_growloop.plan.measure`` records the bytes of the
tensors autograd saves; rank 0 writes ``{"tp_rank,pp_rank": peak_bytes}``.

    torchrun --nproc_per_node N tests/plan_activation_ranks.py TP PP SP M MICRO ARCH_JSON RECOMPUTE_JSON OUT
"""

from __future__ import annotations

import json
import sys
from functools import partial

import torch
import torch.distributed as dist


def main(tp, pp, sp, m, micro, arch_json, recompute_json, out):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_growloop.model.arch import Arch
    from megatron_growloop.plan.measure import SavedTensorMeter
    from megatron_growloop.training.initialize import init_distributed, teardown
    from megatron_growloop.training.trainer import loss_func
    from plan_models import build

    init_distributed(tp, pp)
    arch = Arch.from_meta(json.loads(arch_json))
    model, config = build(arch, tp, pp, sequence_parallel=sp, **json.loads(recompute_json))
    model.train()
    s = arch.seq_length
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 257, (micro, s), generator=g) for _ in range(m)]
    data = iter([{"tokens": t, "labels": t, "loss_mask": torch.ones(micro, s),
                  "position_ids": torch.arange(s).expand(micro, s)} for t in batches])

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        return model(b["tokens"], b["position_ids"], None, labels=b["labels"]), partial(loss_func, b["loss_mask"])

    meter = SavedTensorMeter(exclude=list(model.parameters()))
    with meter.recording():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=[model],
                                    num_microbatches=m, seq_length=s, micro_batch_size=micro,
                                    decoder_seq_length=s, forward_only=False)
    key = f"{parallel_state.get_tensor_model_parallel_rank()},{parallel_state.get_pipeline_model_parallel_rank()}"
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (key, meter.peak))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(dict(gathered), f)
    teardown()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), a[2] == "1", int(a[3]), int(a[4]), a[5], a[6], a[7])
