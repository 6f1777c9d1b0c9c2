"""Forge trainer: the torch training loop that runs inside each worker pod."""
