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
* :class:`ExchangeTransfer` is the memory transfer plus one collective exchange: every rank
  names the shards it lacks (the layers that move to its pipeline stage), the lowest rank
  holding each sends it, and each rank receives only what it asked for.  Exact whenever
  every requested shard was held, unchanged, by some rank (growth never changes TP/DP
  sharding, only which stage holds a layer), without touching a file system.
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
from ..training.save_strategy import SyncSaveStrategy
from .source_view import DedupLoadStrategy, shard_identity


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
        handed_out = set()

        def fetch(x):
            if not isinstance(x, ShardedBase):
                return x
            ident = shard_identity(x)
            try:
                value = self._index[ident]
            except KeyError:
                missing.append(x.key)
                return None
            if ident in handed_out:
                # several new layers copy one old layer: each must get its own tensors, or
                # an optimizer that keeps loaded state tensors as they are (torch Adam) would
                # update one shared moment tensor once per copy
                return value.clone() if torch.is_tensor(value) else copy.deepcopy(value)
            handed_out.add(ident)
            return value

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


def _compact(x):
    return x.detach().clone() if torch.is_tensor(x) else x


class ExchangeTransfer(MemoryTransfer):
    name = "exchange"

    def load(self, request: Dict[str, Any]) -> Dict[str, Any]:
        sharded, _, _ = load_preprocess(request)
        sharded, _ = extract_sharded_base(sharded)
        missing = sorted({shard_identity(x) for x in nested_values(sharded)} - set(self._index), key=repr)
        world, rank = dist.get_world_size(), dist.get_rank()
        wanted: list = [None] * world
        dist.all_gather_object(wanted, missing)
        union = sorted({i for w in wanted for i in w}, key=repr)
        held: list = [None] * world
        dist.all_gather_object(held, [i for i in union if i in self._index])
        supplier: Dict[Tuple, int] = {}
        for r in range(world):
            for ident in held[r]:
                supplier.setdefault(ident, r)
        lost = [i for i in union if i not in supplier]
        if lost:
            raise RuntimeError(f"growth exchange: no rank holds {len(lost)} requested shards, e.g. {lost[:2]}")
        for src in range(world):  # one scatter per sender; a rank receives only its own shards
            payload = None
            if rank == src:
                # clone: a shard may be a view into a larger buffer, and pickling a view sends its storage
                payload = [{i: _compact(self._index[i]) for i in wanted[r] if supplier[i] == src}
                           for r in range(world)]
            got: list = [None]
            dist.scatter_object_list(got, payload, src=src)
            self._index.update(got[0])
        return super().load(request)


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
        dist_checkpointing.save(state, self.path, sharded_strategy=SyncSaveStrategy(sync_files=False), validate_access_integrity=False)

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
