"""The Fig. 1 trade-off report on synthetic checkpoints and result files (no model is run).

Invariants: the costs are exactly the checkpoint's ``growloop.json`` accounting (or the
accounting formula at the evaluated depth when the results were computed with a repeated
block); the accuracy is the mean of the metric group's tasks; several runs of one name are
averaged with an over-seeds error bar; the Pareto front is the set of non-dominated points;
bad input is one line and writes nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_growloop.errors import UsageError
from megatron_growloop.eval import cli, tradeoff
from ckpt_fixtures import write_torch_dist_skeleton
from megatron_growloop.model.arch import Arch

ARCH = Arch(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=176,
            kv_channels=16, seq_length=128, max_position_embeddings=128, padded_vocab_size=384)


def _ckpt(root: Path, name: str, *, params=1000, depth=4, layers=4, train=1e12, accounting=True, flops=True,
          arch=ARCH) -> str:
    d = root / name
    it = d / "iter_0000010"
    write_torch_dist_skeleton(it)
    meta = {"iteration": 10, "arch": arch.to_meta(), "tokens": 5120}
    if accounting:
        meta["accounting"] = {"unique_layers": layers, "effective_depth": depth, "unique_parameters": params,
                              "inference_flops_per_token": arch.shape.forward_flops_per_token(depth, arch.seq_length),
                              "training_flops_per_token": 3 * arch.shape.forward_flops_per_token(depth, 128)}
    if flops:
        meta["training_flops"] = train
    (it / "growloop.json").write_text(json.dumps(meta))
    (d / "latest_checkpointed_iteration.txt").write_text("10")
    return str(d)


def _results(root: Path, name: str, accs: dict, stderr=0.05, depth=None, iteration=10) -> str:
    model = {"iteration": iteration}
    if depth:
        model["effective_depth"] = depth
    res = {"results": {t: {"task": t, "n": 100, "acc": a, "acc_stderr": stderr, "acc_norm": a,
                           "acc_norm_stderr": stderr, "chance": 0.2} for t, a in accs.items()},
           "model": model}
    p = root / f"{name}.json"
    p.write_text(json.dumps(res))
    return str(p)


VA = {"va_basic_d0": 0.6, "va_basic_d1": 0.3, "va_basic_d2": 0.3}


def test_costs_come_from_the_checkpoint_accounting_and_accuracy_is_the_group_mean(tmp_path):
    ck = _ckpt(tmp_path, "a", params=1234, train=5e11)
    rep = tradeoff.tradeoff([tradeoff.RunSpec.parse(f"A={ck}:{_results(tmp_path, 'a', VA)}")], "va_basic")
    (m,) = rep["models"]
    assert m["unique_parameters"] == 1234 and m["training_flops"] == 5e11
    assert m["inference_flops_per_token"] == ARCH.shape.forward_flops_per_token(4, 128)
    assert m["accuracy"] == pytest.approx(0.4)
    assert m["stderr"] == pytest.approx(math.sqrt(3 * 0.05 ** 2) / 3) and m["stderr_over"] == "items"
    assert rep["chance"] == pytest.approx(0.2)


def test_repeated_block_results_count_the_evaluated_depth(tmp_path):
    ck = _ckpt(tmp_path, "a", depth=4)
    res = _results(tmp_path, "a", VA, depth=6)  # evaluated with --repeat-block 2:4:2
    (m,) = tradeoff.tradeoff([tradeoff.RunSpec.parse(f"A={ck}:{res}")], "va_basic")["models"]
    assert m["effective_depth"] == 6
    assert m["inference_flops_per_token"] == ARCH.shape.forward_flops_per_token(6, 128)
    assert m["unique_parameters"] == 1000  # parameters do not grow with repetition


def test_runs_of_one_name_average_with_an_over_seed_error_bar(tmp_path):
    specs = []
    for i, a in enumerate((0.5, 0.6, 0.7)):
        ck = _ckpt(tmp_path, f"s{i}", train=1e12 + i)
        specs.append(tradeoff.RunSpec.parse(f"Base={ck}:{_results(tmp_path, f's{i}', {'copy_random': a})}"))
    (m,) = tradeoff.tradeoff(specs, "copy_random")["models"]
    assert m["n_runs"] == 3 and m["accuracy"] == pytest.approx(0.6)
    assert m["stderr"] == pytest.approx(0.1 / math.sqrt(3)) and m["stderr_over"] == "seeds"


def test_pareto_front_is_the_non_dominated_set():
    recs = [{"name": n, "accuracy": a, "c": c} for n, a, c in
            [("cheap_bad", 0.2, 1), ("mid", 0.5, 2), ("dominated", 0.4, 3), ("best", 0.7, 4), ("tie", 0.7, 5)]]
    assert tradeoff.pareto_front(recs, "c") == ["cheap_bad", "mid", "best"]


def test_cli_writes_json_and_png_with_the_front(tmp_path):
    runs = []
    for name, params, train, accs in (("Base", 3000, 3e12, {"copy_random": 0.5}),
                                       ("Loop", 1000, 3e12, {"copy_random": 0.45}),
                                       ("LIDAS", 3000, 2e12, {"copy_random": 0.55})):
        ck = _ckpt(tmp_path, name, params=params, train=train)
        runs += ["--run", f"{name}={ck}:{_results(tmp_path, name, accs)}"]
    out = tmp_path / "out"
    rep = cli.main(["tradeoff", *runs, "--metric", "copy_random", "--out", str(out)])
    on_disk = json.loads((out / "tradeoff.json").read_text())
    assert on_disk["pareto"] == rep["pareto"]
    assert rep["pareto"]["unique_parameters"] == ["Loop", "LIDAS"]
    assert rep["pareto"]["training_flops"] == ["LIDAS"]
    assert (out / "tradeoff.png").stat().st_size > 10_000


@pytest.mark.parametrize("case, message", [
    ("no_accounting", "has no 'accounting' in growloop.json"),
    ("no_training_flops", "lacks 'training_flops'"),
    ("missing_ckpt", "does not exist"),
    ("missing_results", "results file"),
    ("missing_task", "lack task(s) va_basic_d2"),
    ("bad_run", "expected NAME=CHECKPOINT:RESULTS.json"),
    ("bad_metric", "unknown reasoning-primitive task"),
    ("other_iteration", "was evaluated at iteration 5, but checkpoint"),
    ("partial_accounting", "growloop.json accounting lacks 'inference_flops_per_token'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, message):
    ck = _ckpt(tmp_path, "a", accounting=case != "no_accounting", flops=case != "no_training_flops")
    if case == "partial_accounting":
        meta_path = Path(ck) / "iter_0000010" / "growloop.json"
        meta = json.loads(meta_path.read_text())
        del meta["accounting"]["inference_flops_per_token"]
        meta_path.write_text(json.dumps(meta))
    res = _results(tmp_path, "a", {k: v for k, v in VA.items() if case != "missing_task" or k != "va_basic_d2"},
                   iteration=5 if case == "other_iteration" else 10)
    run = {"missing_ckpt": f"A={tmp_path / 'nope'}:{res}", "missing_results": f"A={ck}:{tmp_path / 'nope.json'}",
           "bad_run": "A-no-equals"}.get(case, f"A={ck}:{res}")
    metric = "va_basic_x" if case == "bad_metric" else "va_basic"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["tradeoff", "--run", run, "--metric", metric, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_run_spec_splits_at_the_last_colon():
    s = tradeoff.RunSpec.parse("Loop(2x6)=runs/a=b/loop:runs/res.json")
    assert (s.name, s.checkpoint, s.results) == ("Loop(2x6)", "runs/a=b/loop", "runs/res.json")
    with pytest.raises(UsageError):
        tradeoff.RunSpec.parse("A=ckpt_without_results")
