"""Pieces of model-space tensors held by this rank, exchanged point to point.

A growth step carries every tensor of the model and its optimizer from the old model
to the rebuilt one.  :class:`ShardStore` keeps this rank's *pieces*: a contiguous range
``[start, stop)`` of one flattened TP-local tensor, named by a :func:`tensor_id` (its
checkpoint key, global offset and shapes -- the identity megatron's ``dist_checkpointing``
uses).  A rank asks for ``(tensor_id, start, stop)``; what it does not hold is fetched
from the lowest rank that holds it, piece by piece, with ``send``/``recv`` of tensors.

Nothing is gathered: a rank holds its own shards (the distributed optimizer's DP shard of
the fp32 params and moments, the weights of its TP/PP shard), and the largest buffer in
flight is one piece -- at most one parameter's tensor -- which :attr:`ShardStore.max_buffer_bytes`
records.  The exchange is deadlock-free: every rank walks the same global list of
transfers in the same order, so the earliest pending transfer always has both ends ready.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from .. import platform

TensorId = Tuple
Want = Tuple[TensorId, int, int]


def tensor_id(x) -> TensorId:
    """What names a TP-local tensor across models: key, global offset and shapes.

    A source view (new layer ``g`` reading old layer ``src[g]``) produces the ids of the old
    model's tensors, which is what makes the transfer a lookup."""
    if isinstance(x, ShardedTensor):
        return ("t", x.key, tuple(x.global_offset), tuple(x.global_shape), tuple(x.local_shape))
    if isinstance(x, ShardedTensorFactory):
        built = x.build()
        subs = built.values() if isinstance(built, dict) else built if isinstance(built, (list, tuple)) else [built]
        return ("f", x.key) + tuple(tensor_id(s) for s in subs)
    raise TypeError(f"no tensor id for {type(x).__name__}")


def object_id(x: ShardedObject) -> Tuple:
    return ("o", x.key, tuple(x.global_offset), tuple(x.global_shape))


def numel(x: ShardedTensor) -> int:
    return int(math.prod(x.local_shape))


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


