"""The focused pretraining corpus: continuation-form documents, evaluation items held out.

Invariants: no held-out evaluation question (with its answer) occurs in the written
training data -- the JSONL and the tokenised indexed dataset; a generated document that
would contain a held-out instance is dropped (shown by forcing the generator to produce
one); the documents use the evaluation's continuation format; the build is deterministic;
bad options are one line.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_growloop.data import synthetic
from megatron_growloop.data.tokenizer import ByteTokenizer, build_tokenizer
from megatron_growloop.eval import cli, corpus, primitives

HELDOUT = corpus.HeldOut(tasks=tuple(primitives.resolve_tasks("copy,va_basic")), seeds=(1, 2), items=40, demos=5)
SPEC = corpus.CorpusSpec(num_documents=600, seed=3)


def _detokenized_documents(prefix: str):
    ds = IndexedDataset(prefix)
    tok = ByteTokenizer()
    return [tok.detokenize(np.asarray(ds[i]).tolist()) for i in range(len(ds))]


def test_no_evaluation_item_occurs_in_the_training_data(tmp_path):
    m = corpus.build_corpus(SPEC, HELDOUT, str(tmp_path / "c"), ByteTokenizer())
    jsonl_texts = corpus.read_corpus_texts(m["jsonl"])
    bin_texts = _detokenized_documents(m["data_prefix"])
    assert bin_texts == jsonl_texts and len(jsonl_texts) == m["total_documents"]
    questions = corpus.heldout_questions(HELDOUT)
    assert len(questions) == 5 * 2 * 40 == m["heldout_questions_checked"]
    blob = "\x00".join(bin_texts)
    assert [q for q in questions if q[3] in blob] == []
    # every test and demo instance of the held-out items is a distinct key
    assert len(corpus.heldout_keys(HELDOUT)) == m["heldout_instances"] == 5 * 2 * 40 * 6


def test_a_document_with_a_held_out_instance_is_dropped(monkeypatch):
    held = corpus.HeldOut(tasks=("va_basic_d1",), seeds=(7,), items=1, demos=0)
    test_instance, _ = primitives.item_instances("va_basic_d1", 0, seed=7, num_demos=0)
    real = synthetic.assignment_instance
    calls = {"n": 0}

    def leaky(rng, depth, **kw):
        calls["n"] += 1
        inst = real(rng, depth, **kw)
        return test_instance if calls["n"] == 5 else inst  # the 5th assignment drawn is the evaluation item

    monkeypatch.setattr(synthetic, "assignment_instance", leaky)
    spec = corpus.CorpusSpec(num_documents=60, seed=1, weights=(("va", 1.0),))
    stats = corpus.CorpusStats()
    texts = [t for _, t in corpus.generate_documents(spec, corpus.heldout_keys(held), stats)]
    assert calls["n"] >= 5 and stats.dropped["va"] == 1 and len(texts) == 59
    question = corpus.heldout_questions(held)[0][3]
    assert corpus.find_heldout_text(texts, held) == []
    # without the filter the item would be in the data, verbatim
    calls["n"] = 0
    unfiltered = [t for _, t in corpus.generate_documents(spec, set(), corpus.CorpusStats())]
    assert any(question in t for t in unfiltered)
    assert corpus.find_heldout_text(unfiltered, held) == [("va_basic_d1", 7, 0)]


def test_documents_use_the_evaluation_continuation_format():
    rng = random.Random(0)
    inst = synthetic.assignment_instance(rng, depth=2)
    text = corpus.render_assignment(inst, random.Random(1), max_queries=3)
    item_like = primitives.get_template("continuation").assignment(inst, corpus.FORMS["basic"])
    assert text.startswith(item_like[0] + item_like[1] + inst.answer)
    values = dict(l.split("=") for l in text.splitlines()[len(inst.lines):])
    last = corpus._last_level(inst)
    assert all(values[n] == v for n, v in last if n in values)  # extra queries are answered correctly
    cinst = synthetic.copy_instance(rng, None, seq_len=10, seg_len=5)
    q = " ".join(list(cinst.sequence) + list(cinst.segment)) + " " + cinst.answer
    assert corpus.render_copy(cinst).startswith(q)


def test_build_is_deterministic_and_cli_writes_the_manifest(tmp_path):
    args = ["corpus", "--num-documents", "50", "--seed", "4", "--heldout-tasks", "copy_random",
            "--heldout-seeds", "1", "--heldout-items", "5"]
    m1 = cli.main(args + ["--out", str(tmp_path / "a")])
    m2 = cli.main(args + ["--out", str(tmp_path / "b")])
    assert m1["jsonl_sha256"] == m2["jsonl_sha256"]
    man = json.loads((tmp_path / "a.manifest.json").read_text())
    assert man["heldout"]["tasks"] == ["copy_random"] and man["total_documents"] == 50


@pytest.mark.parametrize("argv, message", [
    (["--weights", "va=1,poems=2"], "unknown corpus kind 'poems'"),
    (["--weights", "va=x"], "expected KIND=WEIGHT"),
    (["--heldout-tasks", "va_basic_d9"], "unknown reasoning-primitive task"),
    (["--num-documents", "0"], "--num-documents must be >= 1"),
    (["--heldout-seeds", "1,a"], "expected comma-separated integers"),
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["corpus", "--out", str(tmp_path / "c"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not list(tmp_path.iterdir())


def test_trained_bpe_never_merges_across_the_answer_boundary(tmp_path):
    """The evaluation scores ``tok(context + answer)`` split after ``len(tok(context))``
    tokens (engine.py, lm-eval's ``_encode_pair``): with the corpus tokenizer the context's
    tokens are a prefix of the joint tokenisation, so the split is exactly the answer."""
    m = corpus.build_corpus(corpus.CorpusSpec(num_documents=400, seed=2), corpus.HeldOut(),
                            str(tmp_path / "c"), tokenizer_vocab=400)
    tok = build_tokenizer("HuggingFaceTokenizer", m["tokenizer_dir"])
    assert tok.vocab_size <= 400 and m["tokenizer"] == tok.unique_identifiers
    texts = corpus.read_corpus_texts(m["jsonl"])
    bin_ids = [np.asarray(x).tolist() for x in IndexedDataset(m["data_prefix"])]
    assert all(ids[-1] == tok.eod for ids in bin_ids)  # one end-of-document token closes each document
    assert [tok.detokenize(ids[:-1]) for ids in bin_ids] == texts
    checked = 0
    for task in primitives.resolve_tasks("copy,va_basic"):
        for item in primitives.generate_task(task, 20, seed=9, num_fewshot=2, template="continuation"):
            context = item.prompt + item.delimiter
            for choice in item.choices:
                ctx = context.rstrip(" ")
                cont = context[len(ctx):] + choice
                joint, head = tok.tokenize(ctx + cont), tok.tokenize(ctx)
                assert joint[:len(head)] == head, (task, item.index, choice)
                checked += 1
    assert checked > 100
    # an assignment line is ``u=`` (one token), the value, the newline
    assert len(tok.tokenize("u=13\n")) == 3
