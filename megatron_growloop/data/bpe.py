"""A small byte-level BPE tokenizer trained on a corpus (Hugging Face ``tokenizers``).

For CPU-sized models a 49k vocabulary puts most of the compute into the LM head, and the
byte tokenizer makes every prompt 3-4x longer than needed (attention is quadratic in it);
a few thousand merges trained on the corpus itself fix both.

The pre-tokenizer splits text where the reasoning-primitive evaluation splits a request into
context and continuation -- before a number that follows ``=`` and before a space-led word
-- so no merge can cross that boundary and lm-eval's tokenisation of ``context +
continuation`` always ends with the continuation's own tokens.  ``[a-z]=`` keeps a
variable name and its ``=`` together (one token), so an assignment line ``u=13`` is three
tokens (``u=``, ``13``, newline).  The tokenizer is saved as a Hugging Face directory
(``tokenizer.json`` + config with ``<|endoftext|>`` as EOS, the end-of-document token), which
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`` loads everywhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..errors import UsageError

EOD_TOKEN = "<|endoftext|>"
PRETOKENIZE = r"\n+|[a-z]=|\d+| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+"


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str) -> str:
    """Train a byte-level BPE of ``vocab_size`` tokens (EOD included) on ``texts``; save to ``out_dir``."""
    if vocab_size < 300:
        raise UsageError(f"BPE vocabulary must be >= 300 (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD_TOKEN)
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return str(out)
