"""Data: preprocessing round trip, the embedded default corpus, blends and the cooldown switch."""

import json
import os
import random

import numpy as np
import pytest
import torch

from conftest import pretrain, read_metrics, run_module
from megatron_growloop.data import default_corpus, synthetic
from megatron_growloop.data.datasets import GlobalBatch, MicroBatchIterator, parse_blend
from megatron_growloop.data.mock import MockDataset
from megatron_growloop.data.preprocess import iter_documents, preprocess
from megatron_growloop.data.tokenizer import ByteTokenizer
from megatron_growloop.errors import UsageError


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def test_preprocess_tool_round_trip(tmp_path):
    """tools/preprocess_data.py writes an indexed dataset whose documents decode to the input + EOD."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = ["hello world", "o=23\nk=3\no=23", "ünïcödé"]
    src = _write_jsonl(tmp_path / "in.jsonl", docs)
    run_module("megatron_growloop.data.preprocess_cli",
               ["--input", src, "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "ByteTokenizer"])
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    tok = ByteTokenizer()
    assert len(ds) == 3
    for i, d in enumerate(docs):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod
        assert tok.detokenize(ids[:-1]) == d


def test_preprocess_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        list(iter_documents([str(tmp_path / "missing.jsonl")]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(UsageError, match="bad.jsonl:2"):
        list(iter_documents([str(bad)]))
    proc = run_module("megatron_growloop.data.preprocess_cli",
                      ["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o"),
                       "--tokenizer-type", "ByteTokenizer"], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing.jsonl" in proc.stderr
    assert not list(tmp_path.glob("o*"))


def test_default_corpus_is_deterministic_and_structured(tmp_path, monkeypatch):
    """The embedded corpus is seeded, contains the paper's task families, and builds once."""
    a = list(default_corpus.generate_documents(200))
    b = list(default_corpus.generate_documents(200))
    assert a == b
    text = "\n".join(a)
    assert any("=" in d and d.splitlines()[-1].split("=")[0] in d.splitlines()[0] + "".join(d.splitlines()[:-1]) for d in a)
    # copying documents repeat a contiguous segment of their word sequence
    copies = [d for d in a if d.endswith(".") and "=" not in d and d[0].islower()]
    assert copies
    # built through the preprocessing path into an indexed dataset, in the cache dir
    monkeypatch.setenv("MEGATRON_GROWLOOP_CACHE", str(tmp_path))
    prefix = default_corpus.default_data_prefix(ByteTokenizer())
    assert prefix.startswith(str(tmp_path))
    assert os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")
    mtime = os.path.getmtime(prefix + ".bin")
    assert default_corpus.default_data_prefix(ByteTokenizer()) == prefix
    assert os.path.getmtime(prefix + ".bin") == mtime  # cached, not rebuilt


def test_assignment_instances_follow_app_d_chains():
    rng = random.Random(0)
    for depth in (0, 1, 2):
        inst = synthetic.assignment_instance(rng, depth)
        assert len(inst.lines) == 5 * (depth + 1)
        env = {}
        for name, val in inst.lines:
            env[name] = env.get(val, val)  # resolve one hop: values are numbers or earlier names
        assert env[inst.query] == inst.answer
        assert inst.answer in inst.values


def test_blend_parsing(tmp_path):
    tok = ByteTokenizer()
    p1 = preprocess(["aaaa"] * 3, str(tmp_path / "a"), tok)
    p2 = preprocess(["bbbb"] * 3, str(tmp_path / "b"), tok)
    assert parse_blend([p1]) == ([p1], None)
    assert parse_blend(["0.8", p1, "0.2", p2]) == ([p1, p2], [0.8, 0.2])
    for bad, msg in [([p1, p2], "WEIGHT"), (["0.8", p1, "0.2"], "pairs"), ([p1 + ".bin"], "prefix"),
                     (["1", str(tmp_path / "nope")], "missing")]:
        with pytest.raises(UsageError, match=msg):
            parse_blend(bad)


def test_microbatch_order_matches_megatron_sampler():
    """Global batch = DP ranks' micro-batches interleaved per micro-step, as Megatron's sampler."""
    s0 = GlobalBatch(2, 8, 2, 0)
    s1 = GlobalBatch(2, 8, 2, 1)
    assert s0.num_microbatches == 2
    assert list(s0.microbatch_indices(16, 0)) == [16, 17]
    assert list(s1.microbatch_indices(16, 0)) == [18, 19]
    assert list(s0.microbatch_indices(16, 1)) == [20, 21]
    covered = sorted(i for s in (s0, s1) for j in range(2) for i in s.microbatch_indices(16, j))
    assert covered == list(range(16, 24))


def test_cooldown_blend_switches_at_iteration(tmp_path):
    """--cooldown-data-path replaces the training blend from --cooldown-start-iter on."""
    tok = ByteTokenizer()
    rng = random.Random(0)
    a = preprocess(["".join(rng.choice("ab") for _ in range(300)) for _ in range(40)], str(tmp_path / "a"), tok)
    b = preprocess(["".join(rng.choice("xyz0123456789") for _ in range(300)) for _ in range(40)],
                   str(tmp_path / "b"), tok)
    m = tmp_path / "m.jsonl"
    pretrain(["--tokenizer-type", "ByteTokenizer", "--train-iters", "8", "--data-path", a,
              "--cooldown-data-path", "1", b, "--cooldown-start-iter", "5", "--lr", "1e-2",
              "--metrics-file", str(m), "--split", "100,0,0"])
    rec = read_metrics(m)
    assert [r["data"] for r in rec] == ["main"] * 5 + ["cooldown"] * 3
    # the model learned the two-letter distribution; the new data is much less predictable
    assert rec[5]["loss"] > rec[4]["loss"] + 0.3


def test_worker_loader_yields_the_in_process_batches_and_counts_what_was_taken():
    """--num-workers reads ahead with Megatron-LM's persistent workers; the batches, their order
    (across the end of a short dataset) and the resumable position are those of the in-process reader."""
    ds = MockDataset(97, 8, seed=3, length=13)  # 13 samples: the 5th global batch of 4 wraps around
    batch = GlobalBatch(micro_batch_size=1, global_batch_size=4, data_parallel_size=2, data_parallel_rank=1)
    plain = MicroBatchIterator(ds, batch, consumed_samples=4)
    workers = MicroBatchIterator(ds, batch, consumed_samples=4, num_workers=2, pin_memory=True)
    for _ in range(11):  # 5.5 global batches of 2 micro-steps each
        a, b = next(plain), next(workers)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert workers.consumed_samples == plain.consumed_samples == 4 + 5 * 4

