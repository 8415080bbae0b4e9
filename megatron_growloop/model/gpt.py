"""The GPT model: megatron-core's ``GPTModel`` with a :class:`LoopedTransformerBlock`.

Every model the project builds -- baseline, grown or looped -- is a
:class:`GrowLoopGPTModel`; a baseline simply has the identity schedule, which is
why any block of any model can be repeated at inference time.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import List, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt import gpt_model as _gpt_model_module
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

from .. import platform
from ..errors import UsageError
from ..looping.block import LoopedTransformerBlock
from ..looping.spec import RepeatBlock
from .arch import Arch
from .config import GrowLoopConfig, build_transformer_config
from .implementation import Implementation
from .local_spec import local_block_spec, local_layer_spec
from .parallel import ParallelLayout
from .rope import apply_llama3_rope_scaling

NVTE_ATTENTION_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@contextmanager
def _decoder_block_class(cls):
    """``GPTModel.__init__`` hard-codes ``TransformerBlock``; build ours in its place."""
    saved = _gpt_model_module.TransformerBlock
    _gpt_model_module.TransformerBlock = cls
    try:
        yield
    finally:
        _gpt_model_module.TransformerBlock = saved


def layer_spec(impl: Implementation, config: Optional[GrowLoopConfig] = None):
    """The megatron-core layer spec: Transformer Engine when asked and importable, else the local
    spec with torch's fused kernels (:mod:`.local_spec`; given ``config``, the block spec)."""
    if impl.transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401  (optional dependency)
        except Exception as exc:  # pragma: no cover - exercised on GPU machines only
            raise UsageError(
                "--transformer-impl transformer_engine needs Transformer Engine "
                f"(pip install .[gpu]); it failed to import: {exc}"
            ) from None

        return get_gpt_layer_with_transformer_engine_spec()
    if impl.transformer_impl != "local":
        raise UsageError(
            f"unknown --transformer-impl {impl.transformer_impl!r}; choose transformer_engine or local"
        )
    return local_layer_spec(impl) if config is None else local_block_spec(impl, config)


class GrowLoopGPTModel(GPTModel):
    """``GPTModel`` whose decoder applies its unique layers along a schedule."""

    config: GrowLoopConfig

    def __init__(self, config: GrowLoopConfig, transformer_layer_spec, transformer_impl: str = "local", **kwargs):
        self._transformer_impl = transformer_impl
        with _decoder_block_class(LoopedTransformerBlock):
            super().__init__(config, transformer_layer_spec, **kwargs)
        self.apply_schedule()

    def _set_attention_backend(self):
        """megatron-core steers Transformer Engine's attention through the process-global
        ``NVTE_{FLASH,FUSED,UNFUSED}_ATTN`` variables and asserts when a later model wants other
        values.  They only matter to TE: a local-spec model leaves them alone (so a converter or
        evaluation run in the same process can still build a TE model), and a TE model that
        conflicts with what an earlier one set gets one line instead of an assertion."""
        if self._transformer_impl != "transformer_engine":
            return
        try:
            super()._set_attention_backend()
        except AssertionError:
            current = {k: os.environ.get(k) for k in NVTE_ATTENTION_VARIABLES}
            raise UsageError(
                f"--attention-backend {self.config.attention_backend.name} conflicts with the attention backend "
                f"already set in this process ({current}); use one attention backend per process, or unset "
                "NVTE_FLASH_ATTN, NVTE_FUSED_ATTN and NVTE_UNFUSED_ATTN"
            ) from None

    # ------------------------------------------------------------------ schedule API
    @property
    def schedule(self) -> List[int]:
        """Global unique-layer indices in application order (effective depth = its length)."""
        return self.config.schedule()

    @property
    def effective_depth(self) -> int:
        return len(self.schedule)

    @property
    def backward_depth(self) -> int:
        """Layer applications that back-propagate a gradient (< effective depth with truncation)."""
        return self.config.backward_depth

    def apply_schedule(self) -> None:
        """(Re)install the schedule derived from ``config.loop``/``config.repeat_blocks``."""
        self.decoder.set_global_schedule(self.schedule, no_grad_positions=self.config.no_grad_positions())

    def set_loop_repeats(self, repeats: int) -> None:
        """Change k of the loop without rebuilding (inference, or between training phases)."""
        if self.config.loop is None:
            raise UsageError(
                "this model has no loop; use --repeat-block START:END:R to repeat a block "
                "or --retrofit-loop to train one"
            )
        if int(repeats) < 1:
            raise UsageError(f"loop repeats must be >= 1, got {repeats}")
        self.config.loop = self.config.loop.with_repeats(int(repeats))
        self.apply_schedule()

    def set_loop_backprop_depth(self, depth: Optional[int]) -> None:
        """Training: back-propagate through only the last ``depth`` applications of the
        recurrent block (None: all); the earlier ones run without autograd."""
        if depth is not None and (self.config.loop is None or int(depth) < 1):
            raise UsageError(f"loop backprop depth {depth}: needs a looped model and a depth >= 1")
        self.config.loop_backprop_depth = None if depth is None else int(depth)
        self.apply_schedule()

    def set_repeat_blocks(self, blocks: Sequence) -> None:
        """Repeat blocks of the effective-depth axis at inference (``S:E:R`` each)."""
        parsed = tuple(b if isinstance(b, RepeatBlock) else RepeatBlock.parse(str(b)) for b in blocks)
        old = self.config.repeat_blocks
        self.config.repeat_blocks = parsed
        try:
            self.apply_schedule()
        except UsageError:
            self.config.repeat_blocks = old
            self.apply_schedule()
            raise


