"""torchrun driver for the planner's growth test: runs ``pretrain`` while recording, on every
rank and growth step, the host memory the in-memory growth transfer holds at its peak
(:attr:`~megatron_growloop.growth.transfer.MemoryTransfer.host_bytes`: the pieces it holds and
receives, plus the copies it hands out).

    torchrun --nproc_per_node N tests/plan_growth_probe.py OUT_DIR PRETRAIN_FLAGS...

Writes ``OUT_DIR/transfer_rank<R>.json``: ``[{"transfer": name, "bytes": host_bytes}, ...]`` per step.
"""

from __future__ import annotations

import json
import os
import sys


def main(out_dir: str, argv):
    from megatron_growloop import pretrain
    from megatron_growloop.growth import transfer

    record = []
    fill = transfer.MemoryTransfer.fill

    def recording_fill(self, stack, view):
        fill(self, stack, view)
        record.append({"transfer": self.name, "bytes": self.host_bytes})

    transfer.MemoryTransfer.fill = recording_fill
    pretrain.main(argv)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"transfer_rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
