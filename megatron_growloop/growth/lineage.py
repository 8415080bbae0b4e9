"""Reading a grown model's lineage: which blocks grew when, and which to loop later.

A checkpoint of a growing run records, for every layer, ``root`` (the layer of the
initial model it descends from) and ``born`` (0 for the initial layers, ``s`` for the
layers filled by the inserted copy of growth step ``s``).  The paper loops a middle
block of ``B`` layers of the grown model ("grow first, loop later"); this module lists
the ``B``-aligned blocks and ranks them by distance from the middle of the model.

:func:`tie_plan` reads the lineage the other way round: which layers are *copies* of one
block of the initial model, so that ``python -m megatron_growloop.convert grown-to-looped``
can tie them into the recurrent block of a ``Loop(e-L×k-d)``.

``python -m megatron_growloop.growth.lineage CHECKPOINT`` prints the table, the
``--retrofit-loop START:END:R`` candidates and the blocks that can be tied.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import ArgumentParser, UsageError, cli_errors
from ..looping.spec import LoopSpec
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


TIE_MODES = ("mean", "first", "source")


@dataclass(frozen=True)
class TiePlan:
    """Layers ``start..end-1`` of a grown model: ``copies`` consecutive copies of a block of
    ``block`` layers (the initial layers ``roots``).  ``born[j][i]``: the growth step that
    created copy ``i`` of block layer ``j`` (0 = an initial layer)."""

    start: int
    end: int
    block: int
    copies: int
    num_layers: int
    roots: Tuple[int, ...]
    born: Tuple[Tuple[int, ...], ...]

    def positions(self, j: int) -> List[int]:
        """Grown-model layers holding the copies of block layer ``j``."""
        return [self.start + i * self.block + j for i in range(self.copies)]

    def loop(self, repeats: Optional[int] = None) -> LoopSpec:
        """``Loop(start-block×k-coda)`` with k = ``repeats`` (default: the number of copies)."""
        return LoopSpec(self.start, self.block, int(repeats or self.copies), self.num_layers - self.end)

    def sources(self, mode: str) -> List[List[int]]:
        """Per unique layer of the looped model: the grown layers its weights come from
        (several: averaged, ``mean``; one: copied)."""
        if mode not in TIE_MODES:
            raise UsageError(f"unknown --tie {mode!r}; choose one of: {', '.join(TIE_MODES)}")
        out = [[u] for u in range(self.start)]
        for j in range(self.block):
            pos = self.positions(j)
            if mode == "mean":
                out.append(pos)
            elif mode == "first":
                out.append(pos[:1])
            else:  # the copy closest to the source: the oldest line (smallest birth step; first on ties)
                oldest = min(range(self.copies), key=lambda i: (self.born[j][i], i))
                out.append([pos[oldest]])
        out.extend([[u] for u in range(self.end, self.num_layers)])
        return out


def _period(roots: Sequence[int]) -> Optional[int]:
    """The smallest block length L < len(roots) such that ``roots`` is ``len/L`` copies of L
    consecutive initial layers; None if there is none."""
    n = len(roots)
    for L in range(1, n // 2 + 1):
        if n % L:
            continue
        first = list(roots[:L])
        if first != list(range(first[0], first[0] + L)):
            continue
        if all(roots[i] == first[i % L] for i in range(n)):
            return L
    return None


def tie_plan(lineage: Sequence[Dict[str, int]], start: int, end: int) -> TiePlan:
    """The copies in layers ``start..end-1`` (one-line :class:`UsageError` when they are not
    copies of one block of consecutive initial layers)."""
    n = len(lineage)
    if not 0 <= start < end <= n:
        raise UsageError(f"--block {start}:{end} lies outside the model: layers 0..{n - 1} exist")
    roots = [int(l["root"]) for l in lineage[start:end]]
    L = _period(roots)
    if L is None:
        found = ", ".join(f"{s}:{e}" for s, e, _ in tieable_blocks(lineage)) or "none"
        raise UsageError(
            f"--block {start}:{end}: layers {start}..{end - 1} are not copies of one block (their lineage roots are "
            f"{roots}; a tied block needs 2 or more consecutive copies of one block of initial layers); "
            f"blocks of copies in this checkpoint: {found}"
        )
    copies = (end - start) // L
    born = tuple(tuple(int(lineage[start + i * L + j]["born"]) for i in range(copies)) for j in range(L))
    return TiePlan(start, end, L, copies, n, tuple(roots[:L]), born)


def tieable_blocks(lineage: Sequence[Dict[str, int]]) -> List[Tuple[int, int, int]]:
    """``(start, end, block)`` of every maximal run of 2 or more copies of one block."""
    roots = [int(l["root"]) for l in lineage]
    n = len(roots)
    found: List[Tuple[int, int, int]] = []
    for s in range(n):
        for e in range(n, s + 1, -1):
            L = _period(roots[s:e])
            if L is not None:
                if not any(s >= a and e <= b for a, b, _ in found):
                    found.append((s, e, L))
                break
    return found


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
    tied = tieable_blocks(lineage)
    if tied:
        lines.append("copies to tie into a recurrent block (convert grown-to-looped): "
                     + ", ".join(f"--block {s}:{e} ({(e - s) // L} x {L} layers)" for s, e, L in tied))
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
