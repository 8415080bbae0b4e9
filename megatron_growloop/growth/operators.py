"""Growth operators as pure index maps (paper App. A; Saunshi et al. 2024; Kapl et al. 2025).

A growth step takes a model of depth ``L`` (a multiple of the block size ``B``)
to depth ``L + B``.  It is described by a *source map* ``src`` of length
``L + B``: new layer ``i`` is initialised from old layer ``src[i]`` (weights and
AdamW moments).  Embeddings, final norm and LM head are unchanged.

* ``midas`` duplicates the middle *block*.  With ``n = L / B`` blocks the
  duplicated block is block ``ceil(n / 2) - 1`` (0-based), i.e. for an even
  number of blocks the *lower* of the two middle blocks:
  ``src = [0 .. (j+1)B-1] ++ [jB .. (j+1)B-1] ++ [(j+1)B .. L-1]`` with ``j = ceil(n/2) - 1``.
* ``lidas`` duplicates the ``B`` layers centred on the exact layer-wise middle
  ``c = L / 2``: ``src = [0 .. c-1] ++ [c-B/2 .. c+B/2-1] ++ [c .. L-1]``
  (4 -> 8 gives ``0 1 0 1 2 3 2 3``); ``B`` must be even.
* ``stack`` (gradual stacking, Reddi et al. 2023) copies the top block:
  ``src = [0 .. L-1] ++ [L-B .. L-1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from ..errors import UsageError

GROW_METHODS = ("midas", "lidas", "stack")


def _check(depth: int, block: int) -> None:
    if block < 1:
        raise UsageError(f"growth block size must be >= 1, got {block}")
    if depth < block or depth % block:
        raise UsageError(f"depth {depth} is not a positive multiple of the growth block size {block}")


def midas(depth: int, block: int) -> List[int]:
    _check(depth, block)
    n = depth // block
    j = math.ceil(n / 2) - 1
    return list(range((j + 1) * block)) + list(range(j * block, (j + 1) * block)) + list(
        range((j + 1) * block, depth)
    )


def lidas(depth: int, block: int) -> List[int]:
    _check(depth, block)
    if block % 2:
        raise UsageError(f"LIDAS needs an even growth block size, got {block}")
    c = depth // 2
    h = block // 2
    return list(range(c)) + list(range(c - h, c + h)) + list(range(c, depth))


def stack(depth: int, block: int) -> List[int]:
    _check(depth, block)
    return list(range(depth)) + list(range(depth - block, depth))


OPERATORS: Dict[str, Callable[[int, int], List[int]]] = {"midas": midas, "lidas": lidas, "stack": stack}


def get_operator(name: str) -> Callable[[int, int], List[int]]:
    try:
        return OPERATORS[name]
    except KeyError:
        raise UsageError(f"unknown --grow-method {name!r}; choose one of: {', '.join(GROW_METHODS)}") from None


def growth_maps(method: str, start_depth: int, final_depth: int, block: int) -> List[List[int]]:
    """The source maps of every growth step from ``start_depth`` to ``final_depth``."""
    op = get_operator(method)
    if block < 1 or start_depth < block or start_depth % block:
        raise UsageError(
            f"--num-layers {start_depth} is not a positive multiple of --grow-block-size {block} "
            "(growth inserts whole blocks)"
        )
    if final_depth <= start_depth or (final_depth - start_depth) % block:
        raise UsageError(
            f"--grow-final-layers {final_depth} is not reachable from --num-layers {start_depth} "
            f"in steps of --grow-block-size {block}"
        )
    maps, depth = [], start_depth
    while depth < final_depth:
        maps.append(op(depth, block))
        depth += block
    return maps


def compose(maps: Sequence[Sequence[int]]) -> List[int]:
    """Final-layer -> initial-layer map of several growth steps."""
    if not maps:
        return []
    root = list(maps[0])
    for m in maps[1:]:
        root = [root[i] for i in m]
    return root


@dataclass(frozen=True)
class Lineage:
    """Where a layer comes from: the initial layer it descends from and the stage that created it.

    ``born`` is 0 for layers of the initial model; a layer at a position filled by the
    inserted block of growth step s (1-based) has ``born = s``.
    """

    root: int
    born: int

    def to_dict(self) -> dict:
        return {"root": self.root, "born": self.born}


def inserted_positions(method: str, depth: int, block: int) -> Tuple[int, int]:
    """``[start, end)`` of the positions of the new model filled by the inserted copy."""
    if method == "midas":
        n = depth // block
        j = math.ceil(n / 2) - 1
        return (j + 1) * block, (j + 2) * block
    if method == "lidas":
        c = depth // 2
        return c, c + block
    if method == "stack":
        return depth, depth + block
    raise UsageError(f"unknown --grow-method {method!r}")


def grow_lineage(lineage: Sequence[Lineage], method: str, block: int, step: int) -> List[Lineage]:
    """Lineage after growth step ``step`` (1-based) applied to a model with ``lineage``."""
    depth = len(lineage)
    src = get_operator(method)(depth, block)
    lo, hi = inserted_positions(method, depth, block)
    out = []
    for i, s in enumerate(src):
        parent = lineage[s]
        out.append(Lineage(parent.root, step if lo <= i < hi else parent.born))
    return out


def initial_lineage(depth: int) -> List[Lineage]:
    return [Lineage(i, 0) for i in range(depth)]
