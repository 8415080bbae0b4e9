"""The trainer on megatron-core: arguments, the training loop, checkpoints, controllers, the run around it."""
