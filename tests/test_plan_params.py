"""The planner's parameter counts are megatron-core's: names, shapes and totals of the models it
builds -- whole models on the meta device at 8B and 70B, every rank of a gloo TP2 x PP2 run of the
8B shape -- and the padded DDP buffers the memory figures are based on."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_growloop.model.parallel import ParallelLayout
from megatron_growloop.plan.params import grad_buffer_numel, stage_tensors, unique_params
from plan_models import build, preset_arch


@pytest.mark.parametrize("preset,total", [("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496),
                                          ("llama3.2-3b", 3_212_749_824), ("llama3.2-1b", 1_235_814_400)])
def test_total_equals_a_meta_device_build(dist_1rank, preset, total):
    """A full model built by megatron-core on the meta device has exactly the planner's tensors (names,
    shapes, order) and total; the totals are the published Llama-3 sizes (8.03B, 70.55B, 3.21B, 1.24B)."""
    arch = preset_arch(preset)
    model, _ = build(arch, meta=True)
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert got == [(t.name, t.shape) for t in stage_tensors(arch, 1, 1, 0, None)]
    assert sum(p.numel() for p in model.parameters()) == unique_params(arch) == total


def test_looped_model_counts_unique_layers(dist_1rank):
    """A looped model stores its unique layers once: Loop(1-2x3-1) of the small preset has the
    parameters of a 4-layer model although it applies 8 layers."""
    arch = preset_arch("small", num_layers=4, loop="1-2x3-1")
    model, _ = build(arch, meta=True)
    assert arch.effective_depth == 8
    assert sum(p.numel() for p in model.parameters()) == unique_params(arch) == unique_params(arch.with_loop(None))


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_per_rank_tensors_equal_a_gloo_tp2_pp2_meta_run(tmp_path, tied):
    """On each of the 4 ranks of a gloo TP2 x PP2 run, megatron-core builds (on the meta device) exactly
    the planner's tensors for that (TP rank, PP stage) of the 8B shape -- untied, and tied (the last
    stage then holds megatron's copy of the word embeddings)."""
    from conftest import _env, _free_port
    import subprocess
    import sys

    arch = preset_arch("llama3.1-8b", tp=2)
    if tied:
        from dataclasses import replace

        arch = replace(arch, untie_embeddings_and_output_weights=False)
    out = tmp_path / "ranks.json"
    from conftest import ROOT

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "plan_meta_ranks.py"), "2", "2", json.dumps(arch.to_meta()), str(out)]
    env = _env()
    env["PYTHONPATH"] = str(ROOT / "tests") + ":" + env["PYTHONPATH"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = json.loads(out.read_text())
    sizes = ParallelLayout(tp=2, pp=2).stage_sizes(arch)
    assert sizes == [16, 16]
    total = 0
    for tp_rank in range(2):
        for pp_rank in range(2):
            got = [(n, tuple(s)) for n, s, _ in ranks[f"{tp_rank},{pp_rank}"]]
            want = stage_tensors(arch, 2, 2, pp_rank, sizes)
            assert got == [(t.name, t.shape) for t in want], (tp_rank, pp_rank)
            # norms are replicated over TP ranks, every other tensor is a TP shard
            total += sum(t.numel for t in want if "norm" not in t.name or tp_rank == 0)
    copy = arch.padded_vocab_size * arch.hidden_size if tied else 0  # the last stage's embedding copy
    assert total == unique_params(arch) + copy


@pytest.mark.parametrize("dist_opt,overlap", [(False, False), (True, False), (True, True)])
def test_ddp_buffer_size_equals_megatron_ddp(dist_1rank, dist_opt, overlap):
    """megatron-core DDP's contiguous grad buffer (padding for the distributed optimizer, buckets with
    --overlap-grad-reduce) has the size the planner computes for the same tensors."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    arch = preset_arch("tiny", vocab=257)
    model, config = build(arch)
    ddp = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt,
                                                 overlap_grad_reduce=overlap, bucket_size=20_000 if overlap else None))
    (buffer,) = ddp.buffers
    numel, unpadded = grad_buffer_numel(stage_tensors(arch, 1, 1, 0, None), 1, dist_opt, 20_000 if overlap else None)
    assert (buffer.numel, buffer.numel_unpadded) == (numel, unpadded)
    assert len(buffer.buckets) > 1 or not overlap
