"""Shared cores of the training framework: config, distributed, engine, trainer, checkpoints, data."""
