"""Data (issue 14): indexed data sets are validated before training, no split can loop forever,
and preprocessing is atomic, names undecodable lines and never tokenizes a null text."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import read_metrics
from reliability_util import TINY, assert_one_line_error, overwrite, run

from megatron_growloop.data import validate
from megatron_growloop.data.preprocess import preprocess, remove_stale_temporaries
from megatron_growloop.data.tokenizer import ByteTokenizer
from megatron_growloop.errors import UsageError

PRE = "megatron_growloop.pretrain"
PREP = "megatron_growloop.data.preprocess_cli"


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "x=3", "y=x", "print(y)"]
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) for _ in range(n)]


def _dataset(tmp_path, n=400, name="d"):
    return preprocess(_docs(n), str(tmp_path / name), ByteTokenizer())


# ------------------------------------------------------------------------------ index/bin checks
def _header(prefix):
    with open(prefix + ".idx", "rb") as f:
        return f.read(34)


CORRUPT = {
    "truncated .idx": (lambda p: os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 40), "is truncated"),
    "tiny .idx": (lambda p: os.truncate(p + ".idx", 20), "the index header alone"),
    "bad magic": (lambda p: overwrite(__import__("pathlib").Path(p + ".idx"), 0, 4), "not a Megatron index file"),
    "bad dtype code": (lambda p: overwrite(__import__("pathlib").Path(p + ".idx"), 17, 1, 99), "unknown token dtype"),
    "sequence count too large": (
        lambda p: overwrite(__import__("pathlib").Path(p + ".idx"), 18, 1, 0xFF), "needs"),
    "truncated .bin": (lambda p: os.truncate(p + ".bin", os.path.getsize(p + ".bin") // 2), ".bin is truncated"),
    "longer .bin": (lambda p: open(p + ".bin", "ab").write(b"\0" * 64), "longer than its index"),
    "garbled .bin": (lambda p: overwrite(__import__("pathlib").Path(p + ".bin"), 100, 256, 0xFF),
                     "outside the tokenizer's vocabulary of 257"),
    "garbled lengths": (lambda p: overwrite(__import__("pathlib").Path(p + ".idx"), 34 + 8, 4, 0x7F),
                        "does not follow from the lengths"),
    "missing .bin": (lambda p: os.remove(p + ".bin"), ".bin is missing"),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_corrupt_indexed_dataset_is_one_line(tmp_path, kind):
    prefix = _dataset(tmp_path)
    damage, needle = CORRUPT[kind]
    damage(prefix)
    with pytest.raises(UsageError, match=None) as err:
        validate.validate_indexed_dataset(prefix, vocab_size=257)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_intact_dataset_passes(tmp_path):
    prefix = _dataset(tmp_path)
    info = validate.validate_indexed_dataset(prefix, vocab_size=257)
    assert info.documents == 400 and info.sequences == 400 and info.dtype == "uint16"
    assert info.tokens == sum(len(d.encode()) + 1 for d in _docs(400))


def test_pretrain_on_a_truncated_bin_is_one_line_and_writes_nothing(tmp_path):
    prefix = _dataset(tmp_path)
    os.truncate(prefix + ".bin", 1000)
    save = tmp_path / "save"
    proc = run(PRE, TINY + ["--train-iters", "2", "--data-path", prefix, "--save", save])
    assert_one_line_error(proc, PRE, prefix + ".bin is truncated")
    assert not save.exists(), "no tensorboard/ or anything else in --save"


def test_garbled_tokens_outside_the_scanned_windows_are_caught_when_read(tmp_path, monkeypatch, dist_1rank):
    """A .bin larger than the scan budget is checked in windows; a garbled region elsewhere is
    caught when its sample is read (one line), not fed to the embedding."""
    from megatron_growloop.data.datasets import build_gpt_datasets

    prefix = _dataset(tmp_path, 2000)
    monkeypatch.setattr(validate, "VOCAB_SCAN_BYTES", 64 * 2)  # 64 windows of one token
    overwrite(__import__("pathlib").Path(prefix + ".bin"), 1000, 20, 0xFF)  # tokens 500..509: between windows
    train, _, _ = build_gpt_datasets(([prefix], None), ByteTokenizer(), 32, [2000, 0, 0], "100,0,0", 1, None)
    with pytest.raises(UsageError, match="outside the tokenizer's vocabulary"):
        for i in range(len(train)):
            train[i]


# ------------------------------------------------------------------------------ splits
def test_400_documents_with_the_default_split_train(tmp_path):
    """The issue's case: 400 documents, --split 969,30,1 -- the test split gets no document.
    It used to hang in megatron-core's _get_num_epochs; now the unused split is not built."""
    prefix = _dataset(tmp_path)
    metrics = tmp_path / "m.jsonl"
    proc = run(PRE, TINY + ["--train-iters", "2", "--data-path", prefix, "--eval-interval", "1", "--eval-iters", "1",
                            "--metrics-file", metrics], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["iteration"] for r in read_metrics(metrics)] == [1, 2]
    assert "validation at iteration 2" in proc.stdout


