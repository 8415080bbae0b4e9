"""Where a growth step keeps the model-space state between tearing down and rebuilding.

Both transfers take the same two dicts: the old model's sharded state dict plus its
optimizer's ``fully_reshardable`` (model-space) sharded state dict on ``save``, and the new
model's *source view* plus the new optimizer's sharded state dict on ``load``; both return
what ``dist_checkpointing.load`` would.

* :class:`CheckpointTransfer` writes a torch_dist checkpoint to a scratch directory and
  loads it back with :class:`~.source_view.DedupLoadStrategy`: works for every layout,
  including layers that move to another pipeline stage.
* :class:`MemoryTransfer` keeps the shards in this process and serves the requests from
  them.  It is exact only when every shard a rank requests is one it held before -- true
  whenever no layer changes pipeline stage (always with PP=1; the distributed optimizer's
  model-space state is gathered over data-parallel ranks, so DP resharding is local) --
  and skips all serialization.  :func:`memory_transfer_possible` decides, collectively.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, merge, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, apply_factory_merges
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess, save_preprocess
from megatron.core.dist_checkpointing.utils import extract_sharded_base

from .. import platform
from .source_view import DedupLoadStrategy, SyncSaveStrategy, shard_identity


class MemoryTransfer:
    name = "memory"

    def __init__(self):
        self._index: Dict[Tuple, Any] = {}
        self._common: Dict[str, Any] = {}

    def save(self, state: Dict[str, Any]) -> None:
        sharded, common = save_preprocess(state, validate_access_integrity=False)
        for x in nested_values(sharded):
            data = x.data
            if torch.is_tensor(data):
                # keep no reference to device memory of the model being torn down
                data = data.detach().to("cpu", copy=True) if data.device.type != "cpu" else data.detach()
            self._index.setdefault(shard_identity(x), data)
        self._common = common

    def load(self, request: Dict[str, Any]) -> Dict[str, Any]:
        sharded, nonpersistent, factories = load_preprocess(request)
        sharded, _ = extract_sharded_base(sharded)
        missing = []

        def fetch(x):
            if not isinstance(x, ShardedBase):
                return x
            try:
                return self._index[shard_identity(x)]
            except KeyError:
                missing.append(x.key)
                return None

        loaded = dict_list_map_outplace(fetch, sharded)
        if missing:
            raise RuntimeError(f"in-memory growth transfer lacks {len(missing)} shards, e.g. {missing[:3]}")
        result = copy.deepcopy(self._common)
        merge(result, nonpersistent)
        merge(result, loaded)
        return apply_factory_merges(result, factories)

    def cleanup(self, collective: bool = True) -> None:
        self._index.clear()
        self._common = {}


class CheckpointTransfer:
    name = "checkpoint"

    def __init__(self, base_dir: str, tag: str = "grow"):
        path = [None]
        if dist.get_rank() == 0:
            os.makedirs(base_dir, exist_ok=True)
            path[0] = tempfile.mkdtemp(prefix=f"growloop_{tag}_", dir=base_dir)
        dist.broadcast_object_list(path, src=0)
        self.path = path[0]

    def save(self, state: Dict[str, Any]) -> None:
        dist_checkpointing.save(state, self.path, sharded_strategy=SyncSaveStrategy(), validate_access_integrity=False)

    def load(self, request: Dict[str, Any]) -> Dict[str, Any]:
        return dist_checkpointing.load(request, self.path, sharded_strategy=DedupLoadStrategy(),
                                       validate_access_integrity=False)

    def cleanup(self, collective: bool = True) -> None:
        if collective:
            dist.barrier()  # every rank has finished reading
        if dist.get_rank() == 0:
            shutil.rmtree(self.path, ignore_errors=True)


def old_layers_needed(src: Sequence[int], new_stage_sizes: Sequence[int], pp_rank: int) -> set:
    """Old layers that pipeline stage ``pp_rank`` reads after growth (pure)."""
    lo = sum(new_stage_sizes[:pp_rank])
    return {src[g] for g in range(lo, lo + new_stage_sizes[pp_rank])}


def memory_transfer_possible(src: Sequence[int], old_layers: Sequence[int], new_stage_sizes) -> bool:
    """True on every rank iff no rank needs an old layer it does not hold (collective).

    ``old_layers``: global indices of the decoder layers this rank holds now;
    ``new_stage_sizes``: layers per pipeline stage after growth (None when PP=1).
    """
    if new_stage_sizes is None:
        ok = True
    else:
        ok = old_layers_needed(src, new_stage_sizes, parallel_state.get_pipeline_model_parallel_rank()) <= set(old_layers)
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=platform.device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
