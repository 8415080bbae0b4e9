"""lm-evaluation-harness model ``megatron_growloop``: any lm-eval task on our checkpoints.

>>> import lm_eval
>>> from megatron_growloop.eval.harness import GrowLoopLM
>>> lm = GrowLoopLM(load="runs/lidas", repeat_block="8:12:2")
>>> lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

or by name once this module is imported:
``simple_evaluate(model="megatron_growloop", model_args="load=runs/lidas,loop_repeats=6", ...)``.

Model arguments: ``load`` (checkpoint) or ``hf`` (Hugging Face directory, converted),
``loop_repeats``, ``repeat_block`` (``S:E:R``; several joined by ``;``),
``batch_size``, ``max_length`` (default: the model's), ``truncate`` (``error`` or
``left``), ``use_cache`` (shared-context scoring), ``max_gen_toks``,
``tensor_model_parallel_size`` / ``pipeline_model_parallel_size``, or an already
built ``model=`` + ``tokenizer=``.

Distributed use: every rank runs lm-eval on all requests in lock-step (the model
reports ``rank 0 / world_size 1`` to lm-eval); the scoring engine shards the work
over data-parallel ranks and runs TP / PP collectively.  Only global rank 0 should
write results.  Generation (``generate_until``) is greedy with the per-application
KV cache and needs pipeline parallel size 1.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .. import platform
from ..errors import UsageError
from ..model.generate import greedy_generate
from .engine import LogProbEngine
from .loader import load_for_eval


def _repeat_blocks(value) -> List[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).replace("+", ";").split(";") if v.strip()]


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@register_model("megatron_growloop")
class GrowLoopLM(TemplateLM):
    def __init__(
        self,
        load: Optional[str] = None,
        hf: Optional[str] = None,
        loop_repeats: Optional[int] = None,
        repeat_block=None,
        batch_size=8,
        max_length: Optional[int] = None,
        truncate: str = "error",
        use_cache=True,
        max_gen_toks: int = 256,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        model=None,
        tokenizer=None,
        **kwargs: Any,
    ):
        super().__init__()
        kwargs.pop("device", None)  # lm-eval passes these; devices are chosen by the platform layer
        kwargs.pop("max_batch_size", None)
        if kwargs:
            raise UsageError(f"unknown megatron_growloop model arguments: {', '.join(sorted(kwargs))}")
        blocks = _repeat_blocks(repeat_block)
        self.meta: Dict[str, Any] = {}
        if model is None:

            model, self.meta, tokenizer = load_for_eval(
                load=load, hf=hf, loop_repeats=None if loop_repeats in (None, "") else int(loop_repeats),
                repeat_blocks=blocks, tp=int(tensor_model_parallel_size), pp=int(pipeline_model_parallel_size),
            )
        else:
            if tokenizer is None:
                raise UsageError("GrowLoopLM(model=...) also needs tokenizer=...")
            if loop_repeats not in (None, ""):
                model.set_loop_repeats(int(loop_repeats))
            if blocks:
                model.set_repeat_blocks(blocks)
        self.model = model
        self.tokenizer = tokenizer
        bs = 8 if str(batch_size) in ("auto", "None", "") else int(str(batch_size).split(":")[0])
        self.engine = LogProbEngine(
            model, tokenizer, max_length=None if max_length in (None, "") else int(max_length),
            batch_size=bs, use_cache=_bool(use_cache), truncate=str(truncate),
        )
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ lm-eval interface
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eod)

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "source", getattr(self.tokenizer, "name", "tokenizer"))

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return list(self.tokenizer.tokenize(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.detokenize(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        return self.engine.score_tokens([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            ):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        scores = self.engine.score_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:


        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0.0:
                raise UsageError("megatron_growloop generates greedily only (do_sample=False, temperature=0)")
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context) or [self.eot_token_id]
            room = self.max_length - max_new
            if len(ids) > room:
                if self.engine.truncate != "left" or room < 1:
                    raise UsageError(
                        f"a prompt of {len(ids)} tokens plus {max_new} generated tokens exceeds the model's "
                        f"context length of {self.max_length} (use truncate=left)"
                    )
                ids = ids[-room:]
            prompt = torch.tensor([ids], device=platform.device())
            full = greedy_generate(self.model, prompt, max_new, use_cache=True, stop_token=self.eot_token_id,
                                   vocab_size=self.engine.vocab_size)
            new = [t for t in full[0, len(ids):].tolist()]
            if self.eot_token_id in new:
                new = new[: new.index(self.eot_token_id)]
            text = self.tok_decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
