"""torchrun driver for the planner's per-rank parameter test: every rank of a gloo TP x PP run
builds its part of a model with megatron-core on the meta device (no memory) and rank 0 writes
``{"tp_rank,pp_rank": [[name, shape], ...]}`` to the JSON file given as the last argument.

    torchrun --nproc_per_node 4 tests/plan_meta_ranks.py TP PP ARCH_JSON OUT_JSON

(``tests`` must be on ``PYTHONPATH`` for ``plan_models``.)
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def main(tp: int, pp: int, arch_json: str, out: str) -> None:
    from megatron.core import parallel_state

    from megatron_growloop.model.arch import Arch
    from megatron_growloop.training.initialize import init_distributed, teardown
    from plan_models import build

    init_distributed(tp, pp)
    arch = Arch.from_meta(json.loads(arch_json))
    model, _ = build(arch, tp, pp, meta=True)
    mine = [[n, list(p.shape), p.device.type] for n, p in model.named_parameters()]
    key = f"{parallel_state.get_tensor_model_parallel_rank()},{parallel_state.get_pipeline_model_parallel_rank()}"
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (key, mine))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(dict(gathered), f)
    teardown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
