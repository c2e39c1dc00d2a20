"""Stability guards: gradient clipping, non-finite step skipping, checkpointing and DeepSpeed settings."""
