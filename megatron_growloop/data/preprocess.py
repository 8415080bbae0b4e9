"""JSONL/text -> Megatron indexed dataset (``.bin``/``.idx``) with ``IndexedDatasetBuilder``.

Output files follow Megatron-LM's ``tools/preprocess_data.py`` naming:
``{output_prefix}_{json_key}_document.bin/.idx``; the returned prefix (without
extension) is what ``--data-path`` takes.  Both files are written under
temporary names and renamed only when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from ..errors import UsageError


def iter_documents(paths: Sequence[str], json_key: str = "text") -> Iterator[str]:
    """Documents from ``.jsonl``/``.json`` (one JSON object per line, text under
    ``json_key``) or ``.txt`` files (one document per non-empty line)."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UsageError(f"input file {p!r} does not exist")
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UsageError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
                    if json_key not in obj:
                        raise UsageError(f"{p}:{lineno}: no key {json_key!r} (use --json-keys)")
                    yield str(obj[json_key])
        elif path.suffix in (".txt", ".text", ""):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
        else:
            raise UsageError(f"input file {p!r}: expected .jsonl, .json or .txt")


def preprocess(
    documents: Iterable[str],
    output_prefix: str,
    tokenizer,
    json_key: str = "text",
    append_eod: bool = True,
) -> str:
    """Tokenize ``documents`` into an indexed dataset; return the dataset prefix."""

    prefix = f"{output_prefix}_{json_key}_document"
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    n_docs = 0
    try:
        for text in documents:
            ids: List[int] = tokenizer.tokenize(text)
            if append_eod:
                ids.append(tokenizer.eod)
            if not ids:
                continue
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            n_docs += 1
        if n_docs == 0:
            raise UsageError("no documents to preprocess (the inputs are empty)")
        builder.finalize(tmp + ".idx")
    except BaseException:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
        raise
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    return prefix


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def count_tokens(prefix: str) -> int:
    ds = IndexedDataset(prefix)
    return int(np.sum(ds.sequence_lengths))
