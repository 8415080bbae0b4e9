"""The planner's activation memory is what autograd keeps: every tensor saved for the backward pass
during one training step, recorded with ``torch.autograd.graph.saved_tensors_hooks``
(``megatron_growloop.plan.measure``), for the tiny and small presets -- plain, looped, a growth stage -- without
recomputation and with selective, full/uniform and full/block recomputation, in fp32 and bf16.

Tolerance: 5% of the measured bytes.  The planner counts megatron-core's saved tensors one by one
(plan/activations.py), so on CPU it is exact to the byte for these models; the margin is for what
a test cannot pin down in general -- torch versions that save one more small tensor (a mask, a
scalar) in an op's backward formula, which shifts the total by well under 1% at these sizes.
"""

from __future__ import annotations


import pytest
import torch

from megatron_growloop.model.implementation import Implementation
from megatron_growloop.model.parallel import ParallelLayout
from megatron_growloop.plan import RunSetup, plan_run
from plan_models import build, preset_arch
from megatron_growloop.plan.measure import measure_training_step

TOLERANCE = 0.05
RECOMPUTE = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full-block-2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
}
MODELS = {
    "tiny": lambda: preset_arch("tiny", vocab=257),
    "small": lambda: preset_arch("small", vocab=257),
    "tiny-looped": lambda: preset_arch("tiny", vocab=257, loop="1-2x3-1"),  # 4 unique layers, 8 applications
    "small-looped": lambda: preset_arch("small", vocab=257, num_layers=6, loop="2-2x2-2"),
    "small-growth-stage": lambda: preset_arch("small", vocab=257, num_layers=4),  # LIDAS 4 -> 8, first stage
}


def _measure(arch, dtype: str, recompute: dict, batch: int = 2):
    model, config = build(arch, bf16=dtype == "bf16", **recompute)
    if dtype == "bf16":
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    model.train()
    g = torch.Generator().manual_seed(0)
    s = arch.seq_length
    tokens = torch.randint(0, 257, (batch, s), generator=g)
    return measure_training_step(model, tokens, torch.arange(s).expand(batch, s), tokens, torch.ones(batch, s))


def _planned(arch, dtype: str, recompute: dict, batch: int = 2):
    impl = Implementation(transformer_impl="local", dtype=dtype, **recompute)
    plan = plan_run(RunSetup(arch, ParallelLayout(), impl, micro_batch_size=batch, device="cpu"))
    (stage,) = plan.stages
    return stage.activations


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("recompute", sorted(RECOMPUTE))
def test_activation_peak_matches_saved_tensors(dist_1rank, model, recompute):
    """fp32: the planner's activation figure equals the measured peak of saved bytes (forward and
    backward, recomputation included) within 5%."""
    arch = MODELS[model]()
    measured = _measure(arch, "fp32", RECOMPUTE[recompute])
    planned = _planned(arch, "fp32", RECOMPUTE[recompute])
    assert abs(planned - measured["peak"]) <= TOLERANCE * measured["peak"], (planned, measured)


@pytest.mark.parametrize("model", ["tiny", "small-looped", "small-growth-stage"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full-uniform-1"])
def test_activation_peak_matches_saved_tensors_bf16(dist_1rank, model, recompute):
    """bf16 (megatron's Float16Module; the CPU norm keeps fp32 copies, the softmax an fp32 and a bf16
    copy of the scores): the same agreement."""
    arch = MODELS[model]()
    measured = _measure(arch, "bf16", RECOMPUTE[recompute])
    planned = _planned(arch, "bf16", RECOMPUTE[recompute])
    assert abs(planned - measured["peak"]) <= TOLERANCE * measured["peak"], (planned, measured)


def test_looped_activations_grow_with_k(dist_1rank):
    """A looped block stores its activations once per application: k=3 -> k=5 adds exactly two block
    applications' worth in the planner, and the measurement agrees."""
    arch3 = MODELS["tiny-looped"]()
    arch5 = arch3.with_repeats(5)
    m3, m5 = _measure(arch3, "fp32", {})["peak"], _measure(arch5, "fp32", {})["peak"]
    p3, p5 = _planned(arch3, "fp32", {}), _planned(arch5, "fp32", {})
    assert p5 - p3 == m5 - m3 > 0


def test_growth_stage_is_planned_at_its_depth(dist_1rank):
    """The growth plan's stages are planned at their own depth: the 4-layer first stage of LIDAS
    4 -> 8 of the small preset has the activations measured for a 4-layer model."""
    from megatron_growloop.growth.plan import GrowthPlan

    final = preset_arch("small", vocab=257)
    start = final.with_depth(4)
    growth = GrowthPlan.build("lidas", 4, 4, 8, 100)
    impl = Implementation(transformer_impl="local")
    plan = plan_run(RunSetup(start, ParallelLayout(), impl, micro_batch_size=2, growth=growth, device="cpu"))
    assert [g.num_layers for g in plan.growth_stages] == [4, 8]
    first = plan.growth_stages[0].stages[0].activations
    assert abs(first - _measure(start, "fp32", {})["peak"]) <= TOLERANCE * first
    assert plan.growth_stages[1].stages[0].activations == _planned(final, "fp32", {})


PARALLEL_CASES = {
    "none": ("small", {}, {}),
    "selective": ("small", {}, RECOMPUTE["selective"]),
    "full-uniform-2": ("small", {}, RECOMPUTE["full-uniform-2"]),
    "looped": ("small", {"num_layers": 6, "loop": "2-2x2-2"}, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PARALLEL_CASES))
def test_activations_per_rank_match_a_gloo_tp2_pp2_pipeline(tmp_path, case):
    """Every rank of a gloo TP2 x PP2 run of megatron-core's 1F1B schedule with 3 micro-batches keeps
    the saved bytes the planner gives its (TP rank, PP stage): TP shards of attention and MLP, the
    replicated norms, the vocabulary-parallel embedding and loss, and the 2 micro-batches stage 0
    holds in flight (stage 1: 1).  The stage output tensors the schedule keeps besides are not
    autograd-saved tensors and are left out of this comparison (``pipeline_buffers``).  Sequence
    parallelism is not measured: the local spec refuses it, and Transformer Engine needs a GPU."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, _env, _free_port

    preset, over, rc = PARALLEL_CASES[case]
    arch = preset_arch(preset, tp=2, vocab=257, **over)
    out = tmp_path / "peaks.json"
    env = _env()
    env["PYTHONPATH"] = str(ROOT / "tests") + ":" + env["PYTHONPATH"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "plan_activation_ranks.py"), "2", "2", "0", "3", "2", json.dumps(arch.to_meta()),
           json.dumps(rc), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    measured = json.loads(out.read_text())
    impl = Implementation(transformer_impl="local", **rc)
    plan = plan_run(RunSetup(arch, ParallelLayout(tp=2, pp=2), impl, dp=1, micro_batch_size=2, global_batch_size=6,
                             device="cpu"))
    assert [s.in_flight for s in plan.stages] == [2, 1]
    for stage in plan.stages:
        planned = stage.activations - stage.pipeline_buffers
        for tp_rank in range(2):
            got = measured[f"{tp_rank},{stage.pp_rank}"]
            assert abs(planned - got) <= TOLERANCE * got, (case, tp_rank, stage.pp_rank, planned, got)
