"""Prompts for the analyses: token sequences from local sources only (nothing is downloaded).

A *prompt spec* (``--data``) is one of

* ``PREFIX`` -- a Megatron indexed dataset (``PREFIX.bin``/``PREFIX.idx``); samples of
  ``seq_len`` tokens from its validation split (``--split 969,30,1``, as pretraining
  holds it out), in the dataset's order;
* ``default`` -- the project's embedded corpus (built locally for the tokenizer), same way;
* ``FILE.jsonl`` / ``FILE.txt`` -- one document per line (JSONL: the ``text`` key),
  the first ``seq_len`` tokens of each;
* ``pydoc`` -- English prose shipped with the Python interpreter (the paragraphs of at
  least 450 characters of ``pydoc_data.topics``, in sorted topic order; the text depends
  on the Python version, which is recorded);
* ``primitives[:TASKS]`` -- solved reasoning-primitive prompts from
  :mod:`megatron_growloop.eval.primitives` (in-context examples, question and the
  right answer; ``TASKS`` as for ``--tasks``, default ``all``; 5-shot).

``offset`` skips the first items of a source, so a held-out set for the tuned lens
(``--lens-data``, default: the same source after the analysis prompts) never
overlaps the prompts the lens is evaluated on.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from pydoc_data.topics import topics
from typing import Iterator, List, Sequence, Tuple

import torch

from ..data.preprocess import dataset_exists, iter_documents
from ..errors import UsageError
from ..eval import primitives
from ..eval.nll import build_eval_dataset

MIN_TOKENS = 8


@dataclass
class PromptSet:
    """Token sequences (unpadded) and where they came from."""

    sequences: List[List[int]]
    source: str
    notes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequences)

    def lengths(self) -> List[int]:
        return [len(s) for s in self.sequences]

    def batches(self, batch_size: int, pad: int = 0) -> Iterator[Tuple[torch.Tensor, List[int], List[int]]]:
        """``(tokens [b, s_max], lengths, indices)`` with right padding (harmless under causal attention)."""
        if batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {batch_size}")
        for start in range(0, len(self.sequences), batch_size):
            idx = list(range(start, min(len(self.sequences), start + batch_size)))
            seqs = [self.sequences[i] for i in idx]
            width = max(len(s) for s in seqs)
            tokens = torch.full((len(seqs), width), int(pad), dtype=torch.long)
            for r, s in enumerate(seqs):
                tokens[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            yield tokens, [len(s) for s in seqs], idx

    def describe(self) -> dict:
        lens = self.lengths()
        return {"source": self.source, "n": len(self), "min_len": min(lens) if lens else 0,
                "max_len": max(lens) if lens else 0, **self.notes}


def load_prompts(spec: str, tokenizer, n: int, seq_len: int, offset: int = 0, seed: int = 0,
                 split: str = "969,30,1") -> PromptSet:
    """``n`` prompts of at most ``seq_len`` tokens from ``spec`` (see the module docstring)."""
    if n < 1:
        raise UsageError(f"number of prompts must be >= 1, got {n}")
    if seq_len < MIN_TOKENS:
        raise UsageError(f"--seq-len must be >= {MIN_TOKENS}, got {seq_len}")
    spec = str(spec)
    if spec == "primitives" or spec.startswith("primitives:"):
        return _primitives(spec, tokenizer, n, seq_len, offset, seed)
    if spec == "pydoc":
        return _pydoc(tokenizer, n, seq_len, offset)
    path = Path(spec)
    if path.suffix in (".jsonl", ".json", ".txt") or path.is_file():
        return _text_file(spec, tokenizer, n, seq_len, offset)
    return _indexed(spec, tokenizer, n, seq_len, offset, split)


def _keep(ids: Sequence[int], seq_len: int) -> List[int]:
    return [int(t) for t in list(ids)[:seq_len]]


def _primitives(spec: str, tokenizer, n: int, seq_len: int, offset: int, seed: int) -> PromptSet:
    tasks = primitives.resolve_tasks(spec.split(":", 1)[1] if ":" in spec else "all")
    seqs: List[List[int]] = []
    per_task = -(-n // len(tasks))
    truncated = 0
    for i in range(per_task):
        for name in tasks:
            if len(seqs) >= n:
                break
            it = primitives.make_item(name, offset + i, seed=seed)
            ids = tokenizer.tokenize(it.context + it.delimiter + it.answer)
            truncated += len(ids) > seq_len
            seqs.append(_keep(ids, seq_len))
    return PromptSet(seqs, f"primitives:{','.join(tasks)}",
                     {"offset": offset, "seed": seed, "truncated": truncated, "num_fewshot": primitives.DEFAULT_NUM_FEWSHOT})


def pydoc_paragraphs(min_chars: int = 450) -> List[str]:
    """Prose paragraphs of Python's bundled help topics (offline natural-language text)."""


    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(para.split())
            if len(text) >= min_chars and not text.startswith(("*", ">>>")) and text.count("(") < len(text) / 40:
                out.append(text)
    return out


def _pydoc(tokenizer, n: int, seq_len: int, offset: int) -> PromptSet:
    paras = pydoc_paragraphs()
    seqs = [_keep(tokenizer.tokenize(t), seq_len) for t in paras[offset:offset + n]]
    if not seqs:
        raise UsageError(f"--data pydoc: only {len(paras)} paragraphs, none after the first {offset}")
    return PromptSet(seqs, "pydoc", {"offset": offset, "python": sys.version.split()[0], "available": len(paras)})


def _text_file(spec: str, tokenizer, n: int, seq_len: int, offset: int) -> PromptSet:
    if not Path(spec).is_file():
        raise UsageError(f"--data {spec!r}: no such file")
    seqs: List[List[int]] = []
    seen = 0
    for doc in iter_documents([spec]):
        ids = tokenizer.tokenize(doc)
        if len(ids) < MIN_TOKENS:
            continue
        seen += 1
        if seen <= offset:
            continue
        seqs.append(_keep(ids, seq_len))
        if len(seqs) >= n:
            break
    if not seqs:
        raise UsageError(f"--data {spec!r}: no document with at least {MIN_TOKENS} tokens after the first {offset}")
    return PromptSet(seqs, str(spec), {"offset": offset})


def _indexed(spec: str, tokenizer, n: int, seq_len: int, offset: int, split: str) -> PromptSet:
    data_path = None if spec == "default" else [spec]
    if data_path is not None:

        if not dataset_exists(spec):
            raise UsageError(
                f"--data {spec!r} is not an indexed dataset prefix (no {spec}.bin/.idx), a .jsonl/.txt file, "
                "'default' or 'primitives[:TASKS]'"
            )
    ds = build_eval_dataset(tokenizer, seq_len, offset + n, data_path=data_path, split=split, split_name="valid")
    seqs = []
    for i in range(offset, min(len(ds), offset + n)):
        seqs.append([int(t) for t in torch.as_tensor(ds[i]["tokens"]).tolist()])
    if not seqs:
        raise UsageError(f"--data {spec!r}: its validation split has only {len(ds)} samples of {seq_len} tokens")
    return PromptSet(seqs, "default corpus (valid split)" if data_path is None else f"{spec} (valid split)",
                     {"offset": offset, "split": split})