class ShardStore:
    """This rank's pieces (on the CPU) and objects; see the module docstring."""

    def __init__(self):
        self.pieces: Dict[TensorId, List[Tuple[int, int, torch.Tensor]]] = {}
        self.objects: Dict[Tuple, Any] = {}
        self._handed_out: set = set()
        self.max_buffer_bytes = 0
        self.exchanged_bytes = 0
        self.exchanged_pieces = 0
        self.held_bytes = 0
        """Bytes of the pieces this rank holds (its own and those received)."""
        self.fresh_bytes = 0
        """Bytes of the tensors handed out as new tensors (a second copy of one old layer, or a
        range assembled from several pieces), transient ones not counted."""

    # ------------------------------------------------------------------ holding
    def put(self, tid: TensorId, start: int, stop: int, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        if flat.numel() != stop - start:
            raise ValueError(f"piece [{start}, {stop}) of {tid[1]} has {flat.numel()} elements")
        # an own copy on the host: no reference to the old model's (device) memory, and exactly the
        # piece's bytes (a view would keep a whole DDP buffer alive)
        flat = flat.to("cpu", copy=True)
        self.pieces.setdefault(tid, []).append((start, stop, flat))
        self.held_bytes += flat.numel() * flat.element_size()

    def put_object(self, oid: Tuple, value: Any) -> None:
        self.objects.setdefault(oid, value)

    def _gaps(self, tid: TensorId, a: int, b: int) -> List[Tuple[int, int]]:
        """Sub-ranges of ``[a, b)`` no local piece covers."""
        gaps, p = [], a
        for s, e, _ in sorted(self.pieces.get(tid, []), key=lambda x: x[0]):
            if e <= p or s >= b:
                continue
            if s > p:
                gaps.append((p, s))
            p = max(p, e)
            if p >= b:
                break
        if p < b:
            gaps.append((p, b))
        return gaps

    def get(self, tid: TensorId, a: int, b: int, transient: bool = False) -> torch.Tensor:
        """The flat tensor ``[a, b)`` of ``tid``; each call returns a tensor the caller owns
        (several new layers may copy one old layer; each copy needs its own moments).
        ``transient``: the caller drops it right away (not counted in :attr:`fresh_bytes`)."""
        found = sorted(self.pieces.get(tid, []), key=lambda x: x[0])
        for s, e, t in found:
            if (s, e) == (a, b):
                key = (tid, a, b)
                if key not in self._handed_out:
                    self._handed_out.add(key)
                    return t
                out = t.clone()
                break
        else:
            if self._gaps(tid, a, b) or not found:
                raise RuntimeError(f"growth transfer lacks [{a}, {b}) of {tid[1]}")
            out = torch.empty(b - a, dtype=found[0][2].dtype)
            for s, e, t in found:
                lo, hi = max(a, s), min(b, e)
                if lo < hi:
                    out[lo - a:hi - a] = t[lo - s:hi - s]
        if not transient:
            self.fresh_bytes += out.numel() * out.element_size()
        return out

    def get_object(self, oid: Tuple) -> Any:
        return self.objects[oid]

    def clear(self) -> None:
        self.pieces.clear()
        self.objects.clear()
        self._handed_out.clear()

    # ------------------------------------------------------------------ exchange
    def exchange(self, wants: Iterable[Want], want_objects: Iterable[Tuple] = ()) -> None:
        """Fetch what this rank wants but does not hold (collective over all ranks)."""
        world, me = dist.get_world_size(), dist.get_rank()
        missing = sorted({(tid, lo, hi) for tid, a, b in wants for lo, hi in self._gaps(tid, a, b)}, key=repr)
        missing_objects = sorted({o for o in want_objects if o not in self.objects}, key=repr)
        needs: List[Any] = [None] * world
        dist.all_gather_object(needs, (missing, missing_objects))
        if not any(n[0] or n[1] for n in needs):
            return
        offers, offered_objects = self._offers(needs, me)
        all_offers: List[Any] = [None] * world
        dist.all_gather_object(all_offers, (offers, offered_objects))
        transfers = _plan(needs, all_offers)
        for d, (_, objs) in enumerate(needs):
            if d == me:
                for oid in objs:
                    holder = next((r for r in range(world) if oid in all_offers[r][1]), None)
                    if holder is None:
                        raise RuntimeError(f"growth exchange: no rank holds {oid[1]}")
                    self.objects[oid] = all_offers[holder][1][oid]
        device = platform.device()
        for src, dst, tid, p, q, dtype in transfers:
            if me == src:
                s, e, t = next(x for x in self.pieces[tid] if x[0] <= p and q <= x[1])
                buf = t[p - s:q - s].to(device).contiguous()
                dist.send(buf, dst)
            elif me == dst:
                buf = torch.empty(q - p, dtype=_dtype(dtype), device=device)
                dist.recv(buf, src)
                self.put(tid, p, q, buf)
                self.exchanged_bytes += buf.numel() * buf.element_size()
                self.exchanged_pieces += 1
            else:
                continue
            self.max_buffer_bytes = max(self.max_buffer_bytes, buf.numel() * buf.element_size())

    def _offers(self, needs: Sequence[Any], me: int) -> Tuple[List[Tuple], Dict[Tuple, Any]]:
        """The local pieces (whole extents) and objects some other rank needs."""
        offers, seen, objects = [], set(), {}
        for r, (missing, objs) in enumerate(needs):
            if r == me:
                continue
            for tid, a, b in missing:
                for s, e, t in self.pieces.get(tid, []):
                    if max(a, s) < min(b, e) and (tid, s, e) not in seen:
                        seen.add((tid, s, e))
                        offers.append((tid, s, e, str(t.dtype)))
            for oid in objs:
                if oid in self.objects:
                    objects[oid] = self.objects[oid]
        return offers, objects


def _plan(needs: Sequence[Any], all_offers: Sequence[Any]) -> List[Tuple]:
    """``(src, dst, tid, start, stop, dtype)`` for every piece to move, in one global order:
    each needed range is covered left to right by the lowest rank holding each part."""
    by_tid: Dict[TensorId, List[Tuple[int, int, int, str]]] = {}
    for r, (offers, _) in enumerate(all_offers):
        for tid, s, e, dt in offers:
            by_tid.setdefault(tid, []).append((r, s, e, dt))
    transfers = []
    for d, (missing, _) in enumerate(needs):
        for tid, a, b in missing:
            p = a
            while p < b:
                cands = [c for c in by_tid.get(tid, ()) if c[0] != d and c[1] <= p < c[2]]
                if not cands:
                    raise RuntimeError(f"growth exchange: no rank holds [{p}, {b}) of {tid[1]}")
                r, _, e, dt = min(cands)
                q = min(b, e)
                transfers.append((r, d, tid, p, q, dt))
                p = q
    return transfers


def piece_wants(sharded: Iterable[Any]) -> Tuple[List[Want], List[Tuple]]:
    """The ``(tensor_id, 0, numel)`` and object ids a list of sharded entries asks for."""
    wants, objects = [], []
    for x in sharded:
        if isinstance(x, ShardedTensor):
            wants.append((tensor_id(x), 0, numel(x)))
        elif isinstance(x, ShardedObject):
            objects.append(object_id(x))
    return wants, objects


def stored_value(store: ShardStore, x) -> Optional[Any]:
    """The loaded value of a sharded entry (tensor in its local shape, or object)."""
    if isinstance(x, ShardedTensor):
        return store.get(tensor_id(x), 0, numel(x)).view(x.local_shape)
    if isinstance(x, ShardedObject):
        return store.get_object(object_id(x))
    return x
