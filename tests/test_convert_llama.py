"""Conversion of random Llama-family models (in-process, TP=PP=1): Llama-3-style GQA with
untied embeddings, llama3 RoPE scaling and head_dim != hidden/heads; every HF input format;
refusals; looped export and re-import; further training from a converted checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_growloop.convert import hf_to_mcore, mcore_to_hf
from megatron_growloop.convert.fixtures import write_random_llama
from megatron_growloop.convert.megatron_io import load_model_tensors
from megatron_growloop.model.arch import Arch
from megatron_growloop.convert.verify import compare_logits, hf_greedy
from megatron_growloop.errors import UsageError

VOCAB = 300
TOL = 1e-4


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _st(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def llama3(tmp_path_factory, dist_1rank):
    root = tmp_path_factory.mktemp("llama3")
    hf = write_random_llama(root / "hf", seed=0)
    ckpt = hf_to_mcore(str(hf), str(root / "ckpt"), target_tensor_parallel_size=2)
    return SimpleNamespace(root=root, hf=hf, ckpt=ckpt)


def test_llama3_logits_and_greedy_match_transformers(llama3):
    """GQA + untied embeddings + llama3 RoPE scaling + head_dim 24 (hidden 64 / 4 heads = 16): the
    converted model's logits match transformers within 1e-4 relative on 600-token inputs (long
    enough for the scaled low frequencies to matter, checked below), and 32 greedy tokens agree."""
    from megatron_growloop.model.generate import greedy_generate, logits
    from megatron_growloop.training.inference import load_model

    model, meta, tok = load_model(llama3.ckpt)
    assert meta["arch"]["rope_scaling"] and meta["arch"]["kv_channels"] == 24
    assert meta["arch"]["padded_vocab_size"] == 512  # 300 padded to a multiple of 128 x target TP 2
    hf = _hf(llama3.hf)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 600), generator=g)
    with torch.no_grad():
        ref = hf(tokens).logits
    err = compare_logits(logits(model, tokens), ref)
    assert err["max_rel_error"] <= TOL, err
    # The same weights without RoPE scaling give clearly different logits on this input.
    from transformers import LlamaForCausalLM

    cfg = hf.config.to_dict()
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    plain = LlamaForCausalLM(type(hf.config).from_dict(cfg)).eval()
    plain.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert compare_logits(plain(tokens).logits, ref)["max_rel_error"] > 100 * TOL
    prompt = tokens[:1, :16]
    ours = greedy_generate(model, prompt, 32, use_cache=True, vocab_size=VOCAB)
    assert torch.equal(ours, hf_greedy(hf, prompt, 32, VOCAB))


def test_round_trip_is_bitwise_and_loads_in_transformers(llama3):
    """HF -> growloop -> HF reproduces every tensor bitwise (same names, dtypes, values; padding
    removed), and transformers computes identical logits from the exported directory."""
    out = mcore_to_hf(llama3.ckpt, str(llama3.root / "back"))
    a, b = _st(llama3.hf), _st(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["vocab_size"] == VOCAB and cfg["tie_word_embeddings"] is False and "megatron_growloop" not in cfg
    tokens = torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(_hf(out)(tokens).logits, _hf(llama3.hf)(tokens).logits)


@pytest.mark.parametrize("fmt", ["bin", "sharded"])
def test_other_input_formats_give_the_same_checkpoint(llama3, fmt):
    """pytorch_model.bin and sharded safetensors (with index) convert to exactly the same tensors."""
    src = llama3.root / f"hf_{fmt}"
    if fmt == "bin":
        write_random_llama(src, seed=0, safe_serialization=False)
        assert (src / "pytorch_model.bin").exists()
    else:
        write_random_llama(src, seed=0, max_shard_size="100KB")
        assert (src / "model.safetensors.index.json").exists()
    ckpt = hf_to_mcore(str(src), str(llama3.root / f"ckpt_{fmt}"), target_tensor_parallel_size=2)
    a, b = load_model_tensors(llama3.ckpt), load_model_tensors(ckpt)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_loads_into_modules_that_carry_extra_state(llama3):
    """A converted (local-spec) checkpoint records no extra state, but Transformer Engine's modules
    carry some (FP8 metadata in linears, attention and norms; megatron-core builds the final norm
    as TENorm whenever TE imports, even for the local spec).  Such a checkpoint must load into a
    model whose modules expose ``get_extra_state``/``set_extra_state``: stand-in modules here, on
    the final norm and on every layer's attention; each receives None ("nothing recorded")."""
    from megatron_growloop.convert.megatron_io import build_single_rank_model
    from megatron_growloop.training.checkpointing import load_checkpoint

    received = []

    def with_extra_state(module):
        class WithExtraState(type(module)):
            def get_extra_state(self):
                return {"fp8_meta": "recorded"}

            def set_extra_state(self, state):
                received.append(state)

        module.__class__ = WithExtraState

    meta = json.loads((Path(llama3.ckpt) / "growloop.json").read_text())
    model = build_single_rank_model(Arch.from_meta(meta["arch"]))
    with_extra_state(model.decoder.final_layernorm)
    for layer in model.decoder.layers:
        with_extra_state(layer.input_layernorm)
    requested = [k for k in model.sharded_state_dict() if k.endswith("._extra_state")]
    assert "decoder.final_layernorm._extra_state" in requested
    assert "decoder.layers.0.input_layernorm._extra_state" in requested
    load_checkpoint(llama3.ckpt, [model], load_rng=False)
    assert received == [None] * (1 + meta["arch"]["num_layers"])