def build_model(
    arch: Arch,
    layout: ParallelLayout = ParallelLayout(),
    impl: Implementation = Implementation(),
    repeat_blocks: Sequence[RepeatBlock] = (),
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    parallel_output: bool = True,
    initialize: bool = True,
    to_device: bool = True,
) -> GrowLoopGPTModel:
    """Build this pipeline stage's part of ``arch`` (the whole model when PP=1).

    ``parallel_output=False`` gathers the logits over tensor-parallel ranks (inference);
    ``initialize=False`` skips random initialisation (every parameter is overwritten next);
    ``to_device`` moves the model to the GPU when there is one."""
    config = build_transformer_config(arch, layout, impl, repeat_blocks, initialize=initialize)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    rotary_base = arch.rotary_base
    model = GrowLoopGPTModel(
        config,
        layer_spec(impl, config),
        transformer_impl=impl.transformer_impl,
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tied,
        position_embedding_type="rope",
        rotary_base=int(rotary_base) if float(rotary_base).is_integer() else rotary_base,
        rope_scaling=False,  # megatron-core would hard-code three of the four factors; see model/rope.py
    )
    if arch.rope_scaling:
        apply_llama3_rope_scaling(model, arch.rope_scaling_factor, arch.rope_low_freq_factor,
                                  arch.rope_high_freq_factor, arch.rope_original_max_position_embeddings)
    if to_device and platform.has_cuda():
        model.cuda(torch.cuda.current_device())
    return model


def build_inference_model(
    arch: Arch,
    repeat_blocks: Sequence[RepeatBlock] = (),
    impl: Implementation = Implementation(),
    parallel_output: bool = False,
    initialize: bool = True,
    to_device: bool = True,
) -> GrowLoopGPTModel:
    """This rank's part of ``arch`` at the initialised parallel layout, in eval mode, with
    logits gathered over TP.  Weights are random until a checkpoint is loaded into it."""
    layout = ParallelLayout.current()
    arch.check_parallel(layout.tp, layout.pp)
    model = build_model(arch, layout, impl, repeat_blocks, parallel_output=parallel_output,
                        initialize=initialize, to_device=to_device)
    model.eval()
    return model
