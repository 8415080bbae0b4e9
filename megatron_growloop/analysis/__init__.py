"""Mechanistic analysis of baseline, grown, looped and converted models (paper §4.1, App. B, App. E).

Everything is indexed by *effective depth*: a looped model's axis is its unrolled
applications, with loop / repeat-block and growth boundaries marked in every figure.

Python API (each analysis returns a result with ``.save(dir)`` -> JSON + NPZ + PNG)::

    from megatron_growloop.analysis import AnalysisModel, load_prompts
    from megatron_growloop.analysis import depth_score, residual_norms, local_effects, lens_analysis, layer_swap
    am = AnalysisModel(model, tokenizer)                   # a GrowLoopGPTModel, PP=1
    prompts = load_prompts("default", tokenizer, n=16, seq_len=128)
    depth_score(am, prompts).save("out/")                  # skip each application
    residual_norms(am, prompts).save("out/")               # norms, sublayer contributions
    local_effects(am, prompts).save("out/")                # future local effects
    result, lens = lens_analysis(am, prompts, fit_prompts=held_out)   # logit / tuned lens
    layer_swap(am, make_task("va_math_d0", 50)).save("out/")          # layer swaps
    compare(["out/base", "out/loop"], "out/cmp")           # overlay several models

CLI: ``python -m megatron_growloop.analysis {depth-score,lens,norms,local-effects,swap,
repeat-sweep,icl-sweep,all,compare} --help``; see ``docs/analysis.md``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AnalysisModel": ".access",
    "Trace": ".access",
    "load_prompts": ".prompts",
    "PromptSet": ".prompts",
    "depth_score": ".depth",
    "DepthScoreResult": ".depth",
    "residual_norms": ".norms",
    "NormsResult": ".norms",
    "local_effects": ".local",
    "LocalEffectsResult": ".local",
    "TunedLens": ".lens",
    "fit_tuned_lens": ".lens",
    "lens_analysis": ".lens",
    "lens_metrics": ".lens",
    "LensResult": ".lens",
    "layer_swap": ".swap",
    "make_task": ".swap",
    "swapped_schedule": ".swap",
    "SwapResult": ".swap",
    "compare": ".overlay",
    "load_result": ".results",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(name)
