"""The planner's growth figures against a real LIDAS run on gloo (CPU): at every growth step, for
every pipeline stage, the transfer buffer the planner predicts equals the host memory the
in-memory growth transfer actually held on the stage's largest rank (tests/plan_growth_probe.py
records ``MemoryTransfer.host_bytes``).

Stated overhead: 1% of the buffer.  The planner counts the weights, the optimizer state each rank
owns (with the distributed optimizer: its data-parallel range of every parameter), what it
receives (layers moving between stages, ranges moving between DP ranks as the buffers are laid
out anew) and the copies of duplicated layers; what it leaves out is scalar optimizer state and
extra-state objects (a few bytes per rank)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, _env, _free_port

OVERHEAD = 0.01
BASE = ["--model-preset", "tiny", "--tokenizer-type", "ByteTokenizer", "--mock-data", "--vocab-size", "257",
        "--num-layers", "4", "--grow-method", "lidas", "--grow-block-size", "2", "--grow-final-layers", "8",
        "--grow-iters", "6", "--train-iters", "7", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--seq-length", "64", "--log-interval", "10"]
CASES = {
    # PP2 x DP2, bf16, distributed optimizer: no layer changes stage, one duplicate per stage; the
    # distributed optimizer's ranges move between the DP ranks as the buffer is laid out anew
    "pp2-bf16-distopt": ["--pipeline-model-parallel-size", "2", "--bf16", "--use-distributed-optimizer"],
    # PP4, fp32, replicated optimizer: layers move between stages
    "pp4-fp32": ["--pipeline-model-parallel-size", "4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_growth_transfer_buffer_equals_planned(tmp_path, case):
    import subprocess
    import sys

    from megatron_growloop.plan.cli import main as plan_main

    flags = BASE + CASES[case]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "plan_growth_probe.py"), str(tmp_path), *flags]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan = plan_main(flags + ["--gpus", "4", "--plan-device", "cpu", "--transformer-impl", "local", "--json"])
    steps = plan["growth_steps"]
    assert [s["to_layers"] for s in steps] == [6, 8]
    pp = int(CASES[case][1])
    largest = {}  # (step, pipeline stage) -> the stage's largest rank
    for rank in range(4):
        measured = json.loads((tmp_path / f"transfer_rank{rank}.json").read_text())
        assert len(measured) == len(steps) and {m["transfer"] for m in measured} == {"memory"}
        pp_rank = rank // (4 // pp)  # megatron's rank order: PP outermost
        for i, got in enumerate(measured):
            largest[i, pp_rank] = max(largest.get((i, pp_rank), 0), got["bytes"])
    for (i, pp_rank), got in sorted(largest.items()):
        planned = steps[i]["per_rank"][pp_rank]["transfer_bytes"]
        assert abs(planned - got) <= OVERHEAD * got, (case, i, pp_rank, planned, got)
