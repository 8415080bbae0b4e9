"""The GPT model: megatron-core's ``GPTModel`` with a :class:`LoopedTransformerBlock`.

Every model the project builds -- baseline, grown or looped -- is a
:class:`GrowLoopGPTModel`; a baseline simply has the identity schedule, which is
why any block of any model can be repeated at inference time.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional, Sequence

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt import gpt_model as _gpt_model_module

from ..errors import UsageError
from ..looping.block import LoopedTransformerBlock
from ..looping.spec import LoopSpec, RepeatBlock
from .config import GrowLoopConfig


@contextmanager
def _decoder_block_class(cls):
    """``GPTModel.__init__`` hard-codes ``TransformerBlock``; build ours in its place."""
    saved = _gpt_model_module.TransformerBlock
    _gpt_model_module.TransformerBlock = cls
    try:
        yield
    finally:
        _gpt_model_module.TransformerBlock = saved


def layer_spec(transformer_impl: str = "local"):
    """The megatron-core layer spec: Transformer Engine when asked and importable."""
    if transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except Exception as exc:  # pragma: no cover - exercised on GPU machines only
            raise UsageError(
                "--transformer-impl transformer_engine needs Transformer Engine "
                f"(pip install .[gpu]); it failed to import: {exc}"
            ) from None
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    if transformer_impl != "local":
        raise UsageError(
            f"unknown --transformer-impl {transformer_impl!r}; choose transformer_engine or local"
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


class GrowLoopGPTModel(GPTModel):
    """``GPTModel`` whose decoder applies its unique layers along a schedule."""

    def __init__(self, config: GrowLoopConfig, transformer_layer_spec, **kwargs):
        with _decoder_block_class(LoopedTransformerBlock):
            super().__init__(config, transformer_layer_spec, **kwargs)
        self.apply_schedule()

    # ------------------------------------------------------------------ schedule API
    @property
    def loop_spec(self) -> Optional[LoopSpec]:
        return self.config.loop_spec()

    @property
    def schedule(self) -> List[int]:
        """Global unique-layer indices in application order (effective depth = its length)."""
        return self.config.schedule()

    @property
    def effective_depth(self) -> int:
        return len(self.schedule)

    def apply_schedule(self) -> None:
        """(Re)install the schedule derived from ``config.loop``/``config.repeat_blocks``."""
        self.decoder.set_global_schedule(self.schedule)

    def set_loop_repeats(self, repeats: int) -> None:
        """Change k of the loop without rebuilding (inference, or between training phases)."""
        spec = self.loop_spec
        if spec is None:
            raise UsageError(
                "this model has no loop; use --repeat-block START:END:R to repeat a block "
                "or --retrofit-loop to train one"
            )
        if int(repeats) < 1:
            raise UsageError(f"loop repeats must be >= 1, got {repeats}")
        self.config.loop = str(spec.with_repeats(int(repeats)))
        self.apply_schedule()

    def set_repeat_blocks(self, blocks: Sequence) -> None:
        """Repeat blocks of the effective-depth axis at inference (``S:E:R`` each)."""
        parsed = [b if isinstance(b, RepeatBlock) else RepeatBlock.parse(str(b)) for b in blocks]
        old = self.config.repeat_blocks
        self.config.repeat_blocks = tuple(str(b) for b in parsed)
        try:
            self.apply_schedule()
        except UsageError:
            self.config.repeat_blocks = old
            self.apply_schedule()
            raise


def build_model(
    config: GrowLoopConfig,
    vocab_size: int,
    max_sequence_length: int,
    rotary_base: float = 10000.0,
    share_embeddings_and_output_weights: bool = True,
    transformer_impl: str = "local",
    rope_scaling: bool = False,
    rope_scaling_factor: float = 8.0,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    parallel_output: bool = True,
) -> GrowLoopGPTModel:
    """Build this pipeline stage's part of the model (whole model when PP=1).

    ``parallel_output=False`` gathers the logits over tensor-parallel ranks (inference)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return GrowLoopGPTModel(
        config,
        layer_spec(transformer_impl),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(rotary_base) if float(rotary_base).is_integer() else rotary_base,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_scaling_factor,
    )