def test_too_small_split_names_split_documents_and_minimum(tmp_path, dist_1rank):
    from megatron_growloop.data.datasets import build_gpt_datasets

    prefix = _dataset(tmp_path, 40)
    with pytest.raises(UsageError) as err:
        build_gpt_datasets(([prefix], None), ByteTokenizer(), 32, [8, 8, 0], "969,30,1", 1, None)
    msg = str(err.value)
    assert "the valid split" in msg and "of its 40 documents" in msg and "--seq-length + 1 = 33" in msg
    # an empty split nobody asks samples of is fine
    train, valid, test = build_gpt_datasets(([prefix], None), ByteTokenizer(), 32, [8, 0, 0], "969,30,1", 1, None)
    assert len(train) >= 8 and valid is None and test is None


@pytest.mark.parametrize("split", ["a,b", "1,2,3,4", "-1,2,0", "0,0,0"])
def test_bad_split_strings(tmp_path, split):
    with pytest.raises(UsageError, match="--split"):
        validate.split_matrix(split)


def test_pretrain_with_a_too_small_data_set_is_one_line(tmp_path):
    prefix = _dataset(tmp_path, 3)
    proc = run(PRE, TINY + ["--train-iters", "2", "--data-path", prefix, "--seq-length", "128"], timeout=240)
    assert_one_line_error(proc, PRE, "train split", "of its 3 documents", "129")


# ------------------------------------------------------------------------------ preprocessing
def _prep(tmp_path, inputs, *extra):
    return run(PREP, ["--input", *inputs, "--output-prefix", tmp_path / "out", "--tokenizer-type", "ByteTokenizer",
                      *extra])


def test_non_utf8_input_is_one_line_with_file_and_line_and_leaves_nothing(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    proc = _prep(tmp_path, [src])
    assert_one_line_error(proc, "preprocess_data.py", f"{src}:2", "not valid utf-8", "--encoding")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    proc = _prep(tmp_path, [src], "--encoding", "latin-1")
    assert proc.returncode == 0, proc.stderr
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ByteTokenizer().detokenize(ds[1].tolist()[:-1]) == "café"


def test_null_and_empty_texts_are_counted_and_never_tokenized(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in ["a b", None, "", "  ", "c"]) + "\n")
    proc = _prep(tmp_path, [src])
    assert proc.returncode == 0, proc.stderr
    assert "2 documents" in proc.stdout and "skipped 1 null and 2 empty texts under 'text'" in proc.stdout
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    tok = ByteTokenizer()
    assert [tok.detokenize(ds[i].tolist()[:-1]) for i in range(len(ds))] == ["a b", "c"]
    for p in tmp_path.glob("out*"):
        p.unlink()
    proc = _prep(tmp_path, [src], "--empty-texts", "error")
    assert_one_line_error(proc, "preprocess_data.py", f"{src}:2", "'text' is null")
    assert not list(tmp_path.glob("out*"))


def test_non_string_text_is_refused(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": 3}) + "\n")
    proc = _prep(tmp_path, [src])
    assert_one_line_error(proc, "preprocess_data.py", f"{src}:2", "JSON int")
    assert not list(tmp_path.glob("out*"))


def test_failure_in_a_later_json_key_leaves_nothing(tmp_path):
    """With several --json-keys, nothing is renamed into place until every key succeeded."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "a", "code": "b"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    proc = _prep(tmp_path, [src], "--json-keys", "text", "code")
    assert_one_line_error(proc, "preprocess_data.py", f"{src}:2", "no key 'code'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_temporaries_of_a_killed_run_are_removed(tmp_path):
    prefix = str(tmp_path / "out_text_document")
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    for ext in (".bin", ".idx"):
        open(f"{prefix}.tmp{p.pid}{ext}", "wb").close()
    open(f"{prefix}.tmp{os.getpid()}.bin", "wb").close()  # a live writer's file stays
    assert sorted(os.path.basename(x) for x in remove_stale_temporaries(prefix)) == \
        [f"out_text_document.tmp{p.pid}.bin", f"out_text_document.tmp{p.pid}.idx"]
    assert os.path.exists(f"{prefix}.tmp{os.getpid()}.bin")