# ------------------------------------------------------------------------------ refusals
def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(d: Path, fn):
    from safetensors.torch import save_file

    sd = fn(_st(d))
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


BREAKERS = {
    "no config.json": (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
    "missing shard": (lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})), "missing shard"),
    "missing tensor": (lambda d: _rewrite_tensors(d, lambda sd: {k: v for k, v in sd.items()
                                                                 if k != "model.layers.1.mlp.up_proj.weight"}),
                       "model.layers.1.mlp.up_proj.weight is missing"),
    "attention bias tensor": (lambda d: _rewrite_tensors(d, lambda sd: dict(sd, **{
        "model.layers.0.self_attn.q_proj.bias": torch.zeros(96)})), "biases are not supported"),
    "mismatched shape": (lambda d: _edit_config(d, intermediate_size=128), "has shape"),
    "non-Llama architecture": (lambda d: _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                               "unsupported architecture"),
    "attention_bias config": (lambda d: _edit_config(d, attention_bias=True), "attention_bias"),
    "yarn rope": (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
                  "yarn"),
    "quantized": (lambda d: _edit_config(d, quantization_config={"quant_method": "gptq"}), "quantized"),
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_unsupported_inputs_fail_in_one_line_and_write_nothing(llama3, tmp_path, case):
    """Each broken or unsupported input raises a one-line UsageError naming the problem, and
    neither the output directory nor any temporary sibling is left behind."""
    src = tmp_path / "src"
    shutil.copytree(llama3.hf, src)
    breaker, needle = BREAKERS[case]
    breaker(src)
    out = tmp_path / "out"
    with pytest.raises(UsageError) as exc:
        hf_to_mcore(str(src), str(out))
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_paths_and_existing_output(llama3, tmp_path):
    """Missing paths, non-GGUF files and a non-empty --out are refused without writing."""
    for bad, needle in [(tmp_path / "nope", "does not exist"), (llama3.hf / "config.json", "not a .gguf")]:
        with pytest.raises(UsageError, match=needle):
            hf_to_mcore(str(bad), str(tmp_path / "out"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(UsageError, match="already exists"):
        hf_to_mcore(str(llama3.hf), str(tmp_path / "full"))
    with pytest.raises(UsageError, match="already exists"):
        mcore_to_hf(llama3.ckpt, str(tmp_path / "full"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert (tmp_path / "full" / "x").read_text() == "keep"


def test_cli_error_is_one_line_exit_2(llama3, tmp_path):
    """The CLI prints 'megatron_growloop.convert: error: ...' (one line), exits 2, writes nothing."""
    src = tmp_path / "src"
    shutil.copytree(llama3.hf, src)
    _edit_config(src, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    from conftest import run_module

    proc = run_module("megatron_growloop.convert", ["hf-to-mcore", "--hf", src, "--out", tmp_path / "out"],
                      check=False, timeout=300)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("megatron_growloop.convert: error: unsupported architecture"), proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ looped models
LOOP = "1-2x3-1"


@pytest.fixture(scope="module")
def looped(tmp_path_factory, dist_1rank):
    """A random tied looped model Loop(1-2x3-1) (4 unique layers, effective depth 8) saved by
    megatron_growloop's own checkpointing, with a ByteTokenizer vocabulary (257 -> 384 padded)."""
    from megatron_growloop.model.gpt import build_inference_model
    from megatron_growloop.training.checkpointing import save_checkpoint

    root = tmp_path_factory.mktemp("looped")
    arch = Arch(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                kv_channels=16, seq_length=64, max_position_embeddings=256, rotary_base=10000.0,
                norm_epsilon=1e-5, init_method_std=0.02, padded_vocab_size=384, loop=LOOP)
    torch.manual_seed(3)
    model = build_inference_model(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    save_checkpoint(str(root / "ckpt"), 0, [model],
                    metadata={"arch": arch.to_meta(), "tokenizer": {"type": "ByteTokenizer", "model": None, "vocab_size": 257}})
    return SimpleNamespace(root=root, ckpt=str(root / "ckpt"))


def _ours_logits(ckpt, tokens, **kw):
    from megatron_growloop.model.generate import logits
    from megatron_growloop.training.inference import load_model

    model, _, _ = load_model(ckpt, **kw)
    return logits(model, tokens)


def test_looped_export_unrolls_and_reimport_restores_the_loop(looped):
    """A looped model exports as its unrolled 8-layer Llama (transformers computes the same
    logits), records the loop in config.json, and re-imports as the tied 4-layer loop with
    bitwise-identical weights (vocabulary padding rows are re-created as zeros)."""
    hf_dir = mcore_to_hf(looped.ckpt, str(looped.root / "hf"))
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8 and cfg["vocab_size"] == 257 and cfg["tie_word_embeddings"] is True
    assert cfg["megatron_growloop"] == {"format_version": 1, "loop": LOOP, "num_unique_layers": 4,
                                        "schedule": [0, 1, 2, 1, 2, 1, 2, 3]}
    tokens = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(4))
    hf = _hf(hf_dir)
    with torch.no_grad():
        ref = hf(tokens).logits
    assert compare_logits(_ours_logits(looped.ckpt, tokens), ref)["max_rel_error"] <= TOL
    back = hf_to_mcore(hf_dir, str(looped.root / "reimported"))
    meta = json.loads((Path(back) / "growloop.json").read_text())
    assert meta["arch"]["loop"] == LOOP and meta["arch"]["num_layers"] == 4
    a, b = load_model_tensors(looped.ckpt), load_model_tensors(back)
    assert set(a) == set(b)
    for k in a:
        if k == "embedding.word_embeddings.weight":
            assert torch.equal(a[k][:257], b[k][:257]) and not b[k][257:].any()
        else:
            assert torch.equal(a[k], b[k]), k


def test_looped_export_with_other_k(looped):
    """--loop-repeats exports another k: 6 HF layers equal to the model run with k=2."""
    hf_dir = mcore_to_hf(looped.ckpt, str(looped.root / "hf_k2"), loop_repeats=2)
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and cfg["megatron_growloop"]["loop"] == "1-2x2-1"
    tokens = torch.randint(0, 257, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = _hf(hf_dir)(tokens).logits
    assert compare_logits(_ours_logits(looped.ckpt, tokens, loop_repeats=2), ref)["max_rel_error"] <= TOL


def test_modified_unrolled_copies_are_refused_unless_ignore_loop(looped, tmp_path):
    """If a repeated copy was changed (e.g. fine-tuned in HF), re-import refuses to re-tie the loop
    and writes nothing; --ignore-loop imports the 8 layers as an ordinary model."""
    src = tmp_path / "hf"
    shutil.copytree(mcore_to_hf(looped.ckpt, str(looped.root / "hf_tamper")), src)
    _rewrite_tensors(src, lambda sd: dict(sd, **{
        "model.layers.3.mlp.down_proj.weight": sd["model.layers.3.mlp.down_proj.weight"] * 1.01}))
    with pytest.raises(UsageError, match="differs from layer 1"):
        hf_to_mcore(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    plain = hf_to_mcore(str(src), str(tmp_path / "plain"), ignore_loop=True)
    meta = json.loads((Path(plain) / "growloop.json").read_text())
    assert meta["arch"]["loop"] is None and meta["arch"]["num_layers"] == 8
    tokens = torch.randint(0, 257, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = _hf(src)(tokens).logits
    assert compare_logits(_ours_logits(plain, tokens), ref)["max_rel_error"] <= TOL


# ------------------------------------------------------------------------------ training
def test_resume_without_checkpoint_args_names_the_mismatch(llama3, dist_1rank):
    """Loading a converted checkpoint with a mismatching architecture is a one-line error that
    points at --use-checkpoint-args, instead of a silently wrong model."""
    from megatron_growloop.training.arguments import parse_args
    from megatron_growloop.training.trainer import Trainer

    launch = parse_args(["--load", llama3.ckpt, "--mock-data", "--vocab-size", "300", "--hidden-size", "64",
                         "--num-attention-heads", "4", "--num-query-groups", "2", "--ffn-hidden-size", "96",
                         "--num-layers", "3"], world_size=1)
    with pytest.raises(UsageError, match="kv_channels=24.*--use-checkpoint-args"):
        Trainer(launch)
    args = parse_args(["--load", llama3.ckpt, "--use-checkpoint-args", "--mock-data", "--vocab-size", "300"],
                      world_size=1).args
    assert (args.kv_channels, args.rope_scaling, args.untie_embeddings_and_output_weights) == (24, True, True)
    assert (args.rotary_base, args.num_layers, args.norm_epsilon) == (500000.0, 3, 1e-5)


def test_pretrain_continues_from_converted_checkpoint(llama3, tmp_path):
    """`pretrain --use-checkpoint-args --load CONVERTED` trains the converted weights with a fresh
    optimizer: with lr 0 the weights after two steps (bf16 + distributed optimizer, whose fp32
    main params must be refreshed from the loaded weights) equal the converted ones in bf16."""
    from conftest import pretrain

    save = tmp_path / "run"
    proc = pretrain(["--use-checkpoint-args", "--load", llama3.ckpt, "--mock-data", "--vocab-size", "300",
                     "--lr", "0", "--train-iters", "2", "--seq-length", "64", "--micro-batch-size", "2",
                     "--log-interval", "1", "--bf16", "--use-distributed-optimizer", "--save", str(save)])
    assert "done: 2 iterations" in proc.stdout
    a, b = load_model_tensors(llama3.ckpt), load_model_tensors(str(save))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].to(b[k].dtype), b[k]), k


@pytest.mark.slow
def test_llama3_tensor_parallel_2(llama3, tmp_path):
    """The converted Llama-3-style checkpoint (GQA 4/2 heads, untied, RoPE scaling) at TP=2:
    logits within 1e-4 of transformers on a 600-token and a short input, 32 greedy tokens equal."""
    from conftest import run_module

    g = torch.Generator().manual_seed(7)
    long_ids = ",".join(map(str, torch.randint(0, VOCAB, (600,), generator=g).tolist()))
    short_ids = ",".join(map(str, torch.randint(0, VOCAB, (12,), generator=g).tolist()))
    run_module("megatron_growloop.convert", ["verify", "--hf", llama3.hf, "--load", llama3.ckpt,
                                             "--tensor-model-parallel-size", 2, "--token-prompt", long_ids,
                                             "--token-prompt", short_ids, "--new-tokens", 32,
                                             "--json", tmp_path / "r.json"], nproc=2, timeout=900)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tp"] == 2 and report["max_rel_error"] <= TOL and report["all_tokens_equal"], report
