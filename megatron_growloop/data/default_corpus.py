"""The embedded default training data: a small, learnable, network-free corpus.

Documents are generated (seeded) from the paper's task families -- copying
random three-letter words, copying real English words, variable assignment
chains at depths 0-2, arithmetic -- and from English word sequences drawn with
a Zipf-like frequency profile.  The text is written as JSONL and turned into an
indexed dataset through the same :func:`~megatron_growloop.data.preprocess.preprocess`
path as user data, once per tokenizer, in the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Iterable, Iterator

from ..paths import cache_dir
from . import synthetic
from .preprocess import dataset_exists, iter_documents, preprocess

CORPUS_VERSION = 1
DEFAULT_NUM_DOCUMENTS = 6000


def _copy_doc(rng: random.Random, real: bool) -> str:
    words = synthetic.english_words() if real else None
    inst = synthetic.copy_instance(rng, words, seq_len=rng.randint(6, 14), seg_len=0)
    # A sequence, then a contiguous part of it repeated and continued to the end.
    seq = list(inst.sequence)
    start = rng.randrange(0, len(seq) - 1)
    return " ".join(seq + seq[start:]) + "."


def _assignment_doc(rng: random.Random) -> str:
    inst = synthetic.assignment_instance(rng, depth=rng.randint(0, 2))
    lines = [f"{a}={b}" for a, b in inst.lines]
    return "\n".join(lines + [f"{inst.query}={inst.answer}"])


def _arithmetic_doc(rng: random.Random) -> str:
    return "\n".join(synthetic.arithmetic_line(rng) for _ in range(rng.randint(3, 8)))


def words_document(rng: random.Random) -> str:
    """A Zipf-weighted sequence of English words (also used by the focused corpus, eval/corpus.py)."""
    words = synthetic.english_words()
    n = len(words)
    # Zipf-like: rank r drawn with probability ~ 1/(r+10)
    out = []
    for _ in range(rng.randint(20, 60)):
        r = int(min(n - 1, (n + 10) ** rng.random() - 10)) if rng.random() < 0.9 else rng.randrange(n)
        out.append(words[max(0, r)])
    return " ".join(out).capitalize() + "."


def generate_documents(num_documents: int = DEFAULT_NUM_DOCUMENTS, seed: int = 1234) -> Iterator[str]:
    rng = random.Random(seed)
    makers = [
        (0.2, lambda: _copy_doc(rng, real=False)),
        (0.2, lambda: _copy_doc(rng, real=True)),
        (0.3, lambda: _assignment_doc(rng)),
        (0.1, lambda: _arithmetic_doc(rng)),
        (0.2, lambda: words_document(rng)),
    ]
    weights = [w for w, _ in makers]
    for _ in range(num_documents):
        (_, make), = rng.choices(makers, weights=weights)
        yield make()


def _key(tokenizer) -> str:
    ident = json.dumps({"v": CORPUS_VERSION, "tok": tokenizer.unique_identifiers}, sort_keys=True)
    return hashlib.md5(ident.encode()).hexdigest()[:12]


def cached_dataset(root: Path, stem: str, documents: Iterable[str], tokenizer, build: bool = True) -> str:
    """Prefix ``root/<stem>_text_document`` of an indexed dataset of ``documents``, built once.

    Safe when several processes call it at once, on one node or on several sharing the
    cache directory: each builds in its own temporary directory (host and pid in its name)
    and the first to finish publishes it with an atomic rename."""
    prefix = str(root / f"{stem}_text_document")
    if dataset_exists(prefix) or not build:
        return prefix
    tmp = Path(f"{root}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    jsonl = tmp / f"{stem}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
    preprocess(iter_documents([str(jsonl)]), str(tmp / stem), tokenizer)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # someone else published it first
    if not dataset_exists(prefix):
        raise RuntimeError(f"dataset was not built at {prefix}")
    return prefix


def default_data_prefix(tokenizer, build: bool = True) -> str:
    """Prefix of the default indexed dataset for ``tokenizer``, building it if needed."""
    return cached_dataset(cache_dir() / "default_data" / _key(tokenizer), "default", generate_documents(),
                          tokenizer, build)
