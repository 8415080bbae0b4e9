"""A focused pretraining corpus with the exact evaluation items held out.

Small models trained for minutes on a CPU learn nothing measurable from a general corpus
(``docs/analysis.md``: four models at chance on every primitive).  This corpus is made of
the reasoning primitives' own task families, written in the **continuation** form in
which they are evaluated (``--template continuation``), plus a little arithmetic and
English text:

=============== ====================================================================
kind            one document
=============== ====================================================================
``copy_random`` 1..``max_examples`` copy examples of random three-letter words,
                separated by a blank line: 10 words, then the sequence again from a
                random start to its end (every word after the first copied one is
                predictable)
``copy_real``   the same with the shipped English word list
``va``          1..``max_examples`` variable-assignment examples of one depth (0, 1 or
                2, weighted by ``va_depth_weights``) in the ``basic`` form (``u=13``
                lines), each followed by 1..``max_queries`` queries of last-level
                variables answered (``v=13``); the first query is exactly the
                evaluation's question
``arithmetic``  3-8 lines ``a+b=c`` / ``a-b=c``
``words``       a Zipf-weighted sequence of English words (the default corpus's)
=============== ====================================================================

Examples inside a document are joined by ``\\n\\n``, the separator of the evaluation's
in-context examples, so every document is also a few-shot prompt.

**Held out.** :class:`HeldOut` names evaluation tasks, seeds and item counts; every raw
instance behind those items -- the test question and its first ``demos`` in-context
examples, in any surface form -- is generated through the evaluation's own random streams
(:func:`~megatron_growloop.eval.primitives.item_instances`) and no training example may
use it (copy: the same word sequence; assignment: the same assignment lines).  A document
that would contain one is dropped and counted.  The training generator draws from its own
seeded stream (``growloop-corpus|...``), disjoint from the evaluation's, so evaluation
seeds are fresh by construction; the filter makes the hold-out exact rather than merely
improbable, and :func:`find_heldout_text` re-checks the written text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from ..data import default_corpus, synthetic
from ..data.bpe import train_bpe
from ..data.preprocess import preprocess
from ..data.tokenizer import build_tokenizer
from ..errors import UsageError
from . import primitives
from .templates import FORMS, get_template

CORPUS_VERSION = 1
KINDS = ("copy_random", "copy_real", "va", "arithmetic", "words")
EXAMPLE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class CorpusSpec:
    """What the corpus is made of (all of it goes into the manifest)."""

    num_documents: int = 40000
    seed: int = 1
    weights: Tuple[Tuple[str, float], ...] = (
        ("copy_random", 0.2), ("copy_real", 0.2), ("va", 0.4), ("arithmetic", 0.1), ("words", 0.1))
    va_depth_weights: Tuple[float, ...] = (0.3, 0.35, 0.35)  # depth 0, 1, 2
    max_examples: int = 6
    max_queries: int = 3

    def __post_init__(self):
        if self.num_documents < 1:
            raise UsageError(f"--num-documents must be >= 1, got {self.num_documents}")
        bad = [k for k, _ in self.weights if k not in KINDS]
        if bad:
            raise UsageError(f"unknown corpus kind {bad[0]!r}; choose from: {', '.join(KINDS)}")
        if any(w < 0 for _, w in self.weights) or sum(w for _, w in self.weights) <= 0:
            raise UsageError(f"corpus weights must be >= 0 and not all 0, got {dict(self.weights)}")
        if self.max_examples < 1 or self.max_queries < 1:
            raise UsageError("max_examples and max_queries must be >= 1")


@dataclass(frozen=True)
class HeldOut:
    """The evaluation items whose instances must not occur in the training data."""

    tasks: Tuple[str, ...] = ()
    seeds: Tuple[int, ...] = (0,)
    items: int = 0
    demos: int = primitives.DEFAULT_NUM_FEWSHOT

    def __post_init__(self):
        for t in self.tasks:
            primitives.get_task(t)
        if self.items < 0 or self.demos < 0:
            raise UsageError(f"held-out items and demos must be >= 0, got {self.items} and {self.demos}")


@dataclass
class CorpusStats:
    documents: Counter = field(default_factory=Counter)
    chars: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)

    def to_dict(self) -> Dict[str, Dict[str, int]]:
        return {"documents": dict(self.documents), "chars": dict(self.chars), "dropped": dict(self.dropped)}


# ------------------------------------------------------------------------------ instances
def instance_key(inst) -> Tuple:
    """The identity of a raw instance for the hold-out (surface form and query ignored)."""
    if isinstance(inst, synthetic.CopyInstance):
        return ("copy", inst.sequence)
    if isinstance(inst, synthetic.AssignmentInstance):
        return ("va", inst.lines)
    raise TypeError(f"not a task instance: {inst!r}")


def heldout_keys(heldout: HeldOut) -> Set[Tuple]:
    """Keys of every test and demo instance behind the held-out evaluation items."""
    keys: Set[Tuple] = set()
    for task in heldout.tasks:
        for seed in heldout.seeds:
            for i in range(heldout.items):
                test, demos = primitives.item_instances(task, i, seed=seed, num_demos=heldout.demos)
                keys.add(instance_key(test))
                keys.update(instance_key(d) for d in demos)
    return keys


# ------------------------------------------------------------------------------ documents
def _last_level(inst: synthetic.AssignmentInstance) -> List[Tuple[str, str]]:
    """``(variable, value)`` of the last level's variables (the ones a query may ask)."""
    value = {}
    for name, rhs in inst.lines:
        value[name] = value.get(rhs, rhs)
    n = len(inst.values)
    return [(name, value[name]) for name, _ in inst.lines[-n:]]


