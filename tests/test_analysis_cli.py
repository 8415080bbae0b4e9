"""``python -m megatron_growloop.analysis``: every analysis end to end on a tiny trained checkpoint
(numbers + non-empty PNG figures), the sweeps reachable from the same CLI, ``compare``, and
one-line usage errors that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import pretrain, run_module
from megatron_growloop.analysis.cli import main

MOD = "megatron_growloop.analysis"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_ok(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis_cli")
    pretrain(["--tokenizer-type", "ByteTokenizer", "--train-iters", "4", "--log-interval", "4",
              "--max-position-embeddings", "2048", "--micro-batch-size", "2", "--loop", "1-2x2-1",
              "--save", root / "loop"])
    lam = root / "lambada.jsonl"
    lam.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                           ["the cat sat on the mat", "one two three four", "a b c d e f g h"]))
    return root


@pytest.fixture(scope="module")
def all_out(ckpt):
    """``all --with-sweeps`` on the looped checkpoint (shared by the tests that read its results)."""
    out = ckpt / "all"
    lens_text = ckpt / "lens.jsonl"
    lens_text.write_text("".join(json.dumps({"text": "x=%d\ny=x\ny=%d and some more text" % (i, i)}) + "\n"
                                 for i in range(6)))
    run_module(MOD, ["all", "--load", ckpt / "loop", "--out", out, "--num-prompts", "3", "--seq-len", "40",
                     "--num-splits", "2", "--lens-steps", "2", "--lens-prompts", "3", "--lens-data", lens_text,
                     "--task", "va_basic_d0", "--task-items", "2", "--num-fewshot", "1",
                     "--swap-task", f"lambada:{ckpt / 'lambada.jsonl'}", "--swap-items", "3", "--swap-widths", "1",
                     "--with-sweeps", "--tasks", "va_basic_d0", "--limit", "2", "--block-size", "2",
                     "--repeats", "1,2", "--sweep-fewshot", "1", "--shots", "0,1"])
    return out


def test_all_writes_numbers_and_figures(ckpt, all_out):
    """``all --with-sweeps`` runs the five analyses and both sweeps on a looped checkpoint and writes
    JSON + NPZ + a non-empty PNG for each, the tuned lens and a summary; noise floors are 0 in fp32."""
    out = all_out
    lens_text = ckpt / "lens.jsonl"
    for kind in ("depth_score", "lens", "norms", "local_effects", "swap"):
        assert (out / f"{kind}.json").exists() and (out / f"{kind}.npz").exists(), kind
        assert _png_ok(out / f"{kind}.png"), kind
        d = json.loads((out / f"{kind}.json").read_text())
        assert d["kind"] == kind and d["model"]["schedule"] == [0, 1, 2, 1, 2, 3]
        assert d["model"]["boundaries"] == [1, 3, 5]
    for kind in ("repeat_sweep", "icl_sweep"):
        assert (out / f"{kind}.json").exists() and _png_ok(out / f"{kind}.png"), kind
    s = json.loads((out / "summary.json").read_text())
    assert s["depth_score"]["noise_floor"] == {"output": 0.0, "layer": 0.0}
    assert s["local_effects"]["noise_floor"] == 0.0
    assert s["swap"]["noise_floor"] == 0.0
    assert 0.0 <= s["depth_score"]["depth_score"] <= 5.0
    assert (out / "tuned_lens" / "params.pt").exists()
    lens = json.loads((out / "lens.json").read_text())
    assert len(lens["arrays"]["tuned_kl"]) == 6 and lens["config"]["lens_fit"]["steps"] == 2
    assert lens["config"]["lens_fit"]["prompts"]["source"] == str(lens_text)
    swap = json.loads((out / "swap.json").read_text())
    assert swap["config"]["task"] == "lambada" and len(swap["arrays"]["acc_w1"]) == 5


def test_single_analyses_reuse_a_lens_and_compare(ckpt, all_out):
    """A subset of analyses on another prompt source and loop count; a saved lens is reused;
    ``compare`` overlays the two result directories (models of different effective depth)."""
    out2 = ckpt / "k3"
    run_module(MOD, ["all", "--skip", "depth-score,lens,swap", "--load", ckpt / "loop", "--loop-repeats", "3",
                     "--out", out2, "--data", "primitives:va_basic_d0,copy_real", "--num-prompts", "2",
                     "--seq-len", "48", "--mode", "current"])
    assert not (out2 / "depth_score.json").exists() and (out2 / "norms.json").exists()
    d = json.loads((out2 / "local_effects.json").read_text())
    assert len(d["arrays"]["effect_max"]) == 8 and d["config"]["mode"] == "current"
    out1 = all_out
    out3 = ckpt / "lens_again"
    run_module(MOD, ["lens", "--load", ckpt / "loop", "--out", out3, "--lens-load", out1 / "tuned_lens",
                     "--num-prompts", "2", "--seq-len", "40", "--task-items", "2", "--num-fewshot", "1",
                     "--task", "va_basic_d0"])
    a = json.loads((out3 / "lens.json").read_text())
    assert a["config"]["lens_loaded_from"] == str(out1 / "tuned_lens")
    cmp = ckpt / "cmp"
    main(["compare", str(out1), str(out2), "--labels", "k=2,k=3", "--normalize-depth", "--out", str(cmp)])
    for kind in ("depth_score", "lens", "norms", "local_effects", "swap"):
        assert _png_ok(cmp / f"compare_{kind}.png"), kind
    summary = json.loads((cmp / "compare.json").read_text())["summary"]
    assert set(summary) == {"k=2", "k=3"}


@pytest.mark.parametrize("argv, needle", [
    (["depth-score", "--load", "X", "--out", "{out}", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["lens", "--load", "X", "--out", "{out}", "--task", "nope"], "unknown reasoning-primitive task 'nope'"),
    (["swap", "--load", "X", "--out", "{out}", "--swap-task", "lambada:/no/such.jsonl"], "no such file"),
    (["all", "--load", "X", "--out", "{out}", "--skip", "bogus"], "unknown analyses"),
    (["swap", "--load", "X", "--out", "{out}", "--swap-task", "lambada:{lam}", "--swap-metric", "acc_norm"],
     "LAMBADA reports acc only"),
    (["swap", "--load", "X", "--out", "{out}", "--swap-positions", "5:2"], "START:STOP"),
    (["swap", "--load", "X", "--out", "{out}", "--swap-widths", "1,x"], "comma-separated integers"),
    (["depth-score", "--load", "/no/such/ckpt", "--out", "{out}"], "/no/such/ckpt"),
    (["compare", "/no/such/dir", "--out", "{out}"], "is not a directory"),
])
def test_usage_errors_are_one_line_and_write_nothing(argv, needle, tmp_path, capsys):
    """Bad input exits 2 with ``prog: error: ...`` on one line and leaves --out untouched."""
    out = tmp_path / "out"
    lam = tmp_path / "lam.jsonl"
    lam.write_text('{"text": "a b c"}\n')
    with pytest.raises(SystemExit) as exc:
        main([a.replace("{out}", str(out)).replace("{lam}", str(lam)) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{MOD}: error:") and needle in err and "\n" not in err
    assert not out.exists()


@pytest.mark.slow
def test_tensor_parallel_gives_the_same_numbers(ckpt):
    """Under torchrun with TP=2 (residual stream replicated, logits gathered) the depth score, local
    effects and norms equal the single-process numbers up to float reduction order."""
    import numpy as np

    args = ["all", "--skip", "lens,swap", "--load", ckpt / "loop", "--num-prompts", "2", "--seq-len", "40",
            "--num-splits", "2"]
    run_module(MOD, args + ["--out", ckpt / "tp1"])
    run_module(MOD, args + ["--out", ckpt / "tp2", "--tensor-model-parallel-size", "2"], nproc=2)
    for kind, keys in (("depth_score", ("output_effect", "layer_effect_max")), ("local_effects", ("effect_max",)),
                       ("norms", ("resid_mean", "attn_rel_mean", "mlp_rel_max"))):
        a = np.load(ckpt / "tp1" / f"{kind}.npz")
        b = np.load(ckpt / "tp2" / f"{kind}.npz")
        for k in keys:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=f"{kind}.{k}")
