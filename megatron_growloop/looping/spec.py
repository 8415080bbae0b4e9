"""Loop specifications and layer-application schedules (pure functions, no torch).

Notation of the paper (§3.1): ``Loop(L×k)`` has L unique layers unrolled k
times; ``Loop(e-L×k-d)`` has e unique prelude ("encoder") layers, an L-layer
recurrent block applied k times and d unique coda ("decoder") layers.

A *schedule* is the list of unique-layer indices (0-based, global) in the order
the model applies them.  An ordinary N-layer model has the schedule
``[0, 1, ..., N-1]``; ``Loop(1-2x3-1)`` has ``[0, 1,2, 1,2, 1,2, 3]``.
Positions in a schedule are the model's *effective depth* axis.

Inference-time repetition (``--repeat-block S:E:R``) rewrites a schedule: the
applications at positions S..E-1 run R times in total (R=1 leaves the model
unchanged).  Retrofitted recurrence (``--retrofit-loop S:E:R``) turns an ordinary
N-layer model into ``Loop(S-(E-S)xR-(N-E))`` for further training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, List, Optional, Sequence, Tuple

from ..errors import UsageError

_LOOP_RE = re.compile(r"^(?:(\d+)-)?(\d+)[x×](\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class LoopSpec:
    """``Loop(prelude-block×repeats-coda)``."""

    prelude: int
    block: int
    repeats: int
    coda: int

    def __post_init__(self):
        for name in ("prelude", "coda"):
            if getattr(self, name) < 0:
                raise UsageError(f"loop {name} must be >= 0, got {getattr(self, name)}")
        if self.block < 1:
            raise UsageError(f"loop block must have at least 1 layer, got {self.block}")
        if self.repeats < 1:
            raise UsageError(f"loop repeats must be >= 1, got {self.repeats}")

    @classmethod
    def parse(cls, text: str) -> "LoopSpec":
        """Parse ``LxK`` or ``e-LxK-d`` (``×`` accepted for ``x``; ``Loop(...)`` wrapper allowed)."""
        raw = str(text)
        s = raw.strip().replace(" ", "")
        if s.lower().startswith("loop(") and s.endswith(")"):
            s = s[5:-1]
        m = _LOOP_RE.match(s.lower())
        if not m or ((m.group(1) is None) != (m.group(4) is None)):
            raise UsageError(
                f"invalid loop spec {raw!r}: expected 'LxK' (e.g. 4x6) or 'e-LxK-d' (e.g. 4-4x4-4) "
                "with positive L and K"
            )
        e, L, k, d = (int(g) if g is not None else 0 for g in m.groups())
        if L < 1 or k < 1:
            raise UsageError(
                f"invalid loop spec {raw!r}: block size L and repeats K must be positive integers"
            )
        return cls(prelude=e, block=L, repeats=k, coda=d)

    @classmethod
    def from_block(cls, num_layers: int, block: "RepeatBlock") -> "LoopSpec":
        """The loop that applies layers ``block.start..block.end-1`` ``block.repeats`` times."""
        if block.end > num_layers:
            raise UsageError(
                f"block {block} lies outside the model: layers 0..{num_layers - 1} exist"
            )
        return cls(block.start, block.end - block.start, block.repeats, num_layers - block.end)

    @property
    def unique_layers(self) -> int:
        return self.prelude + self.block + self.coda

    @property
    def effective_depth(self) -> int:
        return self.prelude + self.block * self.repeats + self.coda

    @property
    def block_range(self) -> Tuple[int, int]:
        """Unique-layer indices ``[start, end)`` of the recurrent block."""
        return self.prelude, self.prelude + self.block

    def with_repeats(self, repeats: int) -> "LoopSpec":
        return LoopSpec(self.prelude, self.block, int(repeats), self.coda)

    def schedule(self) -> List[int]:
        e, L, k = self.prelude, self.block, self.repeats
        body = list(range(e, e + L)) * k
        return list(range(e)) + body + list(range(e + L, e + L + self.coda))

    def is_trivial(self) -> bool:
        return self.repeats == 1

    def no_grad_positions(self, backprop_depth: Optional[int]) -> Optional[Tuple[int, int]]:
        """Effective-depth positions ``[start, end)`` that run without autograd when gradients
        flow through only the last ``backprop_depth`` applications of the recurrent block
        (truncated backprop through the recurrence, Huginn-style); None when every
        application runs with autograd (no truncation, or ``repeats <= backprop_depth``)."""
        if backprop_depth is None or self.repeats <= backprop_depth:
            return None
        return self.prelude, self.prelude + (self.repeats - backprop_depth) * self.block

    def backward_depth(self, backprop_depth: Optional[int]) -> int:
        """Layer applications whose backward pass computes a (nonzero) gradient.

        With truncation the prelude lies before the cut: its gradient is zero (see
        :mod:`megatron_growloop.looping.truncation`), so it is not counted."""
        if self.no_grad_positions(backprop_depth) is None:
            return self.effective_depth
        return backprop_depth * self.block + self.coda

    def __str__(self) -> str:
        if self.prelude == 0 and self.coda == 0:
            return f"{self.block}x{self.repeats}"
        return f"{self.prelude}-{self.block}x{self.repeats}-{self.coda}"


@dataclass(frozen=True)
class RepeatBlock:
    """Positions ``start..end-1`` of a schedule applied ``repeats`` times in total."""

    start: int
    end: int
    repeats: int

    @classmethod
    def parse(cls, text: str, what: str = "repeat block") -> "RepeatBlock":
        raw = str(text)
        parts = raw.strip().split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            start, end, reps = (int(p) for p in parts)
        except ValueError:
            raise UsageError(
                f"invalid {what} {raw!r}: expected START:END:R with integers, e.g. 8:12:2"
            ) from None
        if start < 0 or end <= start:
            raise UsageError(f"invalid {what} {raw!r}: need 0 <= START < END")
        if reps < 1:
            raise UsageError(f"invalid {what} {raw!r}: R (total applications) must be >= 1")
        return cls(start, end, reps)

    def __str__(self) -> str:
        return f"{self.start}:{self.end}:{self.repeats}"


def apply_repeat_block(schedule: Sequence[int], block: RepeatBlock) -> List[int]:
    """Run schedule positions ``block.start..block.end-1`` ``block.repeats`` times."""
    n = len(schedule)
    if block.end > n:
        raise UsageError(
            f"repeat block {block} lies outside the model: its effective depth is {n} "
            f"(positions 0..{n - 1})"
        )
    seg = list(schedule[block.start : block.end])
    return list(schedule[: block.start]) + seg * block.repeats + list(schedule[block.end :])


def build_schedule(
    num_layers: int,
    loop: Optional[LoopSpec] = None,
    repeat_blocks: Iterable[RepeatBlock] = (),
) -> List[int]:
    """The application order of unique layers for a model of ``num_layers`` unique layers."""
    if num_layers < 0:
        raise UsageError(f"num_layers must be >= 0, got {num_layers}")
    if loop is not None:
        if loop.unique_layers != num_layers:
            raise UsageError(
                f"loop {loop} has {loop.unique_layers} unique layers but the model has "
                f"{num_layers} (set --num-layers {loop.unique_layers})"
            )
        schedule = loop.schedule()
    else:
        schedule = list(range(num_layers))
    for block in repeat_blocks:
        schedule = apply_repeat_block(schedule, block)
    return schedule


def parse_repeats_schedule(text: str) -> List[Tuple[int, int]]:
    """Parse ``--loop-repeats-schedule ITER:K[,ITER:K...]`` into sorted ``(iteration, k)`` pairs.

    ``ITER:K`` means: the training steps after ``ITER`` completed iterations run with k=K.
    """
    raw = str(text)
    out: List[Tuple[int, int]] = []
    for part in raw.replace(" ", "").split(","):
        try:
            it_s, k_s = part.split(":")
            it, k = int(it_s), int(k_s)
        except ValueError:
            raise UsageError(
                f"invalid --loop-repeats-schedule {raw!r}: expected ITER:K[,ITER:K...] with integers, "
                "e.g. 1000:2,2000:4"
            ) from None
        if it < 0 or k < 1:
            raise UsageError(f"invalid --loop-repeats-schedule {raw!r}: need ITER >= 0 and K >= 1 (got {part})")
        if out and it <= out[-1][0]:
            raise UsageError(f"invalid --loop-repeats-schedule {raw!r}: iterations must increase")
        out.append((it, k))
    return out


def repeats_at(schedule: Sequence[Tuple[int, int]], iteration: int, default: int) -> int:
    """k for the step that follows ``iteration`` completed iterations."""
    k = default
    for it, kk in schedule:
        if it <= iteration:
            k = kk
    return k


def check_stage_sizes(schedule: Sequence[int], sizes: Sequence[int], what: str = "the pipeline layout") -> None:
    """Raise if a stage boundary of ``sizes`` (unique layers per stage) cuts a looped or
    repeated block, i.e. the schedule would leave a stage and come back to it."""
    ok = valid_cuts(schedule, sum(sizes))
    cut = 0
    for i, n in enumerate(sizes[:-1]):
        cut += n
        if not ok[cut]:
            valid = [c for c in range(1, len(ok) - 1) if ok[c]]
            raise UsageError(
                f"{what} puts a pipeline stage boundary before layer {cut} (between stages {i} and "
                f"{i + 1}), inside a looped/repeated block; a recurrent block must lie within one "
                f"stage (boundaries allowed before layers: {', '.join(map(str, valid)) or 'none'})"
            )


def block_boundaries(num_layers: int, loop: Optional[LoopSpec], repeat_blocks=()) -> List[int]:
    """Effective-depth positions where a recurrent application starts (for plots)."""
    marks: List[int] = []
    if loop is not None and loop.repeats > 1:
        marks.extend(loop.prelude + i * loop.block for i in range(loop.repeats + 1))
    for b in repeat_blocks:
        width = b.end - b.start
        marks.extend(b.start + i * width for i in range(b.repeats + 1))
    return sorted(set(marks))


# ----------------------------------------------------------------------------------------
# Pipeline parallelism: which unique layers live on which stage.
# ----------------------------------------------------------------------------------------


def valid_cuts(schedule: Sequence[int], num_layers: int) -> List[bool]:
    """``ok[c]`` is True when a stage boundary before unique layer ``c`` keeps every
    stage's applications contiguous in the schedule (the pipeline only flows forward)."""
    ok = [True] * (num_layers + 1)
    # A cut at c is valid iff no application of a layer >= c precedes one of a layer < c.
    max_seen = -1
    bad_upto = [False] * (num_layers + 1)
    for idx in schedule:
        if idx < max_seen:
            # layers idx+1..max_seen were applied before layer idx: cuts in (idx, max_seen] invalid
            for c in range(idx + 1, max_seen + 1):
                bad_upto[c] = True
        max_seen = max(max_seen, idx)
    for c in range(1, num_layers):
        ok[c] = not bad_upto[c]
    return ok


