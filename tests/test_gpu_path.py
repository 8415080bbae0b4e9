"""The GPU path, checked on the CPU wherever its behaviour can be seen here (docs/gpu.md).

Each test fails on the code before its fix; what only a GPU can confirm is listed in
docs/gpu.md and exercised by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import pytest
import torch

from megatron_growloop.errors import UsageError

BASE = ["--tokenizer-type", "ByteTokenizer", "--train-iters", "2"]


def test_local_attention_backend_is_refused_with_transformer_engine():
    """megatron/training/arguments.py refuses --attention-backend local with the TE spec."""
    from megatron_growloop.training.arguments import parse_args

    with pytest.raises(UsageError, match="--attention-backend local is only supported with --transformer-impl local"):
        parse_args(BASE + ["--transformer-impl", "transformer_engine", "--attention-backend", "local"], world_size=1)


def test_local_models_leave_the_process_wide_te_attention_variables_alone(dist_1rank, monkeypatch):
    """megatron-core sets NVTE_{FLASH,FUSED,UNFUSED}_ATTN process-wide and asserts on a conflict.
    A local-spec model must neither assert on values a TE model set nor change them, so local and
    TE models can be built in one process (conversion, then training)."""
    from looping_util import build

    for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        monkeypatch.setenv(name, "1")  # what a TE model with --attention-backend auto leaves behind
    build(2)
    import os

    assert [os.environ[n] for n in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")] == ["1", "1", "1"]


def test_fallbacks_and_fp32_on_a_gpu_are_said():
    """A run that fell back from TE, or runs fp32 on a GPU, says so; on the CPU fp32 is normal."""
    from megatron_growloop.model.implementation import Implementation

    fp32 = Implementation()
    assert fp32.warnings(cuda=False) == []
    assert any("fp32 on a GPU" in w for w in fp32.warnings(cuda=True))
    assert Implementation(dtype="bf16").warnings(cuda=True) == []
    assert Implementation(dtype="bf16").warnings(cuda=True, fallback="TE missing") == ["TE missing"]
    assert fp32.describe() == "impl local, attention sdpa, fp32"
    assert Implementation(attention_backend="unfused", dtype="bf16").describe() == "impl local, attention unfused, bf16"


def test_cuda_graphs_get_the_graph_safe_rng_tracker(monkeypatch):
    """Megatron-LM seeds with use_cudagraphable_rng whenever CUDA graphs are on (and the TE tracker
    when TE is involved); seeding with force_reset_rng alone made --cuda-graph-impl local assert
    "RNG tracker does not support cudagraphs" at model build."""
    from types import SimpleNamespace

    from megatron_growloop.training import initialize

    calls = []
    monkeypatch.setattr(initialize, "model_parallel_cuda_manual_seed", lambda seed, **kw: calls.append(kw))
    opts = initialize.rng_options(SimpleNamespace(cuda_graph_impl="local", transformer_impl="local", te_rng_tracker=False))
    assert opts == {"te_rng_tracker": False, "use_cudagraphable_rng": True}
    initialize.set_seed(1234, **opts)
    assert calls[-1]["use_cudagraphable_rng"] is True
    te = initialize.rng_options(SimpleNamespace(cuda_graph_impl="transformer_engine", transformer_impl="local",
                                                te_rng_tracker=False))
    assert te == {"te_rng_tracker": True, "use_cudagraphable_rng": True}
    none = initialize.rng_options(SimpleNamespace(cuda_graph_impl="none", transformer_impl="local", te_rng_tracker=False))
    assert none == {"te_rng_tracker": False, "use_cudagraphable_rng": False}


@pytest.mark.parametrize("argv,match", [
    (["--cuda-graph-impl", "local"], "needs a GPU"),
    (["--cuda-graph-impl", "local", "--grow-method", "lidas", "--grow-final-layers", "8", "--grow-iters", "1"],
     "CUDA graphs are captured for one model"),
])
def test_cuda_graph_refusals(argv, match):
    from megatron_growloop.pretrain import parse_pretrain_args

    with pytest.raises(UsageError, match=match):
        parse_pretrain_args(BASE + argv, world_size=1)


def test_te_cuda_graphs_are_captured_after_warmup_and_deleted(dist_1rank, tmp_path, monkeypatch):
    """--cuda-graph-impl transformer_engine did nothing: nothing drove megatron-core's
    TECudaGraphHelper.  The controller captures once, after the warmup steps, with the overlapped
    parameter all-gather paused around the capture and re-attached as manual hooks (Megatron-LM's
    training.py), and deletes the graphs at the end.  The helper is a recorder here (no GPU)."""
    from megatron_growloop.pretrain import build_trainer, parse_pretrain_args
    from megatron_growloop.training import cuda_graphs

    events = []

    class Recorder:
        def __init__(self, model, config, seq_length, micro_batch_size, optimizers):
            events.append(("init", seq_length, micro_batch_size, len(optimizers)))
            self.created = False

        def graphs_created(self):
            return self.created

        def create_cudagraphs(self):
            events.append(("capture", trainer.state.iteration,
                           [len(m.remove_forward_pre_hook_handles) for m in trainer.model]))
            self.created = True

        def cuda_graph_set_manual_hooks(self):
            events.append(("manual_hooks",))

        def delete_cuda_graphs(self):
            events.append(("delete",))

    monkeypatch.setattr(cuda_graphs, "TECudaGraphHelper", Recorder)
    trainer = build_trainer(parse_pretrain_args(
        ["--tokenizer-type", "ByteTokenizer", "--mock-data", "--vocab-size", "256", "--train-iters", "5",
         "--log-interval", "5", "--use-distributed-optimizer", "--overlap-param-gather"], world_size=1))
    trainer.controllers.append(cuda_graphs.TECudaGraphs(warmup_steps=2))
    trainer.setup()
    trainer.train()
    assert events[0] == ("init", 128, 4, 1)
    # captured after the 2 warmup steps with the parameter all-gather hooks removed, then restored
    assert events[1:] == [("capture", 2, [0]), ("manual_hooks",), ("delete",)]
    assert all(len(m.remove_forward_pre_hook_handles) > 0 for m in trainer.model)


def test_checkpoint_growth_on_several_nodes_needs_a_shared_scratch(monkeypatch):
    """The scratch checkpoint of --grow-transfer checkpoint must be readable by every rank: on
    several nodes without --save or --grow-scratch-dir it would land in a node-local temp dir."""
    from megatron_growloop.pretrain import parse_pretrain_args

    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    grow = ["--grow-method", "lidas", "--grow-final-layers", "8", "--grow-iters", "2", "--grow-transfer", "checkpoint"]
    with pytest.raises(UsageError, match="shared --grow-scratch-dir"):
        parse_pretrain_args(BASE + grow, world_size=16)
    assert parse_pretrain_args(BASE + grow + ["--save", "/shared/run"], world_size=16).args.save == "/shared/run"


def test_the_loss_stays_on_the_device_and_is_read_only_at_log_intervals(dist_1rank, monkeypatch):
    """Item 9: the trainer all-reduced the loss in fp64 and ``.item()``-ed it every step, a host
    synchronisation per step on a GPU.  As Megatron-LM's ``train_step``/``training_log``, a step's
    loss is a device scalar; the host reads the window's mean at log intervals and the last loss at
    the end -- and nowhere else without --metrics-file."""
    from megatron_growloop.pretrain import build_trainer, parse_pretrain_args
    from megatron_growloop.training import trainer as trainer_mod

    reads = []
    real = trainer_mod.loss_value

    def counting(loss):
        reads.append(loss)
        return real(loss)

    monkeypatch.setattr(trainer_mod, "loss_value", counting)
    trainer = build_trainer(parse_pretrain_args(
        ["--tokenizer-type", "ByteTokenizer", "--mock-data", "--vocab-size", "256", "--train-iters", "6",
         "--log-interval", "3"], world_size=1))
    trainer.setup()
    steps = []
    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda: steps.append(real_step()) or steps[-1])
    summary = trainer.train()
    assert len(steps) == 6 and all(isinstance(s["loss"], torch.Tensor) and s["loss"].dim() == 0 for s in steps)
    assert len(reads) == 3, reads  # iterations 3 and 6 (window means) and the final loss
    # the logged value is the mean of the window's per-step losses; the final one is the last step's
    assert reads[1].item() == pytest.approx(sum(float(s["loss"]) for s in steps[3:]) / 3, rel=1e-6)
    assert summary["final_loss"] == float(steps[-1]["loss"])
