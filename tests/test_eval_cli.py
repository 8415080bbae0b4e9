"""``python -m megatron_growloop.eval``: outputs, one-line errors, TP / PP / DP lock-step.

References are computed in process with the Python API (same items, same engine), so
each CLI run is checked against an independent path.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_module
from eval_fixtures import tiny_ckpts  # noqa: F401
from megatron_growloop.eval import cli, scoring
from megatron_growloop.eval.engine import LogProbEngine

MOD = "megatron_growloop.eval"
TASKS, LIMIT, SHOTS, TEMPLATE = "copy_real,va_math_d1", 4, 1, "continuation"
TASK_ARGS = ["--tasks", TASKS, "--limit", str(LIMIT), "--num-fewshot", str(SHOTS), "--template", TEMPLATE]


def _primitives(ckpt, out, extra=(), nproc=1):
    run_module(MOD, ["primitives", "--load", ckpt, *TASK_ARGS, "--log-samples", "--out", out, *extra], nproc=nproc)
    return json.loads(open(out).read())


def _reference(ckpt, blocks=()):
    """The same evaluation through the Python API in this process."""
    from megatron_growloop.training.inference import load_model

    model, _, tok = load_model(ckpt, repeat_blocks=list(blocks))
    return scoring.evaluate_primitives(LogProbEngine(model, tok), TASKS, limit=LIMIT, num_fewshot=SHOTS,
                                       template=TEMPLATE)


def _lls(res):
    return [ll for t in res["samples"].values() for r in t for ll in r["loglikelihoods"]]


def _close(a, b, tol=1e-4):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol


def test_primitives_cli_writes_results(tiny_ckpts, tmp_path, dist_1rank):
    """A plain-process run writes per-task acc/acc_norm with stderr, the model's schedule and,
    with --log-samples, every choice's log-likelihood -- equal to the Python API's."""
    res = _primitives(tiny_ckpts.plain, str(tmp_path / "r.json"), ["--repeat-block", "1:3:2"])
    assert set(res["results"]) == {"copy_real", "va_math_d1"}
    for r in res["results"].values():
        assert r["n"] == LIMIT and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 and "acc_stderr" in r
    assert res["model"]["schedule"] == [0, 1, 2, 1, 2, 3] and res["model"]["boundaries"] == [1, 3, 5]
    assert len(_lls(res)) == LIMIT * 10 + LIMIT * 5
    ref = _reference(tiny_ckpts.plain, ["1:3:2"])
    assert _close(_lls(res), _lls(ref)) and res["results"] == ref["results"]


@pytest.mark.parametrize("args,needle", [
    (["--tasks", "copy_randm"], "unknown reasoning-primitive task 'copy_randm'"),
    (["--repeat-block", "2:9:2"], "lies outside the model"),
    (["--repeat-block", "2-9"], "invalid --repeat-block '2-9'"),
    (["--num-fewshot", "60"], "exceed the model's context length of 2048 tokens"),
    (["--loop-repeats", "3"], "has no loop"),
    (["--template", "chat"], "unknown template 'chat'"),
])
def test_cli_errors_are_one_line(tiny_ckpts, tmp_path, dist_1rank, capsys, args, needle):
    """Bad task names, repeat blocks outside the model, prompts longer than the context, loop
    overrides on plain models: exit 2 with one 'prog: error:' line, nothing written."""
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as e:
        cli.main(["primitives", "--load", tiny_ckpts.plain, "--tasks", "va_basic_d0", "--limit", "2",
                  "--out", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{MOD}: error:") and needle in err[-1], err
    assert not out.exists()


def test_cli_error_in_subprocess_has_no_traceback(tmp_path):
    """The real command line prints the one-line error and exits 2 (no traceback)."""
    proc = run_module(MOD, ["primitives", "--load", str(tmp_path / "missing"), "--tasks", "va_basic_d0"],
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{MOD}: error: --load")


def test_sweeps_and_nll_write_json_and_png(tiny_ckpts, tmp_path):
    """sweep repeat-block / sweep icl write JSON + a PNG; nll reports the held-out loss."""
    out = tmp_path / "rb.json"
    run_module(MOD, ["sweep", "repeat-block", "--load", tiny_ckpts.loop, "--tasks", "va_basic_d0", "--limit", "3",
                     "--num-fewshot", "1", "--block-size", "2", "--starts", "0,2", "--repeats", "1,2",
                     "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["starts"] == [0, 2] and res["repeats"] == [1, 2]
    assert res["model"]["loop"] == "1-2x2-1" and len(res["acc"]["va_basic_d0"]) == 2
    assert (tmp_path / "rb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "icl.json"
    run_module(MOD, ["sweep", "icl", "--load", tiny_ckpts.plain, "--tasks", "copy_random", "--limit", "3",
                     "--shots", "0,1,2,100", "--context-length", "1000", "--out", str(out),
                     "--plot", str(tmp_path / "icl_plot.png")])
    res = json.loads(out.read_text())
    assert res["shots"]["copy_random"] == [0, 1, 2] and res["did_not_fit"]["copy_random"]["shots"] == 100
    assert (tmp_path / "icl_plot.png").stat().st_size > 1000
    out = tmp_path / "nll.json"
    run_module(MOD, ["nll", "--load", tiny_ckpts.plain, "--num-samples", "4", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["tokens"] == 4 * 128 and 0 < res["nll"] < 10


def test_lm_eval_cli_matches_primitives(tiny_ckpts, tmp_path, dist_1rank):
    """The primitives exported as local lm-eval tasks, run through the registered lm-eval model,
    give exactly the accuracies of our own runner on the same items."""
    ours = _reference(tiny_ckpts.plain)
    out = tmp_path / "lm.json"
    run_module(MOD, ["lm-eval", "--load", tiny_ckpts.plain, "--tasks", "rp_copy_real,rp_va_math_d1",
                     "--limit", str(LIMIT), "--num-fewshot", str(SHOTS), "--template", TEMPLATE,
                     "--num-items", str(LIMIT), "--out", str(out)])
    lm = json.loads(out.read_text())["results"]
    for task in ("copy_real", "va_math_d1"):
        assert lm[f"rp_{task}"]["acc,none"] == pytest.approx(ours["results"][task]["acc"])
        assert lm[f"rp_{task}"]["acc_norm,none"] == pytest.approx(ours["results"][task]["acc_norm"])


@pytest.mark.slow
@pytest.mark.parametrize("extra,block", [
    (["--tensor-model-parallel-size", "2"], "1:3:2"),
    (["--pipeline-model-parallel-size", "2"], "0:2:2"),
    ([], "1:3:2"),  # two data-parallel ranks
], ids=["tp2", "pp2", "dp2"])
def test_torchrun_matches_single_process(tiny_ckpts, tmp_path, dist_1rank, extra, block):
    """Under torchrun (TP=2, PP=2 via the forward-only pipeline schedule, or DP=2) every choice's
    log-likelihood equals the single-process value, with a repeated block."""
    two = _primitives(tiny_ckpts.plain, str(tmp_path / "two.json"), ["--repeat-block", block, *extra], nproc=2)
    ref = _reference(tiny_ckpts.plain, [block])
    assert _close(_lls(two), _lls(ref)) and two["results"] == ref["results"]
