"""Seeded generators of the paper's task families (App. D), as raw instances.

These are shared by the embedded default corpus (plain text to pretrain on) and
by the reasoning-primitive evaluation (which adds prompt templates, in-context
examples and answer choices on top).  Every function takes a
``random.Random`` so results are reproducible.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import List, Sequence, Tuple


@lru_cache(maxsize=1)
def english_words() -> Tuple[str, ...]:
    """The shipped list of 3000 common English words (see ``words_en.txt``)."""
    text = resources.files("megatron_growloop.data").joinpath("words_en.txt").read_text("utf-8")
    return tuple(w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#"))


def random_letter_word(rng: random.Random, length: int = 3) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def random_letter_words(rng: random.Random, n: int, length: int = 3) -> List[str]:
    """``n`` distinct random lowercase words of ``length`` letters."""
    out: List[str] = []
    seen = set()
    while len(out) < n:
        w = random_letter_word(rng, length)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


@dataclass(frozen=True)
class CopyInstance:
    """A word sequence, a repeated contiguous segment, and the next word (the answer)."""

    sequence: Tuple[str, ...]
    segment_start: int
    segment_length: int

    @property
    def segment(self) -> Tuple[str, ...]:
        return self.sequence[self.segment_start : self.segment_start + self.segment_length]

    @property
    def answer(self) -> str:
        return self.sequence[self.segment_start + self.segment_length]


def copy_instance(
    rng: random.Random, vocabulary: Sequence[str] | None, seq_len: int = 10, seg_len: int = 5
) -> CopyInstance:
    """Copying task: ``vocabulary=None`` draws random three-letter words."""
    if vocabulary is None:
        words = random_letter_words(rng, seq_len)
    else:
        words = rng.sample(list(vocabulary), seq_len)
    start = rng.randrange(0, seq_len - seg_len)  # the answer must exist after the segment
    return CopyInstance(tuple(words), start, seg_len)


@dataclass(frozen=True)
class AssignmentInstance:
    """Variable assignment (App. D): ``lines`` of ``name=value``, a query and its answer.

    ``depth`` hops are needed: level 0 binds 5 variables to numbers, each further
    level assigns a fresh variable from one of the previous level's variables.
    """

    lines: Tuple[Tuple[str, str], ...]
    query: str
    answer: str
    depth: int
    values: Tuple[str, ...]  # the numeric values of the 5 chains (answer choices)


def assignment_instance(
    rng: random.Random, depth: int, n_chains: int = 5, max_value: int = 30
) -> AssignmentInstance:
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    names = rng.sample(string.ascii_lowercase, n_chains * (depth + 1))
    values = [str(v) for v in rng.sample(range(0, max_value), n_chains)]
    levels = [names[i * n_chains : (i + 1) * n_chains] for i in range(depth + 1)]
    lines: List[Tuple[str, str]] = list(zip(levels[0], values))
    # chain[j] = current variable name of chain j (starts at level-0 variable)
    value_of = dict(zip(levels[0], values))
    prev = list(levels[0])
    for lvl in range(1, depth + 1):
        order = list(range(n_chains))
        rng.shuffle(order)
        cur = list(levels[lvl])
        for j, src_idx in enumerate(order):
            lines.append((cur[j], prev[src_idx]))
            value_of[cur[j]] = value_of[prev[src_idx]]
        prev = cur
    query = rng.choice(prev)
    return AssignmentInstance(tuple(lines), query, value_of[query], depth, tuple(values))


def arithmetic_line(rng: random.Random, max_operand: int = 50) -> str:
    a, b = rng.randrange(max_operand), rng.randrange(max_operand)
    op = rng.choice("+-")
    return f"{a}{op}{b}={a + b if op == '+' else a - b}"
