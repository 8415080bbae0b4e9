"""``python -m megatron_growloop.plan``: the report's numbers and keys, --search, one-line errors, and
``pretrain``'s start-up line / --dry-run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, _env, pretrain
from megatron_growloop.plan.cli import main as plan_main

B8 = ["--model-preset", "llama3.1-8b", "--bf16", "--micro-batch-size", "1"]


def _run(args, module="megatron_growloop.plan"):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_json_has_the_issues_keys_and_one_entry_per_rank():
    out = plan_main(B8 + ["--gpus", "16", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                          "--global-batch-size", "32", "--use-distributed-optimizer", "--json"])
    assert {"params_total", "per_rank", "flops_per_step", "fits"} <= set(out)
    assert out["params_total"] == 8_030_261_248 and isinstance(out["fits"], bool)
    assert sorted((r["tp_rank"], r["pp_rank"]) for r in out["per_rank"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in out["per_rank"]:
        assert set(r["memory_gb"]) == {"weights", "grads", "optimizer", "activations", "peak"}
        parts = r["memory_bytes"]
        assert parts["peak"] == sum(parts[k] for k in ("weights", "grads", "optimizer", "activations", "transient"))
    assert "growth_stages" not in out
    # tokens x 3 x forward FLOPs at the effective depth (megatron_growloop.accounting)
    from megatron_growloop.model.presets import get_preset
    assert out["flops_per_step"] == pytest.approx(32 * 8192 * 3 * (
        32 * (2 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 4 * 8192 * 4096) + 2 * 4096 * 128256))
    assert get_preset("llama3.1-8b").seq_length == 8192


def test_distributed_optimizer_shards_optimizer_states_over_dp():
    """bf16: 2 bytes of weights, 4 of fp32 main grads and 12 of optimizer state (fp32 main params,
    two moments) per parameter; the distributed optimizer divides the 12 by DP."""
    plain = plan_main(B8 + ["--gpus", "8", "--json"])["per_rank"][0]["memory_bytes"]
    dist = plan_main(B8 + ["--gpus", "8", "--use-distributed-optimizer", "--json"])["per_rank"][0]["memory_bytes"]
    p = 8_030_261_248
    assert (plain["weights"], plain["grads"], plain["optimizer"]) == (2 * p, 4 * p, 12 * p)
    assert dist["grads"] >= 4 * p and dist["grads"] - 4 * p < 4 * 64 * 300  # padding: < 64 elements per tensor
    assert dist["optimizer"] == 12 * (dist["grads"] // 4) // 8


def test_pipeline_stages_hold_their_in_flight_microbatches():
    """1F1B: stage i of PP4 keeps min(4 - i, M) micro-batches; the last stage holds the LM head."""
    out = plan_main(B8 + ["--gpus", "4", "--pipeline-model-parallel-size", "4", "--global-batch-size", "8",
                          "--recompute-granularity", "full", "--json"])
    assert [r["in_flight_microbatches"] for r in out["per_rank"]] == [4, 3, 2, 1]
    assert out["layout"]["stage_layers"] == [8, 8, 8, 8]
    acts = [r["memory_bytes"]["activations"] for r in out["per_rank"]]
    assert acts[0] > acts[1] > acts[2]


def test_looped_and_growing_runs():
    """A looped model counts unique parameters and applied FLOPs; a growing one reports every stage
    of its growth plan and every growth step."""
    looped = plan_main(B8 + ["--loop", "4-8x3-4", "--gpus", "8", "--json"])
    plain16 = plan_main(B8 + ["--num-layers", "16", "--gpus", "8", "--json"])
    plain32 = plan_main(B8 + ["--gpus", "8", "--json"])
    assert looped["params_total"] == plain16["params_total"]
    assert looped["flops_per_step"] == plain32["flops_per_step"]
    assert looped["per_rank"][0]["memory_bytes"]["activations"] > plain16["per_rank"][0]["memory_bytes"]["activations"]
    grow = plan_main(B8 + ["--num-layers", "16", "--grow-method", "lidas", "--grow-block-size", "8",
                           "--grow-final-layers", "32", "--grow-iters", "300", "--train-iters", "400", "--gpus", "8",
                           "--pipeline-model-parallel-size", "2", "--json"])
    # PROP-1 over 300 iterations and 3 stages: 50, 100, 150
    assert [(g["num_layers"], g["iterations"]) for g in grow["growth_stages"]] == [(16, 50), (24, 100), (32, 150)]
    assert grow["growth_stages"][-1]["params_total"] == plain32["params_total"]
    assert [(s["from_layers"], s["to_layers"]) for s in grow["growth_steps"]] == [(16, 24), (24, 32)]
    step = grow["growth_steps"][0]["per_rank"][0]
    # the source is released before the target is built: the device holds one of them (GB rounded to 1e-3)
    assert abs(step["peak_gb"] - max(step["source_gb"] + step["save_transient_gb"], step["target_gb"])) < 0.002
    assert step["target_gb"] > step["source_gb"]
    # LIDAS 16 -> 24 (B=8) on PP2: stages 8|8 -> 12|12, every new layer's source is on its own stage,
    # and each stage duplicates 4 of its layers
    first = grow["growth_steps"][0]["per_rank"]
    assert [(r["received_layers"], r["copied_layers"]) for r in first] == [(0, 4), (0, 4)]


def test_table_is_readable():
    proc = _run(B8 + ["--gpus", "8", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                      "--use-distributed-optimizer", "--global-batch-size", "64"])
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for needle in ("8,030,261,248 parameters", "TP2 PP1 DP4 SP", "weights", "activ", "FLOPs per step", "fits: peak"):
        assert needle in text, needle


def test_search_ranks_fitting_layouts_by_step_time():
    out = plan_main(B8 + ["--gpus", "16", "--global-batch-size", "64", "--use-distributed-optimizer", "--search",
                          "--json"])
    layouts = out["layouts"]
    fitting = [l for l in layouts if l["fits"]]
    assert fitting and out["best"] == fitting[0]
    assert [l["step_time_s"] for l in fitting] == sorted(l["step_time_s"] for l in fitting)
    assert all(l["tp"] * l["pp"] * l["dp"] == 16 and "limiting_rank" in l for l in layouts)
    assert {l["recompute"] for l in layouts} == {"none", "selective", "full"}
    pinned = plan_main(B8 + ["--gpus", "16", "--global-batch-size", "64", "--pipeline-model-parallel-size", "2",
                             "--search", "--json"])
    assert {l["pp"] for l in pinned["layouts"]} == {2}


@pytest.mark.parametrize("args,needles", [
    (["--gpus", "6", "--tensor-model-parallel-size", "3"], ["32", "tensor-model-parallel-size 3"]),
    (["--gpus", "12", "--tensor-model-parallel-size", "8"], ["--gpus 12", "TP x PP"]),
    (["--gpus", "8", "--global-batch-size", "12", "--micro-batch-size", "2"], ["12", "micro batch"]),
    (["--gpus", "64", "--pipeline-model-parallel-size", "64"], ["32", "64"]),
    (["--gpus", "8", "--virtual-pipeline-model-parallel-size", "2"], ["virtual pipeline"]),
    (["--search"], ["--search needs --gpus"]),
    (["--gpus", "8", "--assume-mfu", "1.5"], ["--assume-mfu"]),
    (["--gpus", "2", "--loop", "4-8x3-4", "--pipeline-model-parallel-size", "2",
      "--pipeline-model-parallel-layout", "Et*6|t*10L"], ["Et*6|t*10L", "within one stage"]),
])
def test_bad_layouts_fail_in_one_line(args, needles):
    proc = _run(B8 + args)
    assert proc.returncode == 2, (proc.stdout[-500:], proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "warn" not in l.lower()]
    assert len(lines) == 1 and lines[0].startswith("megatron_growloop.plan: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_pretrain_dry_run_prints_the_plan_and_exits_0(tmp_path):
    save = tmp_path / "run"
    proc = _run(["--model-preset", "tiny", "--tokenizer-type", "ByteTokenizer", "--train-iters", "2",
                 "--save", str(save), "--dry-run"], module="megatron_growloop.pretrain")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("planner: ") and "per-rank peak" in proc.stdout
    assert not save.exists()


def test_pretrain_prints_the_planner_line_at_start_up(tmp_path):
    proc = pretrain(["--model-preset", "tiny", "--tokenizer-type", "ByteTokenizer", "--train-iters", "1",
                     "--log-interval", "1", "--micro-batch-size", "2"])
    first = proc.stdout.splitlines()[0]
    assert first.startswith("planner: ") and "parameters" in first, proc.stdout[:500]
    assert "done: 1 iterations" in proc.stdout


def test_gpu_check_predicts_what_pretrain_announces():
    """The single-GPU check's planner item: the predicted peak of the limiting rank, and the verdict."""
    from megatron_growloop.plan.gpu_check import compare, predicted_peak

    flags = ["--model-preset", "tiny", "--tokenizer-type", "ByteTokenizer", "--micro-batch-size", "2", "--bf16"]
    pred = predicted_peak(flags, world_size=1)
    assert pred["plan_line"].startswith("planner: ")
    assert pred["predicted_peak_bytes"] == sum(pred["predicted"].values())
    assert pred["layout"]["padded_vocab_size"] == 384  # ByteTokenizer's 257, padded
    assert compare(pred, 2 * pred["predicted_peak_bytes"])["ratio"] == 2.0
