"""The scoring engine and the lm-eval adapter on tiny trained checkpoints (in process, CPU).

Reference: a direct computation -- one forward of the whole sequence, ``log_softmax`` over
the tokenizer's vocabulary in float64, summed over the continuation tokens.
"""

from __future__ import annotations

import math
import pytest
import torch

from eval_fixtures import tiny_ckpts  # noqa: F401  (session fixture: pretrained tiny checkpoints)
from megatron_growloop.errors import UsageError
from megatron_growloop.eval import primitives, scoring, sweeps
from megatron_growloop.eval.engine import LogProbEngine

TOL = 1e-4


@pytest.fixture
def plain(tiny_ckpts, dist_1rank):
    from megatron_growloop.training.inference import load_model

    model, meta, tok = load_model(tiny_ckpts.plain)
    return model, meta, tok


def _direct(model, tok, requests, engine):
    out = []
    V = tok.vocab_size
    for c, x in requests:
        ci, xi = engine.encode_pair(c, x)
        seq = torch.tensor([ci + xi])
        with torch.no_grad():
            lg = model(seq, torch.arange(seq.shape[1])[None], None)
        lp = torch.log_softmax(lg[0, :, :V].double(), dim=-1)
        rows = [lp[len(ci) - 1 + k] for k in range(len(xi))]
        out.append((sum(r[t].item() for r, t in zip(rows, xi)),
                    all(int(r.argmax()) == t for r, t in zip(rows, xi))))
    return out


def _requests():
    reqs = []
    for name in ("copy_real", "va_math_d1", "va_basic_d2"):
        for it in primitives.generate_task(name, 2, num_fewshot=1, template="continuation"):
            reqs.extend(it.requests())
    reqs += [("", "hello world"), ("a=1\nb=a\nb= ", "1"), ("The cat", " sat on the mat")]
    return reqs


def _check_against_direct(model, tok):
    reqs = _requests()
    ref = _direct(model, tok, reqs, LogProbEngine(model, tok))
    for use_cache in (False, True):
        got = LogProbEngine(model, tok, use_cache=use_cache, batch_size=3).loglikelihood_greedy(reqs)
        for (a, ga), (b, gb) in zip(got, ref):
            assert abs(a - b) < TOL, (use_cache, a, b)
            assert ga == gb


def test_engine_matches_direct_logprobs(plain):
    """Full and shared-context (KV-cache) scoring both equal the direct computation, incl. is_greedy."""
    model, _, tok = plain
    _check_against_direct(model, tok)


def test_engine_matches_direct_with_repeated_block_and_loop(tiny_ckpts, dist_1rank):
    """The same holds when a block is repeated at inference and for a looped model with more
    repeats: each layer application keeps its own KV-cache slot."""
    from megatron_growloop.training.inference import load_model

    model, _, tok = load_model(tiny_ckpts.plain, repeat_blocks=["1:3:3"])
    assert model.schedule == [0, 1, 2, 1, 2, 1, 2, 3]
    _check_against_direct(model, tok)
    model, _, tok = load_model(tiny_ckpts.loop, loop_repeats=3)
    assert model.schedule == [0, 1, 2, 1, 2, 1, 2, 3]
    _check_against_direct(model, tok)


def test_repeat_block_changes_scores(plain):
    """Repeating a block changes the computation (the check above is not vacuous)."""
    model, _, tok = plain
    reqs = _requests()[:5]
    base = LogProbEngine(model, tok).loglikelihood(reqs)
    model.set_repeat_blocks(["1:3:2"])
    try:
        rep = LogProbEngine(model, tok).loglikelihood(reqs)
    finally:
        model.set_repeat_blocks([])
    assert max(abs(a - b) for a, b in zip(base, rep)) > 1e-3


def test_encode_pair_matches_lm_eval(plain):
    """Our tokenisation of requests is lm-eval's TemplateLM one (trailing spaces, empty context)."""
    from megatron_growloop.eval.harness import GrowLoopLM

    model, _, tok = plain
    lm = GrowLoopLM(model=model, tokenizer=tok)
    for c, x in [("a b ", "c"), ("x=", "23"), ("Fill ->", " 7"), ("  ", "y")]:
        assert lm.engine.encode_pair(c, x) == lm._encode_pair(c, x)
    assert lm.engine.encode_pair("", "ab") == ([tok.eod], list(b"ab"))


def test_adapter_loglikelihood_and_rolling(plain):
    """GrowLoopLM.loglikelihood equals the direct computation; loglikelihood_rolling over a text
    longer than the context equals the sum of per-token log-probs of its disjoint windows."""
    from lm_eval.api.instance import Instance

    from megatron_growloop.eval.harness import GrowLoopLM

    model, _, tok = plain
    lm = GrowLoopLM(model=model, tokenizer=tok, max_length=40)
    reqs = [("ab=1\ncd=", "1"), ("The cat", " sat")]
    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    got = lm.loglikelihood(inst)
    ref = _direct(model, tok, reqs, lm.engine)
    assert all(abs(a[0] - b[0]) < TOL and a[1] == b[1] for a, b in zip(got, ref))

    text = "the quick brown fox jumps over the lazy dog; " * 3  # 135 bytes > 40
    ids = list(text.encode())
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    V = tok.vocab_size
    total, pos = 0.0, 0
    while pos < len(ids):  # disjoint windows of 40 predicted tokens, each with full left context
        end = min(pos + 40, len(ids))
        ctx = ([tok.eod] + ids)[max(0, end - 40): end]  # the 40 tokens before each target
        seq = torch.tensor([ctx])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq, torch.arange(seq.shape[1])[None], None)[0, :, :V].double(), -1)
        targets = ids[pos:end]
        offset = len(ctx) - len(targets)
        total += sum(lp[offset + k, t].item() for k, t in enumerate(targets))
        pos = end
    assert abs(rolling - total) < 1e-3


