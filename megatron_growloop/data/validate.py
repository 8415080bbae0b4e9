"""Validation of Megatron indexed data sets (``.bin``/``.idx``) and of the train/valid/test
split, before megatron-core reads them.

megatron-core trusts its inputs: a truncated or garbled ``.idx`` raised ``ValueError`` /
``AssertionError`` / ``IndexError`` tracebacks, and a split that receives no tokens made
``GPTDataset._get_num_epochs`` loop forever (``while num_tokens < num_tokens_requested:
num_tokens += 0``; megatron/core/datasets/gpt_dataset.py).  Here every data set is checked
against the index format that megatron-core's ``_IndexWriter`` writes
(megatron/core/datasets/indexed_dataset.py)::

    9 bytes  magic b"MMIDIDX\\x00\\x00"   8 bytes  version (1)   1 byte  dtype code (DType)
    8 bytes  sequence count S           8 bytes  document-index count D (documents + 1)
    S x int32 sequence lengths          S x int64 byte pointers   D x int64 document indices

and the ``.bin`` must hold exactly ``sum(lengths) * itemsize`` bytes.  Every failure is one
:class:`~megatron_growloop.errors.UsageError` naming the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)

from ..errors import UsageError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
SPLIT_NAMES = ("train", "valid", "test")
# Token ids are checked in full up to this many bytes of .bin; beyond it, evenly spaced windows of
# this total size are checked (and every sample is checked when read, see CheckedDataset).
VOCAB_SCAN_BYTES = 256 << 20


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """What the ``.idx`` of a data set says, after validation."""

    prefix: str
    dtype: str
    sequences: int
    documents: int
    tokens: int


def validate_indexed_dataset(prefix: str, vocab_size: Optional[int] = None) -> IndexedDatasetInfo:
    """Check ``prefix.idx`` and ``prefix.bin`` (and, given ``vocab_size``, the token ids);
    raise one line naming the file and what is wrong."""
    info, _ = _read_and_check(prefix)
    if vocab_size is not None:
        check_token_ids(prefix, info, vocab_size)
    return info


def sequence_lengths(prefix: str) -> np.ndarray:
    """The validated per-sequence token counts of a data set."""
    return _read_and_check(prefix)[1]


def _read_and_check(prefix: str):
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for f in (idx, bin_):
        if not os.path.isfile(f):
            raise UsageError(f"data set {prefix!r}: {f} is missing (build it with tools/preprocess_data.py)")
    size = os.path.getsize(idx)
    if size < HEADER_BYTES:
        raise UsageError(f"{idx} is truncated: {size} bytes, the index header alone has {HEADER_BYTES}")
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:9] != INDEX_MAGIC:
        raise UsageError(f"{idx} is not a Megatron index file (its first bytes are {head[:9]!r}, expected {INDEX_MAGIC!r})")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != 1:
        raise UsageError(f"{idx}: index version {version} is not supported (expected 1)")
    code = head[17]
    if code not in DTYPE_CODES:
        raise UsageError(f"{idx}: unknown token dtype code {code} (allowed: {sorted(DTYPE_CODES)})")
    dtype = np.dtype(DTYPE_CODES[code])
    n_seq, n_doc_idx = struct.unpack("<QQ", head[18:34])
    expected = HEADER_BYTES + 12 * n_seq + 8 * n_doc_idx
    if size != expected and size != expected + n_seq:  # (+ S int8 sequence modes: multimodal)
        what = "truncated" if size < expected else "longer than its header says"
        raise UsageError(
            f"{idx} is {what}: {size} bytes, but its header ({n_seq} sequences, {n_doc_idx} document "
            f"indices) needs {expected}"
        )
    if n_seq == 0 or n_doc_idx < 2:
        raise UsageError(f"data set {prefix!r} holds no documents")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=HEADER_BYTES)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=HEADER_BYTES + 4 * n_seq)
    docs = np.frombuffer(mm, dtype=np.int64, count=n_doc_idx, offset=HEADER_BYTES + 12 * n_seq)
    if int(lengths.min()) < 0:
        raise UsageError(f"{idx} is corrupt: sequence {int(np.argmin(lengths))} has a negative length")
    ends = np.cumsum(lengths, dtype=np.int64) * dtype.itemsize
    bad = np.flatnonzero(pointers[1:] != ends[:-1])
    if pointers[0] != 0 or bad.size:
        i = 0 if pointers[0] != 0 else int(bad[0]) + 1
        raise UsageError(f"{idx} is corrupt: the byte pointer of sequence {i} does not follow from the lengths")
    if docs[0] != 0 or docs[-1] != n_seq or bool(np.any(np.diff(docs) < 0)):
        raise UsageError(f"{idx} is corrupt: its document indices are not 0 ... {n_seq} in increasing order")
    n_tokens = int(ends[-1] // dtype.itemsize)
    need = int(ends[-1])
    have = os.path.getsize(bin_)
    if have != need:
        what = "truncated" if have < need else "longer than its index says"
        raise UsageError(
            f"{bin_} is {what}: {have} bytes, but {idx} describes {n_tokens} tokens of {dtype.name} = {need} bytes"
        )
    info = IndexedDatasetInfo(prefix, dtype.name, int(n_seq), int(n_doc_idx - 1), n_tokens)
    return info, np.array(lengths)


def check_token_ids(prefix: str, info: IndexedDatasetInfo, vocab_size: int) -> None:
    """Token ids must be below the tokenizer's vocabulary (garbled ``.bin`` bytes are not)."""
    bin_ = prefix + ".bin"
    dtype = np.dtype(info.dtype)
    data = np.memmap(bin_, mode="r", dtype=dtype)
    n = data.shape[0]
    window = VOCAB_SCAN_BYTES // dtype.itemsize
    if n <= window:
        spans = [(0, n)]
    else:  # 64 evenly spaced windows covering VOCAB_SCAN_BYTES
        k = 64
        step = window // k
        spans = [(int(s), int(s) + step) for s in np.linspace(0, n - step, k)]
    for lo, hi in spans:
        chunk = data[lo:hi]
        if chunk.size == 0:
            continue
        bad = np.flatnonzero((chunk >= vocab_size) | (chunk < 0))
        if bad.size:
            pos = lo + int(bad[0])
            raise UsageError(
                f"{bin_} is corrupt: token {pos} has id {int(data[pos])}, outside the tokenizer's "
                f"vocabulary of {vocab_size}"
            )


