"""Evaluation: the paper's reasoning primitives, held-out NLL, block-repeat and
in-context sweeps, and an lm-evaluation-harness model.

Python API (what the analysis toolkit reuses):

* :func:`primitives.generate_task` ``(name, n, seed, num_fewshot, template) -> [Item]``
  -- items with ``context``, ``choices``, ``gold``, ``delimiter``;
  :data:`primitives.TASKS` (the 11 tasks), :func:`primitives.resolve_tasks`.
* :mod:`templates` -- ``fill_blank`` (App. D) and ``continuation``; :func:`templates.register_template`.
* :func:`engine.model_scorer` ``(model, tokenizer) -> LogProbEngine`` -- log-likelihood
  scorer for any loop / repeat schedule and TP/PP/DP layout;
  ``LogProbEngine.loglikelihood([(context, continuation)])``, ``.score_tokens``, ``.token_nll``.
* :func:`scoring.score_choices` ``(model_or_scorer, tokenizer, items) -> [[ll per choice]]``,
  :func:`scoring.evaluate_items`, :func:`scoring.evaluate_primitives`.
* :mod:`oracle` -- ``OracleScorer``, ``ConstantScorer``, ``RandomScorer`` (reference scorers).
* :mod:`sweeps` -- ``repeat_block_sweep``, ``icl_sweep``; :mod:`plots` -- their PNGs.
* :mod:`nll` -- held-out NLL; :mod:`loader` -- ``load_for_eval``, ``describe_model``.
* :mod:`harness` -- ``GrowLoopLM``, the lm-eval model ``megatron_growloop``;
  :mod:`lm_tasks` -- the primitives as local lm-eval tasks.

CLI: ``python -m megatron_growloop.eval {primitives,nll,sweep,lm-eval,export-tasks} --help``.
"""

from __future__ import annotations

import importlib

__all__ = ["primitives", "templates", "metrics", "scoring", "oracle", "engine", "sweeps", "plots", "nll",
           "loader", "harness", "lm_tasks", "generate_task", "score_choices", "model_scorer"]


def __getattr__(name):
    if name in ("generate_task",):
        return getattr(importlib.import_module(".primitives", __name__), name)
    if name in ("score_choices",):
        return getattr(importlib.import_module(".scoring", __name__), name)
    if name in ("model_scorer",):
        return getattr(importlib.import_module(".engine", __name__), name)
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)
