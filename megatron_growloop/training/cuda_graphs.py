"""``--cuda-graph-impl transformer_engine``: capture Transformer Engine CUDA graphs as
Megatron-LM's ``megatron/training/training.py`` does.

megatron-core's ``TECudaGraphHelper`` captures every layer's forward and backward once the
run has warmed up; nothing captures them unless the training loop drives it.  This
controller does, at the same points as Megatron-LM's ``train``: build the helper over the
model chunks and optimizer, capture after ``--cuda-graph-warmup-steps`` steps (with the
distributed optimizer's overlapped parameter all-gather paused during capture and
re-attached as manual hooks afterwards), delete the graphs at the end.  (The local
implementation, ``--cuda-graph-impl local``, captures inside megatron-core's layers and
needs only the graph-safe RNG tracker, see :func:`.initialize.rng_options`.)
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from megatron.core.transformer.cuda_graphs import TECudaGraphHelper

from .controller import Controller


class TECudaGraphs(Controller):
    def __init__(self, warmup_steps: int):
        self.warmup_steps = int(warmup_steps)
        self.helper = None
        self.start_iteration = 0

    def setup(self, trainer, resume: Optional[Dict[str, Any]]) -> None:
        a = trainer.args
        self.helper = TECudaGraphHelper(model=trainer.model, config=trainer.config, seq_length=a.seq_length,
                                        micro_batch_size=a.micro_batch_size, optimizers=[trainer.optimizer])
        self.start_iteration = trainer.state.iteration
        self.pause_param_gather = bool(a.use_distributed_optimizer and a.overlap_param_gather)

    def before_step(self, trainer) -> None:
        if self.helper.graphs_created() or trainer.state.iteration - self.start_iteration != self.warmup_steps:
            return
        if self.pause_param_gather:  # should_disable_forward_pre_hook in Megatron-LM
            for m in trainer.model:
                m.disable_forward_pre_hook(param_sync=False)
        self.helper.create_cudagraphs()
        if self.pause_param_gather:
            for m in trainer.model:
                m.enable_forward_pre_hook()
            self.helper.cuda_graph_set_manual_hooks()
        trainer.log_text(f"iteration {trainer.state.iteration}: captured Transformer Engine CUDA graphs")

    def finish(self, trainer) -> Dict[str, Any]:
        if self.helper is not None and self.helper.graphs_created():
            self.helper.delete_cuda_graphs()
        return {}