class CheckedDataset:
    """A dataset whose samples are checked for token ids outside the vocabulary when read
    (a garbled region of a large ``.bin`` outside the scanned windows)."""

    def __init__(self, dataset, vocab_size: int, name: str):
        self.dataset, self.vocab_size, self.name = dataset, int(vocab_size), name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx):
        sample = self.dataset[idx]
        tokens = sample["tokens"]
        hi = int(tokens.max()) if len(tokens) else 0
        if hi >= self.vocab_size or (len(tokens) and int(tokens.min()) < 0):
            raise UsageError(
                f"{self.name} data sample {idx} holds token id {hi}, outside the tokenizer's vocabulary of "
                f"{self.vocab_size} (a garbled .bin file?)"
            )
        return sample

    def __getattr__(self, name):
        return getattr(self.dataset, name)


# ------------------------------------------------------------------------------------ splits
def split_matrix(split: str):
    """megatron-core's split book-ends for a ``--split`` string (validated first)."""
    parts = split.replace("/", ",").split(",")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise UsageError(f"--split {split!r}: expected comma-separated numbers like 969,30,1") from None
    if len(values) > 3 or any(not np.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise UsageError(f"--split {split!r}: expected up to 3 non-negative numbers (train,valid,test) with a "
                         "positive sum, like 969,30,1")
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(",".join(parts)))


def check_splits(prefixes: Sequence[str], split: str, sizes: Sequence[int], seq_length: int,
                 lengths: Sequence[np.ndarray]) -> List[Optional[tuple]]:
    """Check that every split that must deliver samples receives at least one sample's worth of
    tokens from every data set (megatron-core's GPTDataset needs ``seq_length + 1`` tokens per
    epoch; fewer made ``_get_num_epochs`` loop forever).  Returns the split matrix with the splits
    nobody asked samples of set to None (megatron-core does not build those)."""
    matrix = list(split_matrix(split))
    need = seq_length + 1
    for i, name in enumerate(SPLIT_NAMES):
        if not sizes[i]:
            matrix[i] = None
            continue
        if matrix[i] is None:
            continue
        lo, hi = matrix[i]
        for prefix, lens in zip(prefixes, lengths):
            n = len(lens)
            beg, end = int(round(lo * n)), int(round(hi * n))
            tokens = int(lens[beg:end].sum())
            if tokens < need:
                avg = max(float(lens.mean()), 1e-9)
                docs_needed = int(np.ceil(need / avg))
                share = 100.0 * (hi - lo)
                raise UsageError(
                    f"--split {split}: the {name} split ({share:.3g}%) of {prefix} gets {end - beg} of its "
                    f"{n} documents ({tokens} tokens), but a split needs at least --seq-length + 1 = {need} "
                    f"tokens (about {docs_needed} documents here); use more data or another --split"
                )
    return matrix