def render_copy(inst: synthetic.CopyInstance) -> str:
    """The sequence, then the sequence again from the segment start to its end.

    Its prefix up to the answer is the continuation-template question plus the answer."""
    seq = list(inst.sequence)
    return " ".join(seq + seq[inst.segment_start:])


def render_assignment(inst: synthetic.AssignmentInstance, rng: random.Random, max_queries: int) -> str:
    """The basic-form statements, the evaluation's query answered, then extra answered queries."""
    template = get_template("continuation")
    prompt, delim = template.assignment(inst, FORMS["basic"])
    lines = [prompt + delim + inst.answer]
    others = [(n, v) for n, v in _last_level(inst) if n != inst.query]
    for name, val in rng.sample(others, min(len(others), rng.randint(1, max_queries) - 1)):
        lines.append(f"{name}={val}")
    return "\n".join(lines)


def _make_examples(kind: str, rng: random.Random, spec: CorpusSpec) -> List[Tuple[object, str]]:
    n = rng.randint(1, spec.max_examples)
    if kind in ("copy_random", "copy_real"):
        vocab = synthetic.english_words() if kind == "copy_real" else None
        out = []
        for _ in range(n):
            inst = synthetic.copy_instance(rng, vocab, seq_len=10, seg_len=5)
            out.append((inst, render_copy(inst)))
        return out
    depth = rng.choices(range(len(spec.va_depth_weights)), weights=spec.va_depth_weights)[0]
    out = []
    for _ in range(n):
        inst = synthetic.assignment_instance(rng, depth)
        out.append((inst, render_assignment(inst, rng, spec.max_queries)))
    return out


def generate_documents(spec: CorpusSpec, keys: Set[Tuple], stats: CorpusStats) -> Iterator[Tuple[str, str]]:
    """``(kind, text)`` for ``spec.num_documents`` documents; documents touching ``keys`` are dropped."""
    rng = random.Random(f"growloop-corpus|v{CORPUS_VERSION}|{spec.seed}")
    kinds = [k for k, _ in spec.weights]
    weights = [w for _, w in spec.weights]
    for _ in range(spec.num_documents):
        kind = rng.choices(kinds, weights=weights)[0]
        if kind == "arithmetic":
            text = "\n".join(synthetic.arithmetic_line(rng) for _ in range(rng.randint(3, 8)))
        elif kind == "words":
            text = default_corpus.words_document(rng)
        else:
            examples = _make_examples(kind, rng, spec)
            if any(instance_key(inst) in keys for inst, _ in examples):
                stats.dropped[kind] += 1
                continue
            text = EXAMPLE_SEPARATOR.join(t for _, t in examples)
        stats.documents[kind] += 1
        stats.chars[kind] += len(text)
        yield kind, text


# ------------------------------------------------------------------------------ checks
def heldout_questions(heldout: HeldOut) -> List[Tuple[str, int, int, str]]:
    """``(task, seed, index, text)``: each held-out question with its answer, continuation template."""
    out = []
    for task in heldout.tasks:
        for seed in heldout.seeds:
            for item in primitives.generate_task(task, heldout.items, seed=seed, num_fewshot=0,
                                                 template="continuation"):
                out.append((task, seed, item.index, item.prompt + item.delimiter + item.answer))
    return out


