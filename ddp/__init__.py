"""The DDP core: environment, process groups, data, precision, checkpoints and the training loop."""
