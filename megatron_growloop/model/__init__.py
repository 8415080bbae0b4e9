"""The model: the architecture record (``Arch``), presets, the megatron-core config and ``GPTModel``, the local spec's fast path."""
