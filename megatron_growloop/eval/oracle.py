"""Reference scorers that need no model: an oracle that solves the prompts by reading
them, a constant scorer and a random scorer (both at chance level).

The oracle parses only the *text* of the context (never the item's metadata), so
a perfect oracle score shows that every prompt contains what is needed to answer
it and that the gold choice is the right one:

* copying: induction on the last line -- find the earlier occurrence of its last
  word and answer the word that followed it;
* variable assignment: execute the statements of every registered form in order
  (later assignments overwrite earlier ones, as in a program) and read the queried
  variable from the last line.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple

from .templates import BLANK, FORMS

_NAME, _VALUE = r"([a-z])", r"([a-z]|[0-9]+)"


def _pattern(fmt: str, **groups: str) -> str:
    out = re.escape(fmt)
    for key, rx in groups.items():
        out = out.replace(re.escape("{" + key + "}"), rx)
    return out


def _statement_patterns():
    return [re.compile("^" + _pattern(f.statement, name=_NAME, value=_VALUE) + "$") for f in FORMS.values()]


def _query_patterns():
    pats = []
    for f in FORMS.values():
        before = f.query.split(BLANK)[0].rstrip(" ")
        pats.append(re.compile("^" + _pattern(before, name=_NAME)))
    return pats


def solve_copy(context: str) -> Optional[str]:
    last = context.rstrip().splitlines()[-1]
    words = [w for w in last.split() if w.isalpha()]
    if len(words) < 2:
        return None
    target = words[-1]
    for j in range(len(words) - 1):
        if words[j] == target:
            return words[j + 1]
    return None


def solve_assignment(context: str) -> Optional[str]:
    stmts, queries = _statement_patterns(), _query_patterns()
    lines = context.rstrip("\n").splitlines()
    env: Dict[str, str] = {}
    for line in lines[:-1]:
        for p in stmts:
            m = p.match(line.strip())
            if m:
                name, value = m.group(1), m.group(2)
                env[name] = value if value.isdigit() else env.get(value, "?")
                break
    last = lines[-1].strip()
    for p in queries:
        m = p.match(last)
        if m:
            return env.get(m.group(1))
    return None


def is_assignment_prompt(context: str) -> bool:
    last = context.rstrip("\n").splitlines()[-1].strip()
    return any(p.match(last) for p in _query_patterns())


def solve(context: str) -> Optional[str]:
    """The answer to the last question in ``context`` (None if it cannot be parsed)."""
    if is_assignment_prompt(context):
        return solve_assignment(context)
    return solve_copy(context)


class OracleScorer:
    """Log-likelihood 0 for the right continuation, -1 for every other one."""

    def __init__(self):
        self._cache: Dict[str, Optional[str]] = {}

    def loglikelihood(self, requests: Sequence[Tuple[str, str]]) -> List[float]:
        out = []
        for ctx, cont in requests:
            if ctx not in self._cache:
                self._cache[ctx] = solve(ctx)
            out.append(0.0 if self._cache[ctx] is not None and cont.strip() == self._cache[ctx] else -1.0)
        return out


class ConstantScorer:
    """Every continuation equally likely: ties go to the first choice, so accuracy
    measures how often the gold answer is listed first (chance, if gold is placed
    uniformly)."""

    def loglikelihood(self, requests: Sequence[Tuple[str, str]]) -> List[float]:
        return [0.0 for _ in requests]


class RandomScorer:
    """Independent uniform random log-likelihoods, deterministic per request and seed."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def loglikelihood(self, requests: Sequence[Tuple[str, str]]) -> List[float]:
        out = []
        for ctx, cont in requests:
            h = hashlib.sha256(f"{self.seed}\0{ctx}\0{cont}".encode()).digest()
            out.append(-random.Random(h).random())
        return out
