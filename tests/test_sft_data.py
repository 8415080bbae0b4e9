"""Fine-tuning data: reading and checking JSONL, tokenisation, packing, masks, and the
primitive-generated training sets (disjoint from the held-out evaluation items)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_growloop.data.packing import PackedSFTDataset, block_causal_mask, pack_rows
from megatron_growloop.data.sft import SFTExample, encode_pair, read_jsonl, tokenize_examples
from megatron_growloop.data.tokenizer import ByteTokenizer
from megatron_growloop.errors import UsageError


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


@pytest.mark.parametrize("bad,line_no,words", [
    ('{"prompt": "a"}', 2, "missing key 'answer'"),
    ('{"answer": "a"}', 2, "missing key 'prompt'"),
    ('{"prompt": "a", "answer": ""}', 2, "empty answer"),
    ('{"prompt": "a", "answer": 3}', 2, "'answer' must be a string"),
    ('{"prompt": "a", "answer": "b"', 2, "not a JSON object"),
    ('["a", "b"]', 2, "expected a JSON object"),
])
def test_bad_jsonl_line_is_named(tmp_path, bad, line_no, words):
    path = _write(tmp_path, ['{"prompt": "x=", "answer": "1"}', bad, '{"prompt": "y=", "answer": "2"}'])
    with pytest.raises(UsageError) as exc:
        read_jsonl(path)
    msg = str(exc.value)
    assert f"{path}:{line_no}:" in msg and words in msg and "\n" not in msg


def test_example_longer_than_context_names_its_line(tmp_path):
    path = _write(tmp_path, ['{"prompt": "ab", "answer": "c"}', '{"prompt": "' + "p" * 30 + '", "answer": "cd"}'])
    tok = ByteTokenizer()
    examples = read_jsonl(path)
    assert len(tokenize_examples(examples, tok, 33)) == 2  # 30 + 2 + EOD - 1 = 32 positions
    with pytest.raises(UsageError, match=rf"{path}:2: prompt \+ answer is longer than the context"):
        tokenize_examples(examples, tok, 31)
    long_answer = [SFTExample("", "x" * 40, f"{path}:7")]
    with pytest.raises(UsageError, match=rf"{path}:7: the answer alone is longer than the context"):
        tokenize_examples(long_answer, tok, 16)


def test_sft_tokenisation_is_the_evaluation_engines():
    """Invariant: a generated example is trained on exactly the tokens the multiple-choice
    evaluation scores for its gold answer (lm-eval's pair encoding), plus the EOD."""
    from megatron_growloop.eval.engine import LogProbEngine
    from megatron_growloop.eval.sft_tasks import sft_examples

    tok = ByteTokenizer()
    engine = LogProbEngine(torch.nn.Linear(1, 1), tok, max_length=4096)
    exs = sft_examples("va_code_d1,copy_random", 6, seed=3, num_fewshot=2, template="continuation")
    for ex, t in zip(exs, tokenize_examples(exs, tok, 4096)):
        ctx, cont = engine.encode_pair(ex.prompt, ex.answer)
        assert list(t.prompt) == ctx and list(t.answer) == cont + [tok.eod]
    assert encode_pair(tok.tokenize, "", "ab", tok.eod) == ([tok.eod], [97, 98])


def _tokenized(lengths, answer_len=2):
    from megatron_growloop.data.sft import TokenizedExample

    out = []
    for i, n in enumerate(lengths):  # n = positions = prompt + answer(+EOD) - 1
        p = n + 1 - answer_len
        out.append(TokenizedExample(tuple(range(10 + i, 10 + i + p)), tuple([200 + i] * (answer_len - 1)) + (256,),
                                    f"ex{i}"))
    return out


def test_packing_places_every_example_once_within_the_sequence_length():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(3, 40, size=200)]
    rows = pack_rows(lengths, 64, "pack")
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= 1.15 * sum(lengths) / 64 + 1  # best-fit decreasing wastes little
    assert pack_rows(lengths, 64, "pad") == [[i] for i in range(200)]