def find_heldout_text(texts: Iterable[str], heldout: HeldOut) -> List[Tuple[str, int, int]]:
    """Held-out questions (with their answers) that occur verbatim anywhere in ``texts``.

    A text-level check of the written corpus, independent of :func:`instance_key`."""
    blob = "\x00".join(texts)
    return [(task, seed, i) for task, seed, i, q in heldout_questions(heldout) if q in blob]


# ------------------------------------------------------------------------------ build
def _jsonable(obj):
    return json.loads(json.dumps(obj, default=list))


def build_corpus(spec: CorpusSpec, heldout: HeldOut, out_prefix: str, tokenizer=None,
                 tokenizer_vocab: Optional[int] = None) -> Dict:
    """Write ``PREFIX.jsonl``, the indexed dataset ``PREFIX_text_document`` and ``PREFIX.manifest.json``.

    ``tokenizer_vocab``: train a BPE tokenizer of that size on the corpus
    (:mod:`megatron_growloop.data.bpe`) into ``PREFIX_tokenizer/`` and tokenise with it;
    otherwise ``tokenizer`` is used.  Refuses to publish a corpus in which
    :func:`find_heldout_text` finds an evaluation item."""
    if (tokenizer is None) == (tokenizer_vocab is None):
        raise UsageError("give either a tokenizer or a vocabulary size to train one")
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = heldout_keys(heldout)
    stats = CorpusStats()
    texts = [t for _, t in generate_documents(spec, keys, stats)]
    leaks = find_heldout_text(texts, heldout)
    if leaks:
        raise RuntimeError(f"held-out evaluation items occur in the corpus: {leaks[:5]}")
    jsonl = Path(f"{out_prefix}.jsonl")
    tmp = jsonl.with_name(jsonl.name + f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    with open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            line = json.dumps({"text": t}) + "\n"
            digest.update(line.encode())
            f.write(line)
    os.replace(tmp, jsonl)
    tokenizer_dir = None
    if tokenizer_vocab is not None:
        tokenizer_dir = train_bpe(texts, tokenizer_vocab, str(Path(f"{out_prefix}_tokenizer").resolve()))
        tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    prefix = preprocess(iter(texts), str(out), tokenizer)
    manifest = {
        "version": CORPUS_VERSION,
        "spec": _jsonable(asdict(spec)),
        "heldout": _jsonable(asdict(heldout)),
        "heldout_instances": len(keys),
        "heldout_questions_checked": len(heldout_questions(heldout)),
        "heldout_questions_found": 0,
        "stats": stats.to_dict(),
        "total_documents": len(texts),
        "total_chars": sum(len(t) for t in texts),
        "tokenizer": tokenizer.unique_identifiers,
        "tokenizer_dir": tokenizer_dir,
        "jsonl": str(jsonl),
        "jsonl_sha256": digest.hexdigest(),
        "data_prefix": prefix,
    }
    mpath = Path(f"{out_prefix}.manifest.json")
    mtmp = mpath.with_name(mpath.name + f".tmp{os.getpid()}")
    mtmp.write_text(json.dumps(manifest, indent=2))
    os.replace(mtmp, mpath)
    return manifest


def read_corpus_texts(jsonl: str) -> List[str]:
    with open(jsonl, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def parse_weights(text: str) -> Tuple[Tuple[str, float], ...]:
    """``copy_random=0.2,va=0.4,...`` -> weights tuple."""
    out = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        name, _, w = part.partition("=")
        try:
            out.append((name.strip(), float(w)))
        except ValueError:
            raise UsageError(f"corpus weight {part!r}: expected KIND=WEIGHT, e.g. va=0.4") from None
    return tuple(out)


def int_tuple(text: str, what: str) -> Tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated integers, got {text!r}") from None


def float_tuple(text: str, what: str) -> Tuple[float, ...]:
    try:
        return tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def resolve_heldout_tasks(spec: str) -> Tuple[str, ...]:
    return tuple(primitives.resolve_tasks(spec)) if spec else ()


__all__: Sequence[str] = (
    "CorpusSpec", "HeldOut", "CorpusStats", "build_corpus", "generate_documents", "heldout_keys",
    "heldout_questions", "find_heldout_text", "instance_key", "read_corpus_texts", "render_copy",
    "render_assignment",
)
