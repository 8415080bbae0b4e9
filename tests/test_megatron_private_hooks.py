"""Every private megatron-core attribute the project relies on, named in one place.

megatron-core is pinned to the tested range in ``setup.py``; an upgrade that renames or
changes one of these hooks fails here, loudly and in one place, instead of deep inside a
training run.  When you use a new private attribute, add it to this file.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest
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

    # training/save_strategy.py: the synchronous torch_dist writer (used for every save: training,
    # conversion, growth scratch) reuses megatron's key mapping, state-dict conversion and planner.
    fn = mtorch._replace_state_dict_keys_with_sharded_keys
    assert list(inspect.signature(fn).parameters)[:2] == ["sharded_state_dict", "keep_only_main_replica"]
    for name in ("mcore_to_pyt_state_dict", "MCoreSavePlanner", "TorchDistSaveShardedStrategy"):
        assert hasattr(mtorch, name), name


def test_split_matrix_is_read_from_the_config():
    """data/datasets.py sets ``config.split_matrix`` after construction (to not build splits nobody
    asks samples of: an empty one loops forever in ``GPTDataset._get_num_epochs``); the builder
    must read that attribute rather than re-deriving it from ``split``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
    from megatron.core.datasets.gpt_dataset import GPTDataset

    names = {f.name for f in dataclasses.fields(BlendedMegatronDatasetConfig)}
    assert "split_matrix" in names
    assert "self.config.split_matrix" in inspect.getsource(BlendedMegatronDatasetBuilder._build_blended_dataset_splits)
    assert hasattr(GPTDataset, "_get_num_epochs")  # the loop data/validate.py guards against


def test_tensor_parallel_attributes_are_set_by_initialization():
    """training/factory.py keeps megatron-core's initialization before the layout-independent
    re-draw because ``_initialize_affine_weight_gpu`` is where the tensor-parallel attributes of
    the weights are set (the gradient norm needs them at TP>1)."""
    from megatron.core.tensor_parallel import layers

    src = inspect.getsource(layers._initialize_affine_weight_gpu)
    assert "set_tensor_model_parallel_attributes" in src


def test_rotary_embedding_apply_scaling_takes_all_llama3_factors():
    """model/rope.py rescales RoPE frequencies with ``RotaryEmbedding._apply_scaling`` and passes
    all four Llama-3 parameters (megatron-core's ``__init__`` passes only the factor)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    params = inspect.signature(RotaryEmbedding._apply_scaling).parameters
    for name in ("freqs", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        assert name in params, name


# Module globals and methods read, called or replaced by issue 13's fast path (the hooks above are
# checked with their semantics): (module, attribute, who uses it and why)
HOOKS = [
    ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl",
     "training/fused_optimizer.py: replaced by a torch._foreach version when it is megatron's fallback"),
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl", "training/fused_optimizer.py: as above"),
    ("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl", "training/fused_optimizer.py: as above"),
    ("megatron.core.utils", "local_multi_tensor_scale",
     "training/fused_optimizer.py: identifies the fallback it replaces"),
    ("megatron.core.utils", "local_multi_tensor_l2_norm", "training/fused_optimizer.py: as above"),
    ("megatron.core.transformer.dot_product_attention.DotProductAttention", "forward",
     "model/attention.py: SDPAttention's fallback for softmax offsets and sliding windows"),
    ("megatron.core.fusions.fused_softmax.FusedScaleMaskSoftmax", "forward_torch_softmax",
     "model/attention.py: reads .scale and .window_size set by this module's __init__"),
]


def _resolve(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


@pytest.mark.parametrize("owner,name,why", HOOKS, ids=[f"{o.rsplit('.', 1)[-1]}.{n}" for o, n, _ in HOOKS])
def test_private_hook_exists(owner, name, why):
    assert hasattr(_resolve(owner), name), f"megatron-core no longer has {owner}.{name} ({why})"


def test_dot_product_attention_keeps_the_attributes_sdpa_reads(dist_1rank):
    """SDPAttention reuses DotProductAttention.__init__ and reads what it sets."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from looping_util import tiny_arch
    from megatron_growloop.model.config import build_transformer_config

    core = DotProductAttention(build_transformer_config(tiny_arch(2)), 1, AttnMaskType.causal, "self")
    for name in ("softmax_scale", "softmax_offset", "attention_dropout", "attn_mask_type",
                 "hidden_size_per_partition"):
        assert hasattr(core, name), name
    assert hasattr(core.scale_mask_softmax, "scale") and hasattr(core.scale_mask_softmax, "window_size")


# ---- issue 16: truncated backprop in the looped block, grad-ready counts per schedule

def test_transformer_block_checkpointed_forward_and_get_layer():
    """looping/block.py overrides ``TransformerBlock._get_layer`` (megatron-core's full recomputation
    looks applications up through it, also in the backward pass) and ``_checkpointed_forward``;
    looping/truncation.py calls the parent ``_checkpointed_forward`` with a stand-in ``self`` that
    provides ``_get_layer``, ``num_layers_per_pipeline_rank``, ``config`` (and delegates the rest),
    passing megatron-core's keyword arguments through."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    assert hasattr(TransformerBlock, "_get_layer")
    params = inspect.signature(TransformerBlock._checkpointed_forward).parameters
    for name in ("hidden_states", "attention_mask", "context", "context_mask", "rotary_pos_emb", "attention_bias",
                 "packed_seq_params", "use_inner_quantization_context", "padding_mask"):
        assert name in params, name
    src = inspect.getsource(TransformerBlock._checkpointed_forward)
    for use in ("self._get_layer(", "self.num_layers_per_pipeline_rank", "self.config.recompute_num_layers",
                "self.config.recompute_method"):
        assert use in src, use
    forward = inspect.getsource(TransformerBlock.forward)
    assert "self._checkpointed_forward(" in forward and "hidden_states=hidden_states" in forward
    assert "for l_no, layer in enumerate(self.layers)" in forward


def test_ddp_bucket_group_grad_ready_counts():
    """looping/ddp.py resets and re-installs the grad-ready counts of megatron-core's
    ``_ParamAndGradBucketGroup`` (``DistributedDataParallel.bucket_groups``)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    init = inspect.getsource(_ParamAndGradBucketGroup.__init__)
    for attr in ("self.golden_per_param_grad_ready_counts", "self.per_param_grad_ready_counts",
                 "self.is_first_batch", "self.grad_reduce_handle", "self.params"):
        assert attr in init, attr
    reset = inspect.getsource(_ParamAndGradBucketGroup.reset)
    assert "self.golden_per_param_grad_ready_counts = self.per_param_grad_ready_counts" in reset
    ready = inspect.getsource(_ParamAndGradBucketGroup.register_grad_ready)
    assert "self.per_param_grad_ready_counts == self.golden_per_param_grad_ready_counts" in ready
    assert "self.bucket_groups" in inspect.getsource(DistributedDataParallel.__init__)


def test_pipeline_backward_step_sends_the_input_tensor_grad():
    """Why looping/truncation.py joins the no-grad state with a zero gradient instead of
    detaching: megatron-core's ``backward_step`` returns ``x.grad`` of the stage input as the
    gradient to send to the previous stage (None would send nothing)."""
    from megatron.core.pipeline_parallel import schedules

    src = inspect.getsource(schedules.backward_step)
    assert "input_tensor_grad.append(x.grad)" in src
