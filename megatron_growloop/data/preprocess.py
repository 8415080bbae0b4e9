"""JSONL/text -> Megatron indexed dataset (``.bin``/``.idx``) with ``IndexedDatasetBuilder``.

Output files follow Megatron-LM's ``tools/preprocess_data.py`` naming:
``{output_prefix}_{json_key}_document.bin/.idx``; the returned prefix (without
extension) is what ``--data-path`` takes.  Both files are written under
temporary names and renamed only when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from ..errors import UsageError
from ..paths import pid_alive


@dataclass
class TextStats:
    """Texts read and skipped by :func:`iter_documents` (reported by the preprocessing CLI)."""

    documents: int = 0
    null: int = 0
    empty: int = 0

    def skipped_text(self, key: str) -> str:
        return f"skipped {self.null} null and {self.empty} empty texts under {key!r}"


def _lines(path: Path, encoding: str) -> Iterator[Tuple[int, str]]:
    """``(line number, decoded line)``; a line that does not decode is one error naming
    file, line and byte offset (not a ``UnicodeDecodeError`` traceback)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise UsageError(
                    f"{path}:{lineno}: not valid {encoding} (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                    "pass --encoding with the file's encoding (e.g. latin-1)"
                ) from None


def iter_documents(paths: Sequence[str], json_key: str = "text", encoding: str = "utf-8",
                   stats: Optional[TextStats] = None, empty: str = "skip") -> Iterator[str]:
    """Documents from ``.jsonl``/``.json`` (one JSON object per line, text under
    ``json_key``) or ``.txt`` files (one document per non-empty line).

    A null or empty (whitespace-only) text is counted in ``stats`` and skipped, or refused
    with ``empty="error"`` -- never tokenized as the string ``"None"``.  A text that is not a
    string is refused."""
    if empty not in ("skip", "error"):
        raise UsageError(f"empty-text policy {empty!r}: choose skip or error")
    try:
        "".encode(encoding)
    except LookupError:
        raise UsageError(f"--encoding {encoding!r} is not a known text encoding") from None
    stats = stats if stats is not None else TextStats()
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UsageError(f"input file {p!r} does not exist")
        if path.suffix in (".jsonl", ".json"):
            for lineno, line in _lines(path, encoding):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise UsageError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                if json_key not in obj:
                    raise UsageError(f"{p}:{lineno}: no key {json_key!r} (use --json-keys)")
                text = obj[json_key]
                if text is None or (isinstance(text, str) and not text.strip()):
                    kind = "null" if text is None else "empty"
                    if empty == "error":
                        raise UsageError(f"{p}:{lineno}: {json_key!r} is {kind} (drop --empty-texts error to skip it)")
                    setattr(stats, kind, getattr(stats, kind) + 1)
                    continue
                if not isinstance(text, str):
                    raise UsageError(f"{p}:{lineno}: {json_key!r} is a JSON {type(text).__name__}, expected a string")
                stats.documents += 1
                yield text
        elif path.suffix in (".txt", ".text", ""):
            for _, line in _lines(path, encoding):
                if line.strip():
                    stats.documents += 1
                    yield line.rstrip("\r\n")
        else:
            raise UsageError(f"input file {p!r}: expected .jsonl, .json or .txt")


@dataclass(frozen=True)
class PendingOutput:
    """A data set written under temporary names, not yet renamed into place."""

    tmp: str
    prefix: str

    def commit(self) -> str:
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".idx", self.prefix + ".idx")
        return self.prefix

    def discard(self) -> None:
        for ext in (".bin", ".idx"):
            try:
                os.remove(self.tmp + ext)
            except OSError:
                pass


def remove_stale_temporaries(prefix: str) -> List[str]:
    """Delete ``PREFIX.tmp<pid>.bin/.idx`` left by a killed preprocessing run (its pid is gone)."""
    removed = []
    folder = Path(prefix).parent
    if not folder.is_dir():
        return removed
    stem = Path(prefix).name + ".tmp"
    for f in folder.iterdir():
        if not f.name.startswith(stem) or f.suffix not in (".bin", ".idx"):
            continue
        pid = f.name[len(stem):-len(f.suffix)]
        if pid.isdigit() and not pid_alive(int(pid)):
            f.unlink(missing_ok=True)
            removed.append(str(f))
    return removed


def write_dataset(documents: Iterable[str], output_prefix: str, tokenizer, json_key: str = "text",
                  append_eod: bool = True) -> PendingOutput:
    """Tokenize ``documents`` into ``PREFIX_<key>_document.tmp<pid>.bin/.idx``; nothing is left
    behind if this fails.  :meth:`PendingOutput.commit` renames the files into place."""
    prefix = f"{output_prefix}_{json_key}_document"
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(prefix)
    pending = PendingOutput(f"{prefix}.tmp{os.getpid()}", prefix)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(pending.tmp + ".bin", dtype=dtype)
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
        builder.finalize(pending.tmp + ".idx")
    except BaseException:
        builder.data_file.close()
        pending.discard()
        raise
    return pending


def preprocess(
    documents: Iterable[str],
    output_prefix: str,
    tokenizer,
    json_key: str = "text",
    append_eod: bool = True,
) -> str:
    """Tokenize ``documents`` into an indexed dataset; return the dataset prefix.  Both files
    are written under temporary names and renamed only when complete."""
    return write_dataset(documents, output_prefix, tokenizer, json_key, append_eod).commit()


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def count_tokens(prefix: str) -> int:
    ds = IndexedDataset(prefix)
    return int(np.sum(ds.sequence_lengths))
