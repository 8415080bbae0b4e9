"""Grown -> looped: ``convert grown-to-looped`` ties the copies depth growth made of one block
(found through the checkpoint's lineage) into the recurrent block of a ``Loop(e-L×k-d)``.

Invariants: right after a growth step (all copies equal) the looped model's logits equal the
grown model's, for every tie; after further training the tie changes the function and the
report states by how much (logit distance to the untied model, which the test recomputes);
the output is an ordinary looped checkpoint (inference loading, HF export and re-import,
training with randomized k); refusals are one line and write nothing.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import pretrain, run_module

GROW = ["--tokenizer-type", "ByteTokenizer", "--seq-length", "32", "--micro-batch-size", "2", "--log-interval", "3",
        "--train-iters", "6", "--grow-method", "lidas", "--grow-final-layers", "8", "--grow-iters", "6", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """LIDAS 4 -> 8 (B=4) after iteration 2, trained to iteration 6; lineage roots
    [0 1 0 1 2 3 2 3]: blocks 0:4 and 4:8 are two copies of two layers each."""
    d = tmp_path_factory.mktemp("grown")
    pretrain(GROW + ["--save", d / "ck", "--grow-dump-dir", d / "dump"])
    pretrain(["--tokenizer-type", "ByteTokenizer", "--seq-length", "32", "--train-iters", "1", "--save", d / "plain"])
    return d


def _logits(ckpt, tokens):
    from megatron_growloop.model.generate import logits
    from megatron_growloop.training.inference import load_model

    model, _, _ = load_model(str(ckpt), tokenizer=False)
    return logits(model, tokens)


def _tokens():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("block", ["0:4", "4:8"])
@pytest.mark.parametrize("tie", ["mean", "first", "source"])
def test_logits_equal_right_after_growth(dist_1rank, grown, tmp_path, block, tie):
    from megatron_growloop.convert.grown_to_looped import grown_to_looped

    fresh = grown / "dump" / "step_1"
    r = grown_to_looped(str(fresh), str(tmp_path / "looped"), block, tie)
    assert r["copies"] == 2 and r["block_layers"] == 2
    assert r["probe"]["max_abs_logit_diff"] == 0.0 and r["probe"]["top1_agreement"] == 1.0
    tokens = _tokens()
    assert torch.equal(_logits(tmp_path / "looped", tokens), _logits(fresh, tokens))
    meta = json.load(open(tmp_path / "looped" / "iter_0000000" / "growloop.json"))
    assert meta["arch"]["loop"] == {"0:4": "0-2x2-4", "4:8": "4-2x2-0"}[block]
    assert meta["arch"]["num_layers"] == 6


def test_after_training_the_tie_is_reported_as_a_logit_distance(dist_1rank, grown, tmp_path):
    from megatron_growloop.convert.grown_to_looped import grown_to_looped, logit_distance

    trained = grown / "ck"
    tokens = _tokens()
    untied = _logits(trained, tokens)
    reports = {}
    for tie in ("mean", "first", "source"):
        out = tmp_path / tie
        reports[tie] = grown_to_looped(str(trained), str(out), "0:4", tie)
        looped = _logits(out, tokens)
        d = logit_distance(untied, looped, 256)
        assert d["max_abs_logit_diff"] > 0 and d["kl_grown_to_looped"] > 0  # the copies have diverged
        recorded = json.load(open(out / "iter_0000000" / "growloop.json"))["tied_from"]["probe"]
        assert recorded == reports[tie]["probe"] and recorded["max_abs_logit_diff"] > 0
    # lineage born [[0, 1], [0, 1]]: the copy closest to the source is the first one
    assert reports["source"]["layer_sources"] == reports["first"]["layer_sources"] == [[0], [1], [4], [5], [6], [7]]
    assert reports["mean"]["layer_sources"][:2] == [[0, 2], [1, 3]]
    assert reports["source"]["probe"] == reports["first"]["probe"] != reports["mean"]["probe"]


def test_cli_report_and_accounting(dist_1rank, grown, tmp_path):
    out = tmp_path / "looped"
    proc = run_module("megatron_growloop.convert", ["grown-to-looped", "--load", grown / "ck", "--block", "4:8",
                                                    "--tie", "mean", "--repeats", "3", "--out", out,
                                                    "--json", tmp_path / "r.json"])
    assert "tied layers 4:8 (2 copies of 2 layers" in proc.stdout and "Loop(4-2x3-0)" in proc.stdout
    assert "logits vs the grown (untied) model" in proc.stdout
    meta = json.load(open(out / "iter_0000000" / "growloop.json"))
    src = json.load(open(grown / "ck" / "iter_0000006" / "growloop.json"))
    from megatron_growloop.training.inference import load_model

    model, _, _ = load_model(str(out), tokenizer=False)
    acc = meta["accounting"]
    assert acc["unique_parameters"] == sum(p.numel() for p in model.parameters())
    assert acc["unique_layers"] == 6 and acc["effective_depth"] == 10 == model.effective_depth
    assert acc["unique_parameters"] < src["accounting"]["unique_parameters"]
    assert meta["training_flops"] == src["training_flops"] and meta["tokens"] == src["tokens"]
    assert meta["lineage"] == [{"root": r, "born": b} for r, b in zip([0, 1, 0, 1, 2, 3], [0, 0, 1, 1, 0, 0])]
    assert json.load(open(tmp_path / "r.json"))["loop"] == "4-2x3-0"


def test_looped_checkpoint_is_an_ordinary_one(dist_1rank, grown, tmp_path):
    """HF export unrolls it with the loop record and re-import restores the tied model; the
    generation CLI runs it at another k; training loads it (fresh optimizer) and runs with
    randomized k."""
    from megatron_growloop.convert import hf_to_mcore, mcore_to_hf
    from megatron_growloop.convert.grown_to_looped import grown_to_looped

    grown_to_looped(str(grown / "ck"), str(tmp_path / "looped"), "0:4", "mean")
    mcore_to_hf(str(tmp_path / "looped"), str(tmp_path / "hf"))
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["num_hidden_layers"] == 8 and cfg["megatron_growloop"]["loop"] == "0-2x2-4"
    hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "back"))
    tokens = _tokens()
    vocab = json.load(open(tmp_path / "looped" / "iter_0000000" / "growloop.json"))["tokenizer"]["vocab_size"]
    back, looped = _logits(tmp_path / "back", tokens), _logits(tmp_path / "looped", tokens)
    assert torch.allclose(back[..., :vocab], looped[..., :vocab], atol=1e-5)  # export drops the vocab padding
    gen = run_module("megatron_growloop.generate", ["--load", tmp_path / "looped", "--loop-repeats", "3",
                                                    "--prompt", "ab", "--max-new-tokens", "3"])
    assert "trained as Loop(0-2x2-4)" in gen.stdout and "effective depth 10" in gen.stdout
    run = pretrain(["--tokenizer-type", "ByteTokenizer", "--seq-length", "32", "--micro-batch-size", "2",
                    "--train-iters", "2", "--log-interval", "1", "--load", tmp_path / "looped",
                    "--loop-repeats-dist", "uniform", "--loop-repeats-mean", "2", "--loop-backprop-depth", "1",
                    "--save", tmp_path / "retro"])
    assert "effective depth 8 (Loop(0-2x2-4))" in run.stdout and "done: 2 iterations" in run.stdout


def test_evaluation_and_analysis_load_the_looped_checkpoint(dist_1rank, grown, tmp_path):
    """The evaluation CLI scores the tied model at another k (the same log-likelihoods as the
    Python API), and the analysis CLI runs on it."""
    from megatron_growloop.convert.grown_to_looped import grown_to_looped
    from megatron_growloop.eval import scoring
    from megatron_growloop.eval.engine import LogProbEngine
    from megatron_growloop.training.inference import load_model

    grown_to_looped(str(grown / "ck"), str(tmp_path / "looped"), "4:8", "mean")
    task = ["--tasks", "copy_real", "--limit", "2", "--num-fewshot", "0", "--template", "continuation"]
    run_module("megatron_growloop.eval", ["primitives", "--load", tmp_path / "looped", "--loop-repeats", "3", *task,
                                          "--out", tmp_path / "eval.json"])
    res = json.load(open(tmp_path / "eval.json"))
    assert res["model"]["schedule"] == [0, 1, 2, 3, 4, 5, 4, 5, 4, 5]
    model, _, tok = load_model(str(tmp_path / "looped"), loop_repeats=3)
    ref = scoring.evaluate_primitives(LogProbEngine(model, tok), "copy_real", limit=2, num_fewshot=0,
                                      template="continuation")
    assert res["results"] == ref["results"]
    run_module("megatron_growloop.analysis", ["norms", "--load", tmp_path / "looped", "--out", tmp_path / "an",
                                              "--num-prompts", "2", "--seq-len", "16"])
    norms = json.load(open(tmp_path / "an" / "norms.json"))
    assert norms


@pytest.mark.parametrize(
    "load,block,match",
    [
        ("ck", "2:6", "--block 2:6: layers 2..5 are not copies of one block (their lineage roots are [0, 1, 2, 3]"),
        ("ck", "0:8", "are not copies of one block"),
        ("ck", "4:12", "--block 4:12 lies outside the model"),
        ("plain", "0:4", "records no layer lineage"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(grown, tmp_path, load, block, match):
    out = tmp_path / "out"
    proc = run_module("megatron_growloop.convert", ["grown-to-looped", "--load", grown / load, "--block", block,
                                                    "--out", out], check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and match in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()
    assert "blocks of copies in this checkpoint: 0:4, 4:8" in errors[0] or "copies" not in match


def test_looped_source_is_refused(dist_1rank, grown, tmp_path):
    from megatron_growloop.convert.grown_to_looped import grown_to_looped
    from megatron_growloop.errors import UsageError

    grown_to_looped(str(grown / "dump" / "step_1"), str(tmp_path / "a"), "0:4")
    with pytest.raises(UsageError, match="is already looped"):
        grown_to_looped(str(tmp_path / "a"), str(tmp_path / "b"), "0:4")
    assert not (tmp_path / "b").exists()


def test_tie_plans_of_growth_operators():
    """MIDAS and stacking copy whole blocks; several growth steps make several copies; the
    source tie follows the oldest line."""
    from megatron_growloop.errors import UsageError
    from megatron_growloop.growth.lineage import tie_plan, tieable_blocks
    from megatron_growloop.growth.operators import grow_lineage, initial_lineage

    def lineage(method, depth, block, steps):
        lin = initial_lineage(depth)
        for s in range(1, steps + 1):
            lin = grow_lineage(lin, method, block, s)
        return [l.to_dict() for l in lin]

    midas = lineage("midas", 4, 2, 2)  # roots 0 1 0 1 0 1 2 3
    plan = tie_plan(midas, 0, 6)
    assert (plan.block, plan.copies, str(plan.loop())) == (2, 3, "0-2x3-2")
    assert plan.born == ((0, 1, 2), (0, 1, 2))
    assert plan.sources("source")[:2] == [[0], [1]] and plan.sources("mean")[:2] == [[0, 2, 4], [1, 3, 5]]
    stacked = lineage("stack", 2, 2, 2)  # roots 0 1 0 1 0 1
    assert tieable_blocks(stacked) == [(0, 6, 2)]
    late = tie_plan(lineage("lidas", 8, 4, 1), 6, 10)  # roots 4 5 4 5, born [1 1 0 0]
    assert late.sources("source")[6:8] == [[8], [9]] and late.sources("first")[6:8] == [[6], [7]]
    with pytest.raises(UsageError, match="not copies of one block"):
        tie_plan(midas, 1, 5)
