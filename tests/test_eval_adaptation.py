"""The adaptation experiments as commands: ``eval sweep sft`` (Fig. 8; fine-tune x N x seed,
held-out evaluation, resumable) and ``eval sweep loop-repeats`` (Fig. 9 / 17; k of a looped
model, R of a block, and k through the lm-eval adapter)."""

from __future__ import annotations

import json

import pytest

from conftest import run_module
from eval_fixtures import tiny_ckpts  # noqa: F401
from megatron_growloop.errors import UsageError
from megatron_growloop.eval import primitives, sweeps
from megatron_growloop.eval.engine import LogProbEngine
from megatron_growloop.eval.scoring import evaluate_items
from megatron_growloop.eval.sft_sweep import SweepModel

MOD = "megatron_growloop.eval"
FT = "--seq-length 256 --train-iters 2 --micro-batch-size 2 --lr 1e-3"


def _sft_sweep(ckpt, out):
    return run_module(MOD, ["sweep", "sft", "--model", f"label=plain,load={ckpt}",
                            "--model", f"label=rep,load={ckpt},retrofit_loop=1:3:2",
                            "--sft-tasks", "va_basic_d0", "--examples", "0,2", "--seeds", "0,1", "--limit", "3",
                            "--finetune-args", FT, "--out", out])


def test_sft_sweep_cells_summary_and_resume(tiny_ckpts, tmp_path):
    """Every model x N x seed cell is fine-tuned (N > 0) and evaluated on held-out items, with
    mean ± std over seeds; fine-tuning is told to avoid exactly the evaluated items; a rerun
    keeps finished cells and recomputes only missing ones."""
    out = tmp_path / "sft.json"
    _sft_sweep(tiny_ckpts.plain, str(out))
    res = json.loads(out.read_text())
    assert (tmp_path / "sft.png").stat().st_size > 0
    assert len(res["cells"]) == 2 * (1 + 2)
    for label in ("plain", "rep"):
        s = res["summary"][label]["va_basic_d0"]["acc_norm"]
        assert s["n"] == [0, 2] and s["seeds"] == [1, 2] and len(s["mean"]) == len(s["std"]) == 2
        cells = [c for c in res["cells"] if c["model"] == label and c["n"] == 2]
        vals = [c["results"]["va_basic_d0"]["acc_norm"] for c in cells]
        assert s["mean"][1] == pytest.approx(sum(vals) / 2)
    root = tmp_path / "sft_cells"
    log = (root / "rep" / "n2_s1" / "finetune.log").read_text()
    assert "--sft-heldout-items 3 --sft-heldout-seed 0" in log and "--retrofit-loop 1:3:2" in log
    assert "--sft-seed 1" in log and "Loop(1-2x2-1)" in log  # fine-tuned with the block repeated
    assert not (root / "plain" / "n2_s0" / "checkpoint").exists()  # removed after evaluation
    assert res["chance"] == {"va_basic_d0": 0.2}

    kept = {p: p.stat().st_mtime_ns for p in root.glob("*/*/cell.json")}
    redo = root / "plain" / "n2_s1" / "cell.json"
    redo.unlink()
    proc = _sft_sweep(tiny_ckpts.plain, str(out))
    assert proc.stdout.count(": kept (") == 5
    assert redo.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items() if p != redo)
    again = json.loads(out.read_text())
    assert again["summary"]["rep"] == res["summary"]["rep"]


@pytest.mark.parametrize("spec,words", [
    ("label=a", "exactly one of load=CHECKPOINT or hf=HF_DIR"),
    ("label=a,load=x,hf=y", "exactly one of load=CHECKPOINT or hf=HF_DIR"),
    ("load=x", "give a label=NAME"),
    ("label=a,load=x,retrofit=1:2:2", "keys label, load, hf, retrofit_loop"),
    ("label=a,load=x,retrofit_loop=3:2:2", "need 0 <= START < END"),
])
def test_sweep_model_spec_errors(spec, words):
    with pytest.raises(UsageError, match=words):
        SweepModel.parse(spec)