def test_generate_until_is_greedy_with_cache(plain):
    """generate_until equals greedy decoding without a KV cache, cut at the stop string."""
    from lm_eval.api.instance import Instance

    from megatron_growloop.eval.harness import GrowLoopLM
    from megatron_growloop.model.generate import greedy_generate

    model, _, tok = plain
    model.set_repeat_blocks(["0:2:2"])
    try:
        lm = GrowLoopLM(model=model, tokenizer=tok)
        prompt = "a=1\nb=a\nb="
        (out,) = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 0)])
        ref = greedy_generate(model, torch.tensor([list(prompt.encode())]), 12, use_cache=False,
                              stop_token=tok.eod, vocab_size=tok.vocab_size)
        ref_text = tok.detokenize([t for t in ref[0, len(prompt):].tolist() if t != tok.eod])
        assert out == ref_text[: len(out)] and len(out) > 0
        if len(out) > 2:
            stop = out[1:3]
            (cut,) = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0)])
            assert cut == out[: out.index(stop)]
    finally:
        model.set_repeat_blocks([])


def test_context_longer_than_model_is_a_one_line_error(plain):
    """A prompt longer than the context raises a one-line UsageError; truncate='left' drops the left."""
    model, _, tok = plain
    eng = LogProbEngine(model, tok, max_length=16)
    with pytest.raises(UsageError) as e:
        eng.loglikelihood([("x" * 40, "y")])
    assert "exceeds the model's context length of 16" in str(e.value) and "\n" not in str(e.value)
    left = LogProbEngine(model, tok, max_length=16, truncate="left")
    a = left.loglikelihood([("x" * 40, "y")])[0]
    b = LogProbEngine(model, tok).loglikelihood([("x" * 16, "y")])[0]
    assert abs(a - b) < TOL and left.truncated == 1


def test_repeat_block_outside_model_is_a_one_line_error(tiny_ckpts, dist_1rank):
    """Repeat blocks beyond the effective depth are refused with a one-line message."""
    from megatron_growloop.eval.loader import load_for_eval

    with pytest.raises(UsageError) as e:
        load_for_eval(load=tiny_ckpts.plain, repeat_blocks=["2:6:2"])
    assert "outside the model" in str(e.value) and "\n" not in str(e.value)
    model, _, tok = load_for_eval(load=tiny_ckpts.plain)
    with pytest.raises(UsageError, match="outside the model"):
        sweeps.repeat_block_sweep(model, LogProbEngine(model, tok), "va_basic_d0", block_size=2, starts=[3])


def test_repeat_block_sweep_cells(plain):
    """Each sweep cell equals evaluating that schedule directly; R=1 is the unmodified model; the
    model's schedule is restored afterwards."""
    model, _, tok = plain
    eng = LogProbEngine(model, tok)
    res = sweeps.repeat_block_sweep(model, eng, "copy_random,va_basic_d1", block_size=2, starts=[0, 2],
                                    repeats=[1, 2], limit=6, num_fewshot=1, template="continuation")
    assert model.schedule == [0, 1, 2, 3]
    items = primitives.generate_task("va_basic_d1", 6, num_fewshot=1, template="continuation")
    base, _ = scoring.evaluate_items(eng, items)
    assert res["acc_norm"]["va_basic_d1"][0] == [base.acc_norm, base.acc_norm]
    model.set_repeat_blocks(["2:4:2"])
    rep, _ = scoring.evaluate_items(eng, items)
    model.set_repeat_blocks([])
    assert res["acc_norm"]["va_basic_d1"][1][1] == rep.acc_norm
    assert res["repeats"] == [1, 2] and res["starts"] == [0, 2]


def test_icl_sweep_stops_at_context_length(plain):
    """The in-context sweep evaluates shot counts while prompts fit and reports the first that does not."""
    model, _, tok = plain
    eng = LogProbEngine(model, tok)

    def length(it):
        return max(len(c) + len(x) - 1 for c, x in (eng.encode_pair(*r) for r in it.requests()))

    res = sweeps.icl_sweep(eng, "va_basic_d0", shots=[0, 1, 2, 50], max_length=200, token_length=length,
                           limit=4, template="continuation")
    assert res["shots"]["va_basic_d0"] == [0, 1, 2]
    assert res["did_not_fit"]["va_basic_d0"]["shots"] == 50
    assert max(res["max_prompt_tokens"]["va_basic_d0"]) <= 200


def test_heldout_nll_equals_direct_cross_entropy(plain):
    """The NLL is the mean per-token cross entropy of the held-out samples (megatron's loss over
    the padded vocabulary, like pretraining's validation loss)."""
    from megatron_growloop.eval.nll import build_eval_dataset, heldout_nll

    model, meta, tok = plain
    ds = build_eval_dataset(tok, 128, 6)
    res = heldout_nll(LogProbEngine(model, tok), ds, 6, micro_batch_size=4)
    tot, cnt = 0.0, 0
    for i in range(6):
        s = ds[i]
        tokens = torch.as_tensor(s["tokens"]).long()[None]
        with torch.no_grad():
            lg = model(tokens, torch.arange(tokens.shape[1])[None], None)
        lp = torch.log_softmax(lg[0].double(), -1)
        labels = torch.as_tensor(s["labels"]).long()
        tot += -lp.gather(1, labels[:, None]).sum().item()
        cnt += labels.numel()
    assert res["tokens"] == cnt and abs(res["nll"] - tot / cnt) < TOL
    assert math.isclose(res["perplexity"], math.exp(res["nll"]))
