"""The synthetic math corpus for cooldown recipes when no math dataset is supplied.

The paper's cooldown raises *math* to 20 % of the blend for the last 15 % of steps
(FineMath-4+ or Nemotron-CC-Math-4+, §5.2).  Those corpora are not shipped here; without
a user-supplied prefix the recipes in ``examples/`` use this corpus instead: the
arithmetic and variable-assignment generators of :mod:`megatron_growloop.data.synthetic`
(the math-like families of the embedded default corpus), written as an indexed dataset
once per tokenizer in the cache.  It is a stand-in that exercises the blend switch, not
a substitute for real math data.

``python -m megatron_growloop.data.math_corpus --tokenizer-type ... --tokenizer-model ...``
prints the prefix (building it if needed); ``--default`` prints the embedded default
corpus's prefix instead (the "web" part of the CPU recipes).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from typing import Iterator, List, Optional

from ..errors import ArgumentParser, cli_errors
from ..paths import cache_dir
from . import synthetic
from .default_corpus import cached_dataset, default_data_prefix
from .tokenizer import build_tokenizer

MATH_CORPUS_VERSION = 1
DEFAULT_NUM_DOCUMENTS = 4000


def _arithmetic_doc(rng: random.Random) -> str:
    return "\n".join(synthetic.arithmetic_line(rng, max_operand=rng.choice((20, 50, 100)))
                     for _ in range(rng.randint(4, 12)))


def _assignment_doc(rng: random.Random) -> str:
    inst = synthetic.assignment_instance(rng, depth=rng.randint(0, 3))
    style = rng.choice(("{a}={b}", "Let {a} = {b}.", "{a} = {b}"))
    lines = [style.format(a=a, b=b) for a, b in inst.lines]
    return "\n".join(lines + [style.format(a=inst.query, b=inst.answer)])


def generate_math_documents(num_documents: int = DEFAULT_NUM_DOCUMENTS, seed: int = 4321) -> Iterator[str]:
    """Seeded documents: half arithmetic drills, half variable-assignment chains (depth 0-3)."""
    rng = random.Random(seed)
    for _ in range(num_documents):
        yield _arithmetic_doc(rng) if rng.random() < 0.5 else _assignment_doc(rng)


def math_data_prefix(tokenizer, build: bool = True) -> str:
    """Prefix of the synthetic math indexed dataset for ``tokenizer``, built once (atomically)."""
    ident = json.dumps({"v": MATH_CORPUS_VERSION, "tok": tokenizer.unique_identifiers}, sort_keys=True)
    root = cache_dir() / "math_data" / hashlib.md5(ident.encode()).hexdigest()[:12]
    return cached_dataset(root, "math", generate_math_documents(), tokenizer, build)


def main(argv: Optional[List[str]] = None) -> str:
    p = ArgumentParser(prog="megatron_growloop.data.math_corpus",
                       description="Print (building once) the synthetic math corpus prefix for a tokenizer.")
    p.add_argument("--tokenizer-type", choices=["HuggingFaceTokenizer", "ByteTokenizer"], default="HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", default=None, help="as for pretrain (default smollm2)")
    p.add_argument("--default", action="store_true", help="print the embedded default corpus's prefix instead")
    with cli_errors(p.prog):
        args = p.parse_args(argv)
        model = args.tokenizer_model or ("smollm2" if args.tokenizer_type == "HuggingFaceTokenizer" else None)
        tok = build_tokenizer(args.tokenizer_type, model)
        prefix = default_data_prefix(tok) if args.default else math_data_prefix(tok)
        print(prefix, flush=True)
        return prefix


if __name__ == "__main__":
    main(sys.argv[1:])
