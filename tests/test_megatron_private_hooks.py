"""Every private megatron-core attribute the project relies on, named in one place.

megatron-core is pinned to the tested range in ``setup.py``; an upgrade that renames or
changes one of these hooks fails here, loudly and in one place, instead of deep inside a
training run.  When you use a new private attribute, add it to this file.
"""

from __future__ import annotations

import inspect

from packaging.version import Version

TESTED = (Version("0.16.1"), Version("0.17"))


def _source(obj) -> str:
    return inspect.getsource(obj)


def test_megatron_core_is_in_the_tested_range():
    import megatron.core

    v = Version(megatron.core.__version__)
    assert TESTED[0] <= v < TESTED[1], f"megatron-core {v} is outside the tested range [{TESTED[0]}, {TESTED[1]})"


def test_private_hooks_exist_with_the_semantics_we_rely_on():
    from megatron.core.distributed import param_and_grad_buffer as pgb
    from megatron.core.models.gpt import gpt_model
    from megatron.core.optimizer import distrib_optimizer as do
    from megatron.core.optimizer.optimizer import ChainedOptimizer
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.transformer_block import TransformerBlock

    # model/gpt.py: GPTModel.__init__ builds the decoder through the module-level name
    # ``TransformerBlock``, which _decoder_block_class swaps for LoopedTransformerBlock.
    assert gpt_model.TransformerBlock is TransformerBlock
    assert "TransformerBlock(" in _source(gpt_model.GPTModel.__init__)
    # model/gpt.py: GrowLoopGPTModel overrides the NVTE_* environment setter LanguageModule calls.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    assert "self._set_attention_backend()" in _source(LanguageModule.__init__)
    assert "NVTE_FLASH_ATTN" in _source(LanguageModule._set_attention_backend)

    # looping/block.py: full recomputation looks layers up through ``_get_layer`` (also while
    # recomputing in the backward), and the block's forward reads ``self.layers`` and
    # ``num_layers_per_pipeline_rank``, which the scheduled view replaces for one forward.
    assert "self._get_layer(" in _source(TransformerBlock._checkpointed_forward)
    assert "num_layers_per_pipeline_rank" in _source(TransformerBlock.__init__) + _source(TransformerBlock)
    assert "self.layers" in _source(TransformerBlock.forward)

    # looping/ddp.py: the bucket groups' first-batch learning of grad-ready counts.
    init = _source(pgb._ParamAndGradBucketGroup)
    for name in ("is_first_batch", "golden_per_param_grad_ready_counts", "per_param_grad_ready_counts",
                 "grad_reduce_handle"):
        assert name in init, name

    # platform/cpu.py: megatron's CUDA RNG helpers, re-pointed at the CPU generator.
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        assert callable(getattr(mrandom, name)), name
    assert "_set_cuda_rng_state(" in _source(mrandom.CudaRNGStatesTracker.fork)

    # training/optimizer_state.py: torch Adam under the DistributedOptimizer, and its DP-local state.
    assert isinstance(do.HAVE_APEX_OR_TE, bool)
    for name in ("_get_main_param_and_optimizer_states", "_set_main_param_and_optimizer_states",
                 "load_parameter_state_from_fully_reshardable", "load_parameter_state_from_dp_reshardable"):
        assert callable(getattr(do.DistributedOptimizer, name)), name
    assert '"param_map"' in _source(do.DistributedOptimizer.sharded_param_state_fs_model_space) or \
        "'param_map'" in _source(do.DistributedOptimizer.sharded_param_state_fs_model_space)
    assert "gbuf_ranges" in _source(do.DistributedOptimizer.__init__)
    assert callable(ChainedOptimizer._synchronize_steps)


def test_private_checkpoint_helpers():
    from megatron.core.dist_checkpointing.strategies import torch as mtorch

    # training/save_strategy.py: the synchronous torch_dist writer reuses megatron's key mapping.
    fn = mtorch._replace_state_dict_keys_with_sharded_keys
    assert list(inspect.signature(fn).parameters)[:2] == ["sharded_state_dict", "keep_only_main_replica"]


def test_rotary_embedding_apply_scaling_takes_all_llama3_factors():
    """model/rope.py rescales RoPE frequencies with ``RotaryEmbedding._apply_scaling`` and passes
    all four Llama-3 parameters (megatron-core's ``__init__`` passes only the factor)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    params = inspect.signature(RotaryEmbedding._apply_scaling).parameters
    for name in ("freqs", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        assert name in params, name
