"""How a growth step carries the model-space state from the old model to the rebuilt one.

A transfer ``capture``\ s the state from the trainer before the old model is dropped and
``fill``\ s the new model stack through its *source view* (new layer ``g`` reads old layer
``src[g]``, :mod:`.source_view`).

* :class:`MemoryTransfer` (default): every rank keeps its own shards in host memory
  (:class:`~.shards.ShardStore`): the weights of its TP/PP shard and, with the distributed
  optimizer, its data-parallel shard of the fp32 params and Adam moments -- nothing is
  gathered (:func:`~megatron_growloop.training.optimizer_state.local_optimizer_state`).
  What a rank needs and does not hold -- layers that move to its pipeline stage, and the
  distributed optimizer's ranges that move between data-parallel ranks when the buffers
  are re-laid out at the new depth -- comes from the rank that holds it, point to point,
  one piece (at most one parameter's tensor) at a time.
* :class:`CheckpointTransfer` (``--grow-transfer checkpoint``): a torch_dist checkpoint in a
  scratch directory, read back with :class:`~.source_view.DedupLoadStrategy`.  It uses the
  ``fully_reshardable`` optimizer format, which gathers the distributed optimizer's state
  over data-parallel ranks; it is the fallback for debugging and inspection.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Any, Dict, List

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, merge, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensor, apply_factory_merges
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess, save_preprocess
from megatron.core.dist_checkpointing.utils import extract_sharded_base

from ..training.checkpointing import FULLY_RESHARDABLE
from ..training.optimizer_state import (
    ADAM_STATES,
    ensure_optimizer_state,
    load_local_optimizer_state,
    load_optimizer_state,
    local_optimizer_request,
)
from ..training.save_strategy import SyncSaveStrategy
from .shards import ShardStore, numel, object_id, piece_wants, stored_value, tensor_id
from .source_view import DedupLoadStrategy


class _ShardedPart:
    """A sharded state dict split by ``load_preprocess`` into what the store serves and the rest."""

    def __init__(self, request: Dict[str, Any]):
        sharded, self.nonpersistent, self.factories = load_preprocess(request)
        self.sharded, _ = extract_sharded_base(sharded)

    def entries(self) -> List[Any]:
        return [x for x in nested_values(self.sharded) if isinstance(x, ShardedBase)]

    def loaded(self, store: ShardStore, common: Dict[str, Any]) -> Dict[str, Any]:
        values = dict_list_map_outplace(
            lambda x: stored_value(store, x) if isinstance(x, ShardedBase) else x, self.sharded)
        result = copy.deepcopy(common)
        merge(result, self.nonpersistent)
        merge(result, values)
        return apply_factory_merges(result, self.factories)


class MemoryTransfer:
    name = "memory"

    def __init__(self):
        self.store = ShardStore()
        self._common: Dict[str, Any] = {}
        self._optimizer_common: List[Dict[str, Any]] = []

    def _put_sharded(self, state: Dict[str, Any]) -> Dict[str, Any]:
        sharded, common = save_preprocess(state, validate_access_integrity=False)
        for x in nested_values(sharded):
            if isinstance(x, ShardedTensor):
                self.store.put(tensor_id(x), 0, numel(x), x.data)
            elif isinstance(x, ShardedBase):
                self.store.put_object(object_id(x), x.data)
        return common

    def capture(self, trainer) -> None:
        state = trainer.model_space_state(local_optimizer=True)
        optimizer = state.pop("optimizer")
        state["optimizer_sharded"] = optimizer.sharded
        self._common = self._put_sharded(state)
        self._optimizer_common = optimizer.common
        for _, meta, start, stop, tensors in optimizer.shards:
            for name, tensor in tensors.items():
                self.store.put((name,) + tensor_id(meta), start, stop, tensor)

    def fill(self, stack, view: Dict[str, Any]) -> None:
        request = local_optimizer_request(stack.optimizer, view)
        part = _ShardedPart({"model": view, "optimizer_sharded": request.sharded})
        wants, objects = piece_wants(part.entries())
        wants += [((name,) + tensor_id(meta), start, stop)
                  for _, meta, start, stop, _ in request.shards for name in ADAM_STATES]
        self.store.exchange(wants, objects)  # collective: every rank calls it
        loaded = part.loaded(self.store, self._common)
        stack.model.load_state_dict(loaded["model"], strict=True)
        load_local_optimizer_state(
            stack.optimizer, request, self._optimizer_common,
            fetch=lambda meta, name, a, b: self.store.get((name,) + tensor_id(meta), a, b, transient=True),
            sharded=loaded.get("optimizer_sharded") or {},
        )

    @property
    def host_bytes(self) -> int:
        """Host memory the transfer holds at its peak (after filling): pieces held and received,
        plus the extra copies it handed out."""
        return self.store.held_bytes + self.store.fresh_bytes

    def stats(self) -> str:
        s = self.store
        held = f"holds {self.host_bytes / 2**20:.1f} MiB"
        if not s.exchanged_pieces:
            return f"{held}, no exchange"
        return (f"{held}, {s.exchanged_pieces} pieces received ({s.exchanged_bytes / 2**20:.1f} MiB), "
                f"largest buffer {s.max_buffer_bytes} B")

    def cleanup(self, collective: bool = True) -> None:
        self.store.clear()
        self._common = {}
        self._optimizer_common = []


class CheckpointTransfer:
    name = "checkpoint"

    def __init__(self, base_dir: str, tag: str = "grow"):
        path = [None]
        if dist.get_rank() == 0:
            os.makedirs(base_dir, exist_ok=True)
            path[0] = tempfile.mkdtemp(prefix=f"growloop_{tag}_", dir=base_dir)
        dist.broadcast_object_list(path, src=0)
        self.path = path[0]

    def capture(self, trainer) -> None:
        dist_checkpointing.save(trainer.model_space_state(), self.path,
                                sharded_strategy=SyncSaveStrategy(sync_files=False), validate_access_integrity=False)

    def fill(self, stack, view: Dict[str, Any]) -> None:
        ensure_optimizer_state(stack.optimizer)
        request = {"model": view,
                   "optimizer": stack.optimizer.sharded_state_dict(view, is_loading=True, metadata=FULLY_RESHARDABLE)}
        loaded = dist_checkpointing.load(request, self.path, sharded_strategy=DedupLoadStrategy(),
                                         validate_access_integrity=False)
        stack.model.load_state_dict(loaded["model"], strict=True)
        load_optimizer_state(stack.optimizer, loaded["optimizer"])

    def stats(self) -> str:
        return f"scratch {self.path}"

    def cleanup(self, collective: bool = True) -> None:
        if collective:
            dist.barrier()  # every rank has finished reading
        if dist.get_rank() == 0:
            shutil.rmtree(self.path, ignore_errors=True)
