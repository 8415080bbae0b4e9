"""Supervised fine-tuning examples: ``{"prompt", "answer"}`` records, read, checked and tokenised.

An example is a prompt and an answer.  It is trained as one token sequence
``prompt + answer + EOD`` with the loss on the answer tokens and the EOD only, as
Megatron-LM's ``SFTDataset`` does (``megatron/training/datasets/sft_dataset.py`` at
core_v0.16.1: the prompt's targets are ``IGNORE_INDEX``, an EOD is appended to every
conversation unless present, and it is a target).

Tokenisation follows lm-evaluation-harness (``TemplateLM._encode_pair``, as
:class:`megatron_growloop.eval.engine.LogProbEngine` does): the answer's tokens are
``tok(prompt + answer)`` after the first ``len(tok(prompt))`` tokens, with trailing
whitespace of the prompt moved to the answer.  So a model is fine-tuned on exactly the
token sequences the multiple-choice evaluation scores.

Every check (malformed JSON, a missing key, an empty answer, an example longer than the
context) raises a one-line :class:`~megatron_growloop.errors.UsageError` naming the file
and line, before anything is built or written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Sequence, Tuple

from ..errors import UsageError

KEYS = ("prompt", "answer")


@dataclass(frozen=True)
class SFTExample:
    """One prompt/answer pair; ``source`` names where it came from (``file:line`` or ``task#i``)."""

    prompt: str
    answer: str
    source: str


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example: ``prompt`` (context) and ``answer`` (ending with the EOD)."""

    prompt: Tuple[int, ...]
    answer: Tuple[int, ...]
    source: str

    @property
    def tokens(self) -> Tuple[int, ...]:
        return self.prompt + self.answer

    @property
    def length(self) -> int:
        """Positions it occupies in a training sequence (inputs are ``tokens[:-1]``)."""
        return len(self.prompt) + len(self.answer) - 1

    @property
    def num_loss_tokens(self) -> int:
        """Targets with loss: every answer token and the EOD."""
        return len(self.answer)


def read_jsonl(path: str) -> List[SFTExample]:
    """The examples of a JSONL file: one ``{"prompt": str, "answer": str}`` object per line
    (other keys are ignored, blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--sft-data {path!r} is not a file")
    out: List[SFTExample] = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: not a JSON object ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise UsageError(f"{where}: expected a JSON object with keys 'prompt' and 'answer'")
            for key in KEYS:
                if key not in rec:
                    raise UsageError(f"{where}: missing key {key!r} (each line needs 'prompt' and 'answer')")
                if not isinstance(rec[key], str):
                    raise UsageError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
            if not rec["answer"].strip():
                raise UsageError(f"{where}: empty answer (the loss is computed on the answer only)")
            out.append(SFTExample(rec["prompt"], rec["answer"], where))
    if not out:
        raise UsageError(f"--sft-data {path!r} holds no examples")
    return out


def encode_pair(tokenize: Callable[[str], Sequence[int]], context: str, continuation: str,
                eod: int) -> Tuple[List[int], List[int]]:
    """lm-eval's ``TemplateLM`` tokenisation of ``(context, continuation)``.

    An empty context is replaced by the EOD token (what the answer is conditioned on)."""
    if context == "":
        cont = list(tokenize(continuation))
        if cont and cont[0] == eod:
            return cont[:1], cont[1:]
        return [eod], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenize(context + continuation))
    ctx = list(tokenize(context))
    return ctx, whole[len(ctx):]


def tokenize_examples(examples: Iterable[SFTExample], tokenizer, seq_length: int) -> List[TokenizedExample]:
    """Tokenise and check every example: a non-empty answer, and ``prompt + answer + EOD``
    fitting ``seq_length`` positions (examples are never truncated or split)."""
    eod = int(tokenizer.eod)
    out: List[TokenizedExample] = []
    for ex in examples:
        ctx, ans = encode_pair(tokenizer.tokenize, ex.prompt, ex.answer, eod)
        if not ans:
            raise UsageError(f"{ex.source}: the answer {ex.answer!r} has no tokens")
        t = TokenizedExample(tuple(int(i) for i in ctx), tuple(int(i) for i in ans) + (eod,), ex.source)
        if t.length > seq_length:
            what = "the answer alone" if len(t.answer) > seq_length else "prompt + answer"
            raise UsageError(
                f"{ex.source}: {what} is longer than the context: {len(ctx)} prompt + {len(ans)} answer + 1 EOD "
                f"tokens need {t.length} positions, --seq-length is {seq_length} (examples are never truncated)"
            )
        out.append(t)
    return out


def fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """A short hash of the tokenised examples, in order (recorded in checkpoints)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.answer]).encode())
    return h.hexdigest()[:16]
