"""Cross-check with lm-evaluation-harness's own ``hf`` backend on real weights (SmolLM2-135M).

The same lm-eval requests (our primitives exported as local tasks) are scored by the
``megatron_growloop`` adapter -- the Hugging Face directory converted by
:mod:`megatron_growloop.convert` and run by megatron-core, with shared-context KV-cache
scoring -- and by lm-eval's ``HFLM`` (transformers).  Small limit to keep CPU time low.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def smollm2_dir():
    from megatron_growloop.convert import smollm2_hf_dir

    return str(smollm2_hf_dir())


def _run(lm, tasks, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=task_dir,
                                  include_defaults=False), log_samples=True, bootstrap_iters=0)
    lls = {t: [[r[0][0] for r in s["resps"]] for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])]
           for t in tasks}
    return out["results"], lls


def test_adapter_equals_hf_backend_on_smollm2(smollm2_dir, tmp_path, dist_1rank, monkeypatch):
    """Per-request log-likelihoods agree within 1e-4 and both backends give the same acc / acc_norm;
    our own primitives runner agrees too."""
    from lm_eval.models.huggingface import HFLM

    from megatron_growloop.eval import lm_tasks, scoring
    from megatron_growloop.eval.harness import GrowLoopLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    names = ["copy_random", "va_basic_d1"]
    tasks = lm_tasks.write_tasks(str(tmp_path), names, n=3, seed=0, num_fewshot=2, template="continuation")
    ours = GrowLoopLM(hf=smollm2_dir)
    res_ours, ll_ours = _run(ours, tasks, str(tmp_path))
    hf = HFLM(pretrained=smollm2_dir, dtype="float32", device="cpu", batch_size=4)
    res_hf, ll_hf = _run(hf, tasks, str(tmp_path))
    diffs = [abs(a - b) for t in tasks for da, db in zip(ll_ours[t], ll_hf[t]) for a, b in zip(da, db)]
    assert len(diffs) == 3 * 10 + 3 * 5
    print(f"max |loglikelihood difference| over {len(diffs)} requests: {max(diffs):.2e}")
    assert max(diffs) < 1e-4, max(diffs)
    for t in tasks:
        for metric in ("acc,none", "acc_norm,none"):
            assert res_ours[t][metric] == res_hf[t][metric], (t, metric)
    direct = scoring.evaluate_primitives(ours.engine, names, limit=3, num_fewshot=2, template="continuation")
    for n in names:
        assert direct["results"][n]["acc"] == res_hf[f"rp_{n}"]["acc,none"]
        assert direct["results"][n]["acc_norm"] == res_hf[f"rp_{n}"]["acc_norm,none"]
