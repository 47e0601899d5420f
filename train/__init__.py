"""Training application: `python -m train` (config, PopTorch/PyTorch engines, loop, checkpoints, logging)."""