def test_packed_sample_layout():
    """Invariant: within a packed row each example occupies its own contiguous positions with
    inputs tokens[:-1], targets tokens[1:], loss exactly on answer + EOD targets, positions
    restarting at 0, its own segment id; padding (segment 0) has no loss."""
    exs = _tokenized([5, 9, 4, 12, 7], answer_len=3)
    ds = PackedSFTDataset(exs, 32, "pack", seed=1)
    seen = set()
    for r in range(ds.num_sequences):
        s = ds[r]
        seg = s["segment_ids"].numpy()
        for j in range(1, seg.max() + 1):
            pos = np.flatnonzero(seg == j)
            assert (np.diff(pos) == 1).all()
            ex = next(e for e in exs if e.length == len(pos) and e.source not in seen)
            seen.add(ex.source)
            assert s["tokens"][pos].tolist() == list(ex.tokens[:-1])
            assert s["labels"][pos].tolist() == list(ex.tokens[1:])
            assert s["loss_mask"][pos].tolist() == [0.0] * (len(ex.prompt) - 1) + [1.0] * len(ex.answer)
            assert s["position_ids"][pos].tolist() == list(range(len(pos)))
        assert float(s["loss_mask"][seg == 0].sum()) == 0.0
        assert (seg[seg > 0] == seg[: (seg > 0).sum()]).all()  # padding only at the end
    assert len(seen) == len(exs)
    assert ds.stats.loss_tokens == sum(len(e.answer) for e in exs)
    assert "segment_ids" not in PackedSFTDataset(exs, 32, "pad")[0]


def test_block_causal_mask_allows_exactly_earlier_tokens_of_the_same_example():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    m = block_causal_mask(seg)
    assert m.shape == (2, 1, 8, 8) and m.dtype == torch.bool
    for b in range(2):
        for q in range(8):
            for k in range(8):
                allowed = k <= q and seg[b, q] == seg[b, k]
                assert bool(m[b, 0, q, k]) == (not allowed)


def test_epochs_visit_every_sequence_once_in_a_new_order():
    ds = PackedSFTDataset(_tokenized([6] * 40), 16, "pack", seed=5, length=3 * 20)
    n = ds.num_sequences
    assert n == 20 and len(ds) == 60
    orders = [[ds._row(e * n + j) for j in range(n)] for e in range(3)]
    assert all(sorted(o) == list(range(n)) for o in orders)
    assert orders[0] != orders[1]
    again = PackedSFTDataset(_tokenized([6] * 40), 16, "pack", seed=5, length=60)
    assert [again._row(i) for i in range(60)] == [x for o in orders for x in o]


# ------------------------------------------------------------------------- generated data
def test_generated_training_questions_never_are_heldout_questions():
    """Invariant: training items of --sft-tasks never ask a question of the first
    --sft-heldout-items evaluation items (the held-out set), and none is repeated."""
    from megatron_growloop.eval import primitives
    from megatron_growloop.eval.sft_tasks import sft_examples

    for task, fewshot in (("va_code_d1", 0), ("va_code_d2", 0), ("va_basic_d0", 2)):
        train = sft_examples(task, 300, seed=1, num_fewshot=fewshot, heldout_items=400)
        heldout = {primitives.make_item(task, i, 0, fewshot).prompt for i in range(400)}
        questions = [primitives.make_item(task, int(ex.source.split("#")[1]), 1, fewshot,
                                          stream="sft").prompt for ex in train]
        assert len(set(questions)) == len(questions) == 300
        assert not set(questions) & heldout


def test_heldout_filter_removes_colliding_questions(monkeypatch):
    """The filter really filters: when the held-out set contains training questions, those
    are skipped and replaced."""
    from megatron_growloop.eval import primitives, sft_tasks

    plain = sft_tasks.training_items("va_code_d1", 20, 4, 0, "fill_blank", set())
    colliding = {plain[i].prompt for i in (0, 3, 7)}
    filtered = sft_tasks.training_items("va_code_d1", 20, 4, 0, "fill_blank", colliding)
    assert len(filtered) == 20 and not {it.prompt for it in filtered} & colliding
    assert [it.index for it in filtered][:3] == [1, 2, 4]
    monkeypatch.setattr(sft_tasks, "heldout_questions", lambda *a: colliding)
    exs = sft_tasks.sft_examples("va_code_d1", 20, 4)
    assert not {ex.prompt for ex in exs} & colliding
    assert primitives.make_item("va_code_d1", 0, 4, stream="sft").prompt in colliding


def test_generated_examples_equal_shares_seeded():
    from megatron_growloop.eval.sft_tasks import sft_examples

    a = sft_examples("va_code_d1,va_code_d2", 64, seed=0)
    assert [ex.source.split("#")[0] for ex in a].count("va_code_d1") == 32
    assert a == sft_examples("va_code_d1,va_code_d2", 64, seed=0)
    b = sft_examples("va_code_d1,va_code_d2", 64, seed=1)
    assert not {ex.prompt for ex in a} & {ex.prompt for ex in b}
    assert all(ex.answer.strip().isdigit() for ex in a)
    with pytest.raises(UsageError, match="cannot be split equally over the 2 tasks"):
        sft_examples("va_code_d1,va_code_d2", 63, seed=0)
