"""Measure the activation memory of a training step -- what the planner's activation figures are
checked against (tests, ``benchmarks/plan_accuracy.py``): the bytes of every tensor autograd saves
for the backward pass, recorded with ``torch.autograd.graph.saved_tensors_hooks``.

Each saved tensor is counted once per storage (views of one buffer share it; a tensor saved by
two ops is one buffer), parameters are excluded (they are weights, not activations), and a
storage stops counting when autograd drops the last reference to it (after its backward node
ran).  So ``forward`` is what the forward pass leaves alive for the backward pass and ``peak``
the largest amount alive at any time, recomputation during the backward pass included.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict

import torch

from ..training.trainer import loss_func


class SavedTensorMeter:
    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: Dict[int, list] = {}
        self.current = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        return _Held(self, t)

    @contextmanager
    def recording(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor):
            yield self


class _Held:
    __slots__ = ("meter", "tensor", "key")

    def __init__(self, meter: SavedTensorMeter, t: torch.Tensor):
        self.meter, self.tensor = meter, t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in meter.exclude or storage.nbytes() == 0:
            self.key = None
            return
        self.key = key
        entry = meter.live.get(key)
        if entry is None:
            meter.live[key] = [1, storage.nbytes()]
            meter.current += storage.nbytes()
            meter.peak = max(meter.peak, meter.current)
        else:
            entry[0] += 1

    def __del__(self):
        if self.key is None:
            return
        entry = self.meter.live[self.key]
        entry[0] -= 1
        if entry[0] == 0:
            self.meter.current -= entry[1]
            del self.meter.live[self.key]


def measure_training_step(model, tokens, position_ids, labels, loss_mask) -> Dict[str, int]:
    """One forward and backward pass of ``model`` (no pipeline) with the trainer's loss function."""
    meter = SavedTensorMeter(exclude=list(model.parameters()))
    with meter.recording():
        output = model(tokens, position_ids, None, labels=labels)
        loss, _, _ = loss_func(loss_mask, output)
        forward = meter.current
        loss.backward()
    return {"forward": forward, "peak": meter.peak, "after_backward": meter.current}
