"""Model access: turn ``(model, tokenizer)`` into log-likelihood scorers.

:class:`LogProbEngine` scores ``(context, continuation)`` pairs with a
:class:`~megatron_growloop.model.gpt.GrowLoopGPTModel` (any loop / repeat-block
schedule, any TP, PP, DP).  It follows lm-evaluation-harness conventions, so its
numbers can be compared with lm-eval's ``hf`` backend:

* a pair is tokenised as ``tok(context + continuation)`` split after
  ``len(tok(context))`` tokens, with trailing spaces of the context moved to the
  continuation (lm-eval's ``_encode_pair``); an empty context is replaced by the
  end-of-document token;
* the log-likelihood is the sum over continuation tokens of
  ``log_softmax(logits[:vocab_size])``, where ``vocab_size`` is the tokenizer's
  (padded vocabulary rows are excluded); ``is_greedy`` says whether every
  continuation token was the argmax.

Two exact computations are used:

* **full**: one forward over ``(context + continuation)[:-1]`` per pair, pairs
  batched with right padding (causal attention makes padding harmless);
* **shared context** (PP = 1): pairs with the same context are scored with one
  prefill of the context into a KV cache, then the continuations are decoded
  together, one token per step, each batch row with its own copy of the cache.
  For multiple choice this costs one context pass per question instead of one per
  choice.  Looped and block-repeated models keep one cache slot per layer
  application (see :mod:`megatron_growloop.looping.block`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from megatron.core.inference.contexts import StaticInferenceContext

from .. import platform
from ..errors import UsageError
from . import parallel

TokenRequest = Tuple[Sequence[int], Sequence[int]]


class LogProbEngine:
    """Log-likelihoods of continuations under a Megatron model (a :class:`Scorer`).

    ``max_length`` is the longest token sequence a forward may see (default: the model's
    ``max_sequence_length``).  ``truncate="error"`` raises a one-line
    :class:`UsageError` for longer requests; ``"left"`` drops context tokens from the left
    as lm-eval does (and counts them in :attr:`truncated`).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        vocab_size: Optional[int] = None,
        eod: Optional[int] = None,
        max_length: Optional[int] = None,
        batch_size: int = 8,
        max_batch_tokens: int = 4096,
        use_cache: bool = True,
        truncate: str = "error",
    ):
        self.model = model
        self.tokenizer = tokenizer
        if vocab_size is None:
            if tokenizer is None:
                raise UsageError("LogProbEngine needs a tokenizer or an explicit vocab_size")
            vocab_size = int(tokenizer.vocab_size)
        self.vocab_size = int(vocab_size)
        if eod is None and tokenizer is not None:
            eod = tokenizer.eod
        self.eod = eod
        self.max_length = int(max_length or getattr(model, "max_sequence_length", 0) or 2048)
        if batch_size < 1 or max_batch_tokens < 1:
            raise UsageError(f"batch size and token budget must be >= 1, got {batch_size}, {max_batch_tokens}")
        self.batch_size = int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.use_cache = bool(use_cache)
        if truncate not in ("error", "left"):
            raise UsageError(f"truncate must be 'error' or 'left', got {truncate!r}")
        self.truncate = truncate
        self.truncated = 0
        self.forward_calls = 0

    # ------------------------------------------------------------------ text level
    def tok_encode(self, text: str) -> List[int]:
        if self.tokenizer is None:
            raise UsageError("this engine has no tokenizer; score token ids with score_tokens()")
        return list(self.tokenizer.tokenize(text))

    def encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """lm-eval's ``TemplateLM`` tokenisation of a request."""
        if context == "":
            cont = self.tok_encode(continuation)
            if self.eod is None:
                raise UsageError("empty context needs an end-of-document token to condition on")
            if cont and cont[0] == self.eod:
                return cont[:1], cont[1:]
            return [self.eod], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests: Sequence[Tuple[str, str]]) -> List[float]:
        """Scorer protocol: summed log-probability of each continuation."""
        return [lp for lp, _ in self.loglikelihood_greedy(requests)]

    def loglikelihood_greedy(self, requests: Sequence[Tuple[str, str]]) -> List[Tuple[float, bool]]:
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests])

    # ------------------------------------------------------------------ token level
    def _check(self, ctx: Sequence[int], cont: Sequence[int]) -> Tuple[List[int], List[int]]:
        ctx, cont = list(ctx), list(cont)
        if not ctx:
            raise UsageError("a request needs at least one context token")
        if not cont:
            raise UsageError("a request needs at least one continuation token")
        need = len(ctx) + len(cont) - 1
        if need > self.max_length:
            if self.truncate == "error":
                raise UsageError(
                    f"a prompt of {len(ctx)} tokens plus a {len(cont)}-token answer exceeds the model's "
                    f"context length of {self.max_length} tokens (use fewer in-context examples, or "
                    "truncate='left')"
                )
            if len(cont) > self.max_length:
                raise UsageError(f"a {len(cont)}-token continuation exceeds the context length {self.max_length}")
            ctx = ctx[need - self.max_length:]
            self.truncated += 1
        return ctx, cont

    def score_tokens(self, requests: Sequence[TokenRequest]) -> List[Tuple[float, bool]]:
        """``(sum of log-probs, is_greedy)`` per ``(context_ids, continuation_ids)`` request."""
        reqs = [self._check(c, x) for c, x in requests]
        # Group by context (shared-context scoring), in first-seen order.
        groups: "OrderedDict[Tuple[int, ...], List[int]]" = OrderedDict()
        for i, (c, _) in enumerate(reqs):
            groups.setdefault(tuple(c), []).append(i)
        group_list = list(groups.items())
        mine = parallel.shard(group_list)
        shared = self.use_cache and parallel.pp_size() == 1
        local: List[List[Tuple[float, bool]]] = [None] * len(mine)  # type: ignore
        singles: List[Tuple[int, int]] = []  # (position in mine, request index)
        was_training = self.model.training
        self.model.eval()
        try:
            for k, gi in enumerate(mine):
                ctx, idx = group_list[gi]
                if shared and len(idx) > 1:
                    local[k] = self._score_shared(list(ctx), [reqs[i][1] for i in idx])
                else:
                    local[k] = [None] * len(idx)  # type: ignore
                    singles.extend((k, j) for j in range(len(idx)))
            if singles:
                flat = [reqs[group_list[mine[k]][1][j]] for k, j in singles]
                scores = self._score_full(flat)
                for (k, j), s in zip(singles, scores):
                    local[k][j] = s
        finally:
            self.model.train(was_training)
        per_group = parallel.gather_sharded(len(group_list), mine, local)
        out: List[Tuple[float, bool]] = [None] * len(reqs)  # type: ignore
        for (_, idx), res in zip(group_list, per_group):
            for i, r in zip(idx, res):
                out[i] = r
        return out

    # ------------------------------------------------------------------ full forward
    def _batches(self, order: List[int], lengths: List[int]):
        batch: List[int] = []
        width = 0
        for i in order:
            w = max(width, lengths[i])
            if batch and (len(batch) + 1 > self.batch_size or (len(batch) + 1) * w > self.max_batch_tokens):
                yield batch
                batch, w = [], lengths[i]
            batch.append(i)
            width = w
        if batch:
            yield batch

    def _score_full(self, reqs: List[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        lengths = [len(c) + len(x) - 1 for c, x in reqs]
        order = sorted(range(len(reqs)), key=lambda i: -lengths[i])
        out: List[Tuple[float, bool]] = [None] * len(reqs)  # type: ignore
        dev = platform.device()
        V = self.vocab_size
        for batch in self._batches(order, lengths):
            width = max(lengths[i] for i in batch)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            spans = []
            for row, i in enumerate(batch):
                c, x = reqs[i]
                seq = (c + x)[:-1]
                tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                spans.append((len(c) - 1, x))

            def post(logits: torch.Tensor, spans=spans):
                res = []
                for row, (start, cont) in enumerate(spans):
                    rows = logits[row, start : start + len(cont), :V].float()
                    res.append(_score_rows(rows, cont))
                return res

            self.forward_calls += 1
            results = parallel.pipeline_forward(self.model, tokens.to(dev), post)
            for i, r in zip(batch, results):
                out[i] = r
        return out

    # ------------------------------------------------------------------ shared context
    @torch.no_grad()
    def _score_shared(self, ctx: List[int], conts: List[List[int]]) -> List[Tuple[float, bool]]:
        dev = platform.device()
        V = self.vocab_size
        n, L = len(conts), len(ctx)
        longest = max(len(x) for x in conts)
        inf = StaticInferenceContext(n, L + longest - 1)
        pos = torch.arange(L, device=dev).unsqueeze(0)
        self.forward_calls += 1
        first = self.model(torch.tensor([ctx], device=dev), pos, None, inference_context=inf,
                           runtime_gather_output=True)
        first_lp = F.log_softmax(first[0, -1, :V].float(), dim=-1)
        lps = [[first_lp[x[0]].item()] for x in conts]
        greedy = [bool(first_lp.argmax().item() == x[0]) for x in conts]
        inf.sequence_len_offset = L
        if longest > 1:
            inf.swap_key_value_dict([0] * n)  # every row gets a copy of the context's cache
            for j in range(1, longest):
                step = torch.tensor([[x[j - 1] if j - 1 < len(x) else 0] for x in conts], device=dev)
                p = torch.full((n, 1), L + j - 1, device=dev)
                self.forward_calls += 1
                logits = self.model(step, p, None, inference_context=inf, runtime_gather_output=True)
                inf.sequence_len_offset += 1
                lp = F.log_softmax(logits[:, -1, :V].float(), dim=-1)
                best = lp.argmax(dim=-1)
                for r, x in enumerate(conts):
                    if j < len(x):
                        lps[r].append(lp[r, x[j]].item())
                        greedy[r] = greedy[r] and int(best[r]) == x[j]
        return [(float(sum(l)), g) for l, g in zip(lps, greedy)]

    # ------------------------------------------------------------------ NLL
    def token_nll(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None):
        """``(sum of per-token losses, number of tokens)`` of a batch (megatron's cross entropy)."""
        mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
        dev = platform.device()

        def post(loss: torch.Tensor):
            m = mask.to(loss.device)
            return float((loss.float() * m).sum()), float(m.sum())

        self.forward_calls += 1
        return parallel.pipeline_forward(self.model, tokens.to(dev), post, labels=labels.to(dev))


def _score_rows(log_rows: torch.Tensor, cont: Sequence[int]) -> Tuple[float, bool]:
    lp = F.log_softmax(log_rows, dim=-1)
    target = torch.tensor(list(cont), device=lp.device)
    picked = lp.gather(1, target[:, None]).squeeze(1)
    greedy = bool((lp.argmax(dim=-1) == target).all())
    return float(picked.sum()), greedy


def model_scorer(model, tokenizer, **kwargs) -> LogProbEngine:
    """A :class:`~megatron_growloop.eval.scoring.Scorer` for ``(model, tokenizer)``."""
    return LogProbEngine(model, tokenizer, **kwargs)
