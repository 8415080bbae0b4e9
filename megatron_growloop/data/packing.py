"""Packing fine-tuning examples into fixed-length training sequences, with the masks
that keep them apart.

Two layouts (``--sft-packing``):

* ``pack`` -- several whole examples per sequence (best-fit decreasing), padding only at
  the end.  Each example keeps exactly the positions it would have alone: its inputs are
  ``tokens[:-1]`` and its targets ``tokens[1:]``, so nothing is predicted across an
  example boundary.  The sample carries ``segment_ids`` (example ``j`` of the row is
  ``j + 1``, the padding tail ``0``) and the trainer turns them into a block-diagonal
  causal attention mask (:func:`block_causal_mask`): a token attends only to earlier
  tokens of its own example.
* ``pad`` -- one example per sequence, right-padded.  Causal attention alone keeps the
  padding out of every real position, so no explicit mask is needed.

``position_ids`` restart at 0 for every example (as Megatron-LM's ``SFTDataset``).
megatron-core computes rotary embeddings from sequence offsets, not from
``position_ids``; rotary attention depends only on the distance between two tokens and the
mask confines attention to one example, so a packed example computes what it computes
alone (``tests/test_sft_loss.py`` checks packed against unpacked losses).

The mask is the boolean ``[b, 1, s, s]`` tensor (``True`` = masked out) that megatron-core's
local ``DotProductAttention`` applies in place of its causal mask, and that an SDPA-based
core attention can pass on (inverted) as ``attn_mask``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..errors import UsageError
from .sft import TokenizedExample

PACKING_MODES = ("pack", "pad")


def pack_rows(lengths: Sequence[int], seq_length: int, mode: str = "pack") -> List[List[int]]:
    """Example indices per training sequence.  ``pack``: best-fit decreasing (each example
    goes into the fullest sequence it still fits, longest examples first; ties keep the
    given order); ``pad``: one example per sequence, in the given order."""
    if mode not in PACKING_MODES:
        raise UsageError(f"--sft-packing {mode!r}: choose one of {', '.join(PACKING_MODES)}")
    for i, n in enumerate(lengths):
        if not 0 < n <= seq_length:
            raise UsageError(f"example {i} needs {n} positions; sequences hold {seq_length}")
    if mode == "pad":
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: List[List[int]] = []
    free: List[tuple] = []  # sorted (room left, row index)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            room -= n
        else:
            r = len(rows)
            rows.append([i])
            room = seq_length - n
        if room > 0:
            bisect.insort(free, (room, r))
    for row in rows:
        row.sort()  # examples in their original order within a sequence
    return rows


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, 1, s, s]`` boolean attention mask, ``True`` = masked out: query ``q`` may see key
    ``k`` only if ``k <= q`` and both belong to the same segment."""
    s = segment_ids.shape[-1]
    future = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).triu_(1)
    other = segment_ids[:, None, :, None] != segment_ids[:, None, None, :]
    return other | future


@dataclass(frozen=True)
class PackingStats:
    examples: int
    sequences: int
    seq_length: int
    positions_used: int
    loss_tokens: int

    @property
    def fill(self) -> float:
        """Fraction of sequence positions holding example tokens (the rest is padding)."""
        return self.positions_used / max(1, self.sequences * self.seq_length)

    def to_dict(self) -> Dict[str, float]:
        return {"examples": self.examples, "sequences": self.sequences, "seq_length": self.seq_length,
                "positions_used": self.positions_used, "loss_tokens": self.loss_tokens,
                "fill": round(self.fill, 4)}


class PackedSFTDataset:
    """Training sequences of packed (or padded) examples, reshuffled every epoch.

    Index ``i`` is sequence ``perm_e[i % n]`` of epoch ``e = i // n`` (``perm_e`` a seeded
    permutation), so the micro-batch iterator -- a pure function of consumed samples --
    resumes exactly.  ``length`` is how many samples the run will read (at least one epoch).
    """

    def __init__(self, examples: Sequence[TokenizedExample], seq_length: int, mode: str = "pack",
                 seed: int = 1234, length: int = 0, pad_id: int = 0):
        if not examples:
            raise UsageError("no fine-tuning examples")
        self.mode = mode
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.rows = pack_rows([e.length for e in examples], self.seq_length, mode)
        n, s = len(self.rows), self.seq_length
        self.tokens = np.full((n, s), pad_id, dtype=np.int64)
        self.labels = np.zeros((n, s), dtype=np.int64)
        self.loss_mask = np.zeros((n, s), dtype=np.float32)
        self.position_ids = np.zeros((n, s), dtype=np.int64)
        self.segment_ids = np.zeros((n, s), dtype=np.int64)
        used = 0
        for r, row in enumerate(self.rows):
            at = 0
            for j, i in enumerate(row):
                ex = examples[i]
                seq = ex.tokens
                m = ex.length
                self.tokens[r, at:at + m] = seq[:-1]
                self.labels[r, at:at + m] = seq[1:]
                self.loss_mask[r, at + len(ex.prompt) - 1:at + m] = 1.0  # targets = answer + EOD
                self.position_ids[r, at:at + m] = np.arange(m)
                self.segment_ids[r, at:at + m] = j + 1
                at += m
            self.position_ids[r, at:] = np.arange(s - at)
            used += at
        self.stats = PackingStats(len(examples), n, s, used, int(self.loss_mask.sum()))
        self.length = max(int(length), n)

    @property
    def num_sequences(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        return self.length

    def _row(self, idx: int) -> int:
        n = len(self.rows)
        epoch, j = divmod(int(idx), n)
        perm = np.random.default_rng((self.seed, epoch)).permutation(n)
        return int(perm[j])

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        return self.sequence(self._row(idx))

    def sequence(self, r: int) -> Dict[str, torch.Tensor]:
        """Packed sequence ``r`` (holding the examples ``rows[r]``), in the sample layout."""
        out = {
            "tokens": torch.from_numpy(self.tokens[r]),
            "labels": torch.from_numpy(self.labels[r]),
            "loss_mask": torch.from_numpy(self.loss_mask[r]),
            "position_ids": torch.from_numpy(self.position_ids[r]),
        }
        if self.mode == "pack":
            out["segment_ids"] = torch.from_numpy(self.segment_ids[r])
        return out