def test_sft_sweep_refuses_flags_it_sets(tmp_path, capsys):
    from megatron_growloop.eval import cli

    with pytest.raises(SystemExit):
        cli.main(["sweep", "sft", "--model", "label=a,load=x", "--finetune-args", "--save /tmp/x --epochs 2",
                  "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip()
    assert "--finetune-args must not set --save" in err and "\n" not in err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ loop-repeats
def test_loop_repeats_sweep_equals_loading_at_each_k(tiny_ckpts, dist_1rank):
    """Invariant: changing k on the live model gives what a model loaded at that k gives, and
    the model's own k is restored afterwards."""
    from megatron_growloop.training.inference import load_model

    model, _, tok = load_model(tiny_ckpts.loop)
    res = sweeps.loop_repeats_sweep(model, LogProbEngine(model, tok), "va_basic_d0,copy_random", repeats=[1, 2, 3],
                                    limit=4, num_fewshot=1)
    assert res["repeats"] == [1, 2, 3] and res["effective_depth"] == [4, 6, 8] and res["trained_repeats"] == 2
    assert model.effective_depth == 6
    for i, k in enumerate([1, 3]):
        fresh, _, _ = load_model(tiny_ckpts.loop, loop_repeats=k)
        eng = LogProbEngine(fresh, tok)
        for task in ("va_basic_d0", "copy_random"):
            r, _ = evaluate_items(eng, primitives.generate_task(task, 4, num_fewshot=1))
            assert res["acc_norm"][task][[0, 2][i]] == r.acc_norm


def test_block_repeats_on_a_plain_model(tiny_ckpts, dist_1rank):
    from megatron_growloop.training.inference import load_model

    model, _, tok = load_model(tiny_ckpts.plain)
    res = sweeps.loop_repeats_sweep(model, LogProbEngine(model, tok), "va_basic_d0", repeats=[1, 2, 3], block="1:3",
                                    limit=3, num_fewshot=0)
    assert res["effective_depth"] == [4, 6, 8] and res["axis"] == "R (applications of block 1:3)"
    assert res["settings"] == ["repeat_block=1:3:1", "repeat_block=1:3:2", "repeat_block=1:3:3"]
    assert model.effective_depth == 4
    with pytest.raises(UsageError, match="has no loop"):
        sweeps.loop_repeats_sweep(model, LogProbEngine(model, tok), "va_basic_d0", repeats=[1, 2])
    with pytest.raises(UsageError, match="lies outside the model"):
        sweeps.loop_repeats_sweep(model, LogProbEngine(model, tok), "va_basic_d0", repeats=[2], block="2:6")


def test_lm_eval_model_args_carry_k_and_repeat_blocks(tiny_ckpts, dist_1rank):
    """``--model_args load=...,loop_repeats=k,repeat_block=S:E:R`` (lm-eval's own parser)
    builds the model at that k and block, and scores as a model loaded that way."""
    from megatron_growloop.eval.harness import GrowLoopLM
    from megatron_growloop.training.inference import load_model

    lm = GrowLoopLM.create_from_arg_string(f"load={tiny_ckpts.loop},loop_repeats=3,repeat_block=0:1:2")
    ref, _, tok = load_model(tiny_ckpts.loop, loop_repeats=3, repeat_blocks=["0:1:2"])
    assert lm.model.schedule == ref.schedule and lm.model.effective_depth == 9
    req = [("x=3\ny=4\nx=", "3")]
    assert lm.engine.loglikelihood(req) == pytest.approx(LogProbEngine(ref, tok).loglikelihood(req), abs=1e-5)
    k2 = GrowLoopLM.create_from_arg_string(f"load={tiny_ckpts.loop}")
    assert abs(k2.engine.loglikelihood(req)[0] - lm.engine.loglikelihood(req)[0]) > 1e-6


def test_loop_repeats_cli_with_lm_eval_tasks(tiny_ckpts, tmp_path):
    """The CLI sweeps k for the primitives and, through the lm-eval adapter, for lm-eval tasks
    (here the local rp_* tasks, which score the same items: the accuracies agree)."""
    out = tmp_path / "k.json"
    run_module(MOD, ["sweep", "loop-repeats", "--load", tiny_ckpts.loop, "--tasks", "va_basic_d0", "--limit", "3",
                     "--num-fewshot", "1", "--repeats", "1,3", "--lm-eval-tasks", "rp_va_basic_d0",
                     "--lm-eval-limit", "3", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["repeats"] == [1, 3] and res["effective_depth"] == [4, 8]
    assert res["extra"]["rp_va_basic_d0"]["acc,none"] == res["acc"]["va_basic_d0"]
    assert res["extra"]["rp_va_basic_d0"]["acc_norm,none"] == res["acc_norm"]["va_basic_d0"]
    assert (tmp_path / "k.png").stat().st_size > 0


def test_block_repeats_cli_and_comparison_plot(tiny_ckpts, tmp_path):
    """``--block S:E`` sweeps R on a plain model (Fig. 17) with the same numbers as the Python
    API; ``--compare`` draws an earlier result in the same plot (Fig. 9's model comparison)."""
    plain = tmp_path / "plain.json"
    run_module(MOD, ["sweep", "loop-repeats", "--load", tiny_ckpts.plain, "--block", "1:3", "--repeats", "1,2",
                     "--tasks", "va_basic_d0", "--limit", "3", "--num-fewshot", "0", "--label", "plain 1:3",
                     "--out", str(plain)])
    res = json.loads(plain.read_text())
    assert res["label"] == "plain 1:3" and res["block"] == "1:3" and res["trained_repeats"] == 1
    assert res["settings"] == ["repeat_block=1:3:1", "repeat_block=1:3:2"] and res["effective_depth"] == [4, 6]
    proc = run_module(MOD, ["sweep", "loop-repeats", "--load", tiny_ckpts.loop, "--repeats", "1,2", "--tasks",
                            "va_basic_d0", "--limit", "3", "--num-fewshot", "0", "--compare", str(plain),
                            "--plot", str(tmp_path / "both.png"), "--out", str(tmp_path / "loop.json")])
    assert f"wrote {tmp_path / 'both.png'}" in proc.stdout and (tmp_path / "both.png").stat().st_size > 0


def test_compare_must_be_a_loop_repeats_result(tmp_path, capsys):
    """A ``--compare`` file that is not a loop-repeats result is one line, before any model is
    loaded, and nothing is written."""
    from megatron_growloop.eval import cli

    other = tmp_path / "icl.json"
    other.write_text(json.dumps({"kind": "icl"}))
    out = tmp_path / "k.json"
    for bad, words in ((str(other), "is not a loop-repeats sweep result"),
                       (str(tmp_path / "missing.json"), "is not a readable results JSON")):
        with pytest.raises(SystemExit):
            cli.main(["sweep", "loop-repeats", "--load", str(tmp_path / "no_model"), "--compare", bad,
                      "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    assert not out.exists()