def stage_local_schedule(schedule: Sequence[int], first: int, count: int) -> List[int]:
    """The part of ``schedule`` that runs on the stage owning unique layers
    ``first..first+count-1``, as local indices; raises if it is not contiguous."""
    positions = [p for p, idx in enumerate(schedule) if first <= idx < first + count]
    if positions and positions[-1] - positions[0] + 1 != len(positions):
        raise UsageError(
            f"the layer schedule leaves and re-enters the pipeline stage holding layers "
            f"{first}..{first + count - 1}; a looped or repeated block must lie within one "
            "pipeline stage (choose another --pipeline-model-parallel-layout or a smaller PP size)"
        )
    return [schedule[p] - first for p in positions]


def balanced_stage_sizes(schedule: Sequence[int], num_layers: int, pp: int) -> List[int]:
    """Unique layers per pipeline stage so that stages have balanced numbers of layer
    *applications*, never splitting a recurrent block across stages.

    Minimises the largest per-stage application count; ties prefer the most even
    split of unique layers, then earlier stages holding fewer layers (the first stage
    also holds the embedding, the last the LM head).
    """
    if pp < 1:
        raise UsageError(f"pipeline size must be >= 1, got {pp}")
    if pp == 1:
        return [num_layers]
    ok = valid_cuts(schedule, num_layers)
    apps = [0] * num_layers
    for idx in schedule:
        apps[idx] += 1
    prefix = [0]
    for a in apps:
        prefix.append(prefix[-1] + a)

    @lru_cache(maxsize=None)
    def best(start: int, stages: int):
        """(max_load, spread_key, sizes) for layers start..N-1 over ``stages`` stages."""
        if stages == 1:
            load = prefix[num_layers] - prefix[start]
            n = num_layers - start
            return (load, (n * n,), (n,))
        result = None
        for cut in range(start, num_layers + 1):
            if not ok[cut]:  # ok[0] and ok[num_layers] are always True
                continue
            load = prefix[cut] - prefix[start]
            rest = best(cut, stages - 1)
            n = cut - start
            cand = (max(load, rest[0]), (n * n + rest[1][0],), (n,) + rest[2])
            if result is None or cand[:2] < result[:2]:
                result = cand
        return result

    return list(best(0, pp)[2])


def layout_from_stage_sizes(sizes: Sequence[int]) -> List[List[str]]:
    """A megatron-core ``pipeline_model_parallel_layout`` (list form) for the sizes."""
    layout = []
    for i, n in enumerate(sizes):
        stage = ["decoder"] * n
        if i == 0:
            stage = ["embedding"] + stage
        if i == len(sizes) - 1:
            stage = stage + ["loss"]
        layout.append(stage)
    return layout


def layout_to_str(sizes: Sequence[int]) -> str:
    """The same layout in Megatron-LM's ``--pipeline-model-parallel-layout`` syntax."""
    parts = []
    for i, n in enumerate(sizes):
        s = ("E" if i == 0 else "") + ("t" * n) + ("L" if i == len(sizes) - 1 else "")
        parts.append(s)
    return "|".join(parts)
