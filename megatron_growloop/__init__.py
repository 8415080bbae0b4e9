"""megatron_growloop: looped and depth-grown LLM pretraining on megatron-core.

Where things live:

* :mod:`megatron_growloop.platform` -- CPU support for megatron-core (the only place).
* :mod:`megatron_growloop.model` -- SmolLM/Llama presets and the GPTModel builder.
* :mod:`megatron_growloop.looping` -- loop specs, schedules and the looped block.
* :mod:`megatron_growloop.growth` -- MIDAS/LIDAS operators, PROP-alpha, growth steps.
* :mod:`megatron_growloop.training` -- arguments, the training loop, checkpoints.
* :mod:`megatron_growloop.data` -- tokenizers, preprocessing, datasets, default corpus.
* :mod:`megatron_growloop.accounting` -- parameter and FLOPs accounting.
* :mod:`megatron_growloop.convert`, :mod:`~megatron_growloop.eval`,
  :mod:`~megatron_growloop.analysis` -- tools.
"""

__version__ = "0.1.0"
