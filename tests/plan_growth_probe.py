"""torchrun driver for the planner's growth test: runs ``pretrain`` with the given flags while
recording, on every rank and growth step, the largest buffer the growth transfer holds -- the
bytes of the distinct storages of every tensor in its index after ``save``, and after ``load``
together with the tensors it hands out (exchanged layers and the copies of duplicated layers).

    torchrun --nproc_per_node N tests/plan_growth_probe.py OUT_DIR PRETRAIN_FLAGS...

Writes ``OUT_DIR/transfer_rank<R>.json``: ``[{"transfer": name, "bytes": largest}, ...]`` per step.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def _storages(obj, acc):
    if torch.is_tensor(obj):
        acc[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, acc)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, acc)
    return acc


def instrument(module, record):
    for name in ("MemoryTransfer", "ExchangeTransfer"):
        base = getattr(module, name)

        class Recording(base):  # noqa: D401 - a test double
            def save(self, state):
                super().save(state)
                self._largest = sum(_storages(self._index, {}).values())

            def load(self, request):
                loaded = super().load(request)
                held = _storages(self._index, {})
                _storages(loaded, held)
                record.append({"transfer": self.name, "bytes": max(self._largest, sum(held.values()))})
                return loaded

        Recording.__name__ = name
        setattr(module, name, Recording)


def main(out_dir: str, argv):
    from megatron_growloop import pretrain
    from megatron_growloop.growth import controller as growth_module

    record = []
    instrument(growth_module, record)
    pretrain.main(argv)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"transfer_rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
