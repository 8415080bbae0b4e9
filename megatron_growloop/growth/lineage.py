"""Reading a grown model's lineage: which blocks grew when, and which to loop later.

A checkpoint of a growing run records, for every layer, ``root`` (the layer of the
initial model it descends from) and ``born`` (0 for the initial layers, ``s`` for the
layers filled by the inserted copy of growth step ``s``).  The paper loops a middle
block of ``B`` layers of the grown model ("grow first, loop later"); this module lists
the ``B``-aligned blocks and ranks them by distance from the middle of the model.

``python -m megatron_growloop.growth.lineage CHECKPOINT`` prints the table and the
``--retrofit-loop START:END:R`` candidates.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Dict, List, Optional, Sequence

from ..errors import ArgumentParser, UsageError, cli_errors
from ..training.checkpointing import read_metadata
from .operators import initial_lineage


def block_table(lineage: Sequence[Dict[str, int]], block: int) -> List[Dict[str, object]]:
    """One row per ``block``-aligned block: layers, roots and birth steps of its layers."""
    n = len(lineage)
    if block < 1 or n % block:
        raise UsageError(f"block size {block} does not divide the model's {n} layers")
    rows = []
    for start in range(0, n, block):
        part = lineage[start: start + block]
        rows.append({
            "start": start,
            "end": start + block,
            "roots": [int(l["root"]) for l in part],
            "born": [int(l["born"]) for l in part],
        })
    return rows


def middle_blocks(num_layers: int, block: int) -> List[int]:
    """Start indices of ``block``-aligned blocks, closest to the model's middle first (lower first on ties)."""
    if block < 1 or num_layers % block:
        raise UsageError(f"block size {block} does not divide the model's {num_layers} layers")
    centre = num_layers / 2
    starts = list(range(0, num_layers, block))
    return sorted(starts, key=lambda s: (abs(s + block / 2 - centre), s))


def format_table(lineage: Sequence[Dict[str, int]], block: int, repeats: int = 2,
                 growth: Optional[dict] = None) -> str:
    rows = block_table(lineage, block)
    lines = []
    if growth:
        lines.append(f"grown with {growth.get('method')} B={growth.get('block_size')} from {growth.get('start_depth')} "
                     f"to {growth.get('final_depth')} layers; growth steps done: {growth.get('steps_done')}")
    lines.append("block  layers    roots (initial layer)  born (growth step; 0 = initial)")
    for i, r in enumerate(rows):
        lines.append(f"{i:>5}  {r['start']:>2}..{r['end'] - 1:<4}  {' '.join(map(str, r['roots'])):<21}  "
                     f"{' '.join(map(str, r['born']))}")
    cands = middle_blocks(len(lineage), block)[:2]
    lines.append("middle blocks to loop (retrofitted recurrence): "
                 + ", ".join(f"--retrofit-loop {s}:{s + block}:{repeats}" for s in cands))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    warnings.filterwarnings("ignore")

    with cli_errors("megatron_growloop.growth.lineage"):
        p = ArgumentParser(prog="megatron_growloop.growth.lineage",
                                    description="Print the lineage of a (grown) checkpoint's layers.")
        p.add_argument("checkpoint", help="save directory or iter_* directory")
        p.add_argument("--block-size", type=int, default=None, help="default: the growth block size, else 4")
        p.add_argument("--repeats", type=int, default=2, help="R of the suggested --retrofit-loop")
        a = p.parse_args(argv)
        if not os.path.exists(a.checkpoint):
            raise UsageError(f"checkpoint {a.checkpoint!r} does not exist")
        meta = read_metadata(a.checkpoint)
        # A model that never grew records no lineage: every layer is its own root.
        lineage = meta.get("lineage") or [l.to_dict() for l in initial_lineage(int(meta["arch"]["num_layers"]))]
        growth = meta.get("growth")
        block = a.block_size or (growth or {}).get("block_size") or 4
        print(format_table(lineage, block, a.repeats, growth))


if __name__ == "__main__":
    main(sys.argv[1:])
