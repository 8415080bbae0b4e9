"""Fine-tuning end to end through ``python -m megatron_growloop.finetune``: a tiny model learns a
trivial task from chance to >= 90 % held-out accuracy, and TP=2 / PP=2 fine-tuning (packed
sequences, block-diagonal masks) reproduces one process."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import read_metrics, run_module

TINY = ["--tokenizer-type", "ByteTokenizer", "--seq-length", "64", "--max-position-embeddings", "128"]


def finetune(args, nproc=1, timeout=600):
    return run_module("megatron_growloop.finetune", args, nproc, timeout)


def _first_letter_task(tmp_path, n_train=500, n_held=100):
    """Prompt ``'bdcae:'``, answer its first letter: five choices (chance 20 %)."""
    rng = random.Random(0)
    words = set()
    while len(words) < n_train + n_held:
        words.add("".join(rng.choice("abcde") for _ in range(5)))
    words = sorted(words)
    rng.shuffle(words)
    path = tmp_path / "first_letter.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{w}:", "answer": w[0]}) + "\n" for w in words[:n_train]))
    return str(path), words[n_train:]


def _accuracy(ckpt, words):
    from megatron_growloop.eval.engine import LogProbEngine
    from megatron_growloop.training.inference import load_model

    model, _, tok = load_model(ckpt)
    engine = LogProbEngine(model, tok)
    choices = "abcde"
    lls = engine.loglikelihood([(f"{w}:", c) for w in words for c in choices])
    right = sum(max(range(5), key=lambda j: lls[5 * i + j]) == choices.index(w[0]) for i, w in enumerate(words))
    return right / len(words)


def test_tiny_model_learns_a_trivial_task_from_chance(tmp_path, dist_1rank):
    """Invariant: fine-tuning (answer-only loss, packed sequences) teaches a freshly initialised
    tiny model a trivial task: held-out accuracy goes from chance (<= 40 %) to >= 90 %."""
    data, held = _first_letter_task(tmp_path)
    common = TINY + ["--sft-data", data, "--micro-batch-size", "8", "--seed", "3"]
    finetune(common + ["--train-iters", "1", "--lr", "0", "--save", tmp_path / "init"])
    finetune(common + ["--pretrained-checkpoint", tmp_path / "init", "--epochs", "10", "--lr", "3e-3",
                       "--lr-warmup-fraction", "0.05", "--save", tmp_path / "tuned", "--metrics-file", tmp_path / "m.jsonl"])
    before = _accuracy(str(tmp_path / "init"), held)
    after = _accuracy(str(tmp_path / "tuned"), held)
    print(f"held-out accuracy before {before:.2f}, after {after:.2f}")
    assert before <= 0.4
    assert after >= 0.9
    meta = json.loads(next((tmp_path / "tuned").glob("iter_*/growloop.json")).read_text())
    assert meta["sft"]["examples"] == 500 and meta["sft"]["packing"] == "pack"
    losses = [r["loss"] for r in read_metrics(tmp_path / "m.jsonl")]
    assert losses[-1] < 0.1 * losses[0]


@pytest.fixture(scope="module")
def parity_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_parity")
    rng = random.Random(1)
    recs = []
    for _ in range(64):
        w = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 20)))
        recs.append(json.dumps({"prompt": f"{w} ->", "answer": " " + w[::-1][:rng.randint(1, 6)]}))
    (d / "d.jsonl").write_text("\n".join(recs) + "\n")
    finetune(TINY + ["--sft-data", d / "d.jsonl", "--train-iters", "1", "--lr", "0", "--save", d / "start"])
    return d


PARITY = ["--train-iters", "4", "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "3e-3", "--seed", "7"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,extra", [
    (1, []),
    (2, ["--tensor-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
], ids=["one-process", "tp2", "pp2"])
def test_sft_tp_pp_match_one_process(parity_setup, tmp_path, nproc, extra):
    """Invariant: packed fine-tuning at TP=2 and PP=2 gives the one-process losses (relative
    2e-5 per step, the pretraining parity tolerance)."""
    d = parity_setup
    common = TINY + PARITY + ["--sft-data", d / "d.jsonl", "--pretrained-checkpoint", d / "start"]
    ref_file = d / "reference.jsonl"
    if not ref_file.exists():
        finetune(common + ["--metrics-file", ref_file])
    reference = [r["loss"] for r in read_metrics(ref_file)]
    m = tmp_path / "m.jsonl"
    finetune(common + extra + ["--metrics-file", m], nproc=nproc)
    losses = [r["loss"] for r in read_metrics(m)]
    assert len(losses) == len(reference) == 4
    for a, b in zip(losses, reference):
        assert a == pytest.approx(b, rel=2e-5), (losses, reference)
    assert reference[-1] < reference[0]


def test_interrupted_finetune_resumes_exactly(parity_setup, tmp_path):
    """``--save X --load X`` with ``--pretrained-checkpoint``: the first launch starts from the
    pretrained weights, a relaunch after an interruption continues from X (iteration, optimizer,
    data position) and reproduces the uninterrupted losses bit for bit."""
    d = parity_setup
    common = TINY + PARITY + ["--sft-data", d / "d.jsonl", "--pretrained-checkpoint", d / "start"]
    finetune(common + ["--metrics-file", tmp_path / "full.jsonl"])
    save = tmp_path / "run"
    finetune(common + ["--save", save, "--load", save, "--exit-interval", "2", "--metrics-file", tmp_path / "a.jsonl"])
    finetune(common + ["--save", save, "--load", save, "--metrics-file", tmp_path / "b.jsonl"])
    full = [r["loss"] for r in read_metrics(tmp_path / "full.jsonl")]
    parts = [r["loss"] for r in read_metrics(tmp_path / "a.jsonl") + read_metrics(tmp_path / "b.jsonl")]
    assert [r["iteration"] for r in read_metrics(tmp_path / "b.jsonl")] == [3, 4]
    assert parts == full


def test_hf_start_fine_tunes_the_converted_weights(tmp_path, monkeypatch):
    """``--hf DIR`` converts the Hugging Face model (once, cached) and fine-tunes its weights
    with the checkpoint's architecture: at LR 0 the saved weights are exactly the converted
    ones (a freshly initialised model would differ), and a second launch reuses the cache."""
    from megatron_growloop.convert.fixtures import write_random_llama
    from megatron_growloop.convert.megatron_io import load_model_tensors

    monkeypatch.setenv("MEGATRON_GROWLOOP_CACHE", str(tmp_path / "cache"))
    hf = write_random_llama(tmp_path / "hf", seed=0)  # 3 layers, GQA, head_dim 24, vocab 300
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{i}=", "answer": str(i % 10)}) + "\n" for i in range(20)))
    common = ["--hf", hf, "--tokenizer-type", "ByteTokenizer", "--sft-data", data, "--seq-length", "32",
              "--micro-batch-size", "2", "--train-iters", "2", "--lr", "0"]
    finetune(common + ["--save", tmp_path / "tuned"])
    converted = list((tmp_path / "cache" / "eval_hf").iterdir())
    assert len(converted) == 1
    ref, got = load_model_tensors(str(converted[0])), load_model_tensors(str(tmp_path / "tuned"))
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k].to(got[k].dtype), got[k]), k
    meta = json.loads(next((tmp_path / "tuned").glob("iter_*/growloop.json")).read_text())
    assert (meta["arch"]["num_layers"], meta["arch"]["kv_channels"]) == (3, 24)
    finetune(common + ["--save", tmp_path / "again"])
    assert list((tmp_path / "cache" / "eval_hf").iterdir()) == converted
