"""Pure maths of the analysis toolkit (no model): depth score, windows, split points, lens metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_growloop.analysis import measures
from megatron_growloop.analysis.swap import swapped_schedule
from megatron_growloop.errors import UsageError


@pytest.mark.parametrize("K", [1, 6, 24])
def test_depth_score_of_one_hot_effect_is_its_index(K):
    """A model whose only effect is at layer k has depth score exactly k (expected layer index)."""
    for k in range(K):
        m = np.zeros(K)
        m[k] = 0.37
        assert measures.depth_score(m) == k


def test_depth_score_is_expected_index_of_the_normalised_effects():
    """Uniform effects give the middle; the score is scale-invariant; an all-zero vector is undefined."""
    assert measures.depth_score(np.ones(5)) == 2.0
    m = np.array([1.0, 3.0, 0.0, 4.0])
    assert math.isclose(measures.depth_score(m), (1 * 3 + 3 * 4) / 8)
    assert math.isclose(measures.depth_score(10 * m), measures.depth_score(m))
    assert math.isnan(measures.depth_score(np.zeros(3)))
    with pytest.raises(ValueError):
        measures.depth_score(np.array([1.0, -1.0]))


def test_window_masks_future_and_current():
    """future: intervene on [1, t), measure [t, len); current: intervene [1, len), measure [0, len)."""
    inter, meas = measures.window_masks([10, 6], [4, 3], 10, "future")
    assert inter[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert meas[0].nonzero().flatten().tolist() == list(range(4, 10))
    assert inter[1].nonzero().flatten().tolist() == [1, 2]
    assert meas[1].nonzero().flatten().tolist() == [3, 4, 5]  # padding positions >= 6 excluded
    inter, meas = measures.window_masks([10, 6], [None, None], 10, "current")
    assert inter[1].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    assert meas[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]


def test_split_points_are_deterministic_and_inside_the_prompt():
    """Csordás' candidates 8, 16, ... < len - 4, a seeded subset; short prompts fall back to len // 2."""
    a = measures.split_points(100, 4, seed=5)
    assert a == measures.split_points(100, 4, seed=5)
    assert len(a) == 4 and all(t % 8 == 0 and 8 <= t < 96 for t in a)
    assert measures.split_points(10, 4, seed=0) == [5]


def test_relative_change_and_prob_change():
    """Row-wise max over measured positions; identical inputs give exactly 0."""
    ref = torch.randn(5, 2, 8)  # [s, b, h]
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert measures.relative_change(ref.clone(), ref, mask).abs().max() == 0
    new = ref.clone()
    new[3, 1] += ref[3, 1]  # doubles one vector -> relative change 1 at (b=1, s=3)
    rc = measures.relative_change(new, ref, mask)
    assert rc[0] == 0 and torch.isclose(rc[1], torch.tensor(1.0))
    logits = torch.randn(2, 5, 11)
    assert measures.prob_change(logits, torch.softmax(logits, -1), mask).abs().max() < 1e-7


def test_topk_overlap_and_kl():
    a = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 4.0, 3.0, 2.0, 1.0, 5.0]])
    assert measures.topk_overlap(a, a, 5).item() == 1.0
    assert measures.topk_overlap(a, b, 5).item() == pytest.approx(0.8)
    lp = torch.log_softmax(a, -1)
    assert measures.kl_div(lp, lp).item() == 0.0
    assert measures.kl_div(lp, torch.log_softmax(b, -1)).item() > 0


def test_swapped_schedule():
    """Adjacent and distant block swaps; a block swapped with itself is the null swap."""
    s = list(range(8))
    assert swapped_schedule(s, 2, 1) == [0, 1, 3, 2, 4, 5, 6, 7]
    assert swapped_schedule(s, 2, 2) == [0, 1, 4, 5, 2, 3, 6, 7]
    assert swapped_schedule(s, 1, 1, other=6) == [0, 6, 2, 3, 4, 5, 1, 7]
    assert swapped_schedule(s, 3, 2, other=3) == s
    with pytest.raises(UsageError):
        swapped_schedule(s, 6, 2)
    with pytest.raises(UsageError):
        swapped_schedule(s, 2, 2, other=3)


def test_prompt_sources_are_local_and_offsets_disjoint(tmp_path):
    """pydoc prose, solved primitives and JSONL files load without any download; ``offset`` (used for
    the tuned lens' held-out text) selects different prompts; sequences are cut at ``seq_len``."""
    from megatron_growloop.analysis.prompts import load_prompts
    from megatron_growloop.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    a = load_prompts("pydoc", tok, 3, 64)
    b = load_prompts("pydoc", tok, 3, 64, offset=3)
    assert len(a) == 3 and all(len(s) == 64 for s in a.sequences)
    assert not set(map(tuple, a.sequences)) & set(map(tuple, b.sequences))
    p = load_prompts("primitives:va_math_d0,copy_real", tok, 4, 4000)
    q = load_prompts("primitives:va_math_d0,copy_real", tok, 4, 4000, offset=2)
    assert len(p) == 4 and not set(map(tuple, p.sequences)) & set(map(tuple, q.sequences))
    from megatron_growloop.eval import primitives

    first = primitives.make_item("va_math_d0", 0)
    assert tok.detokenize(p.sequences[0]) == first.context + first.delimiter + first.answer  # solved prompt
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "short"}\n{"text": "the first long enough document"}\n{"text": "and a second one here"}\n')
    j = load_prompts(str(f), tok, 5, 10)
    assert [tok.detokenize(s) for s in j.sequences] == ["the first ", "and a seco"]
    assert [tok.detokenize(s) for s in load_prompts(str(f), tok, 5, 10, offset=1).sequences] == ["and a seco"]
    with pytest.raises(UsageError):
        load_prompts(str(tmp_path / "missing_prefix"), tok, 2, 16)
