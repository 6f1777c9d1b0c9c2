"""Models: Hugging Face causal LMs, dense or MoE, built from the config or loaded from a local base,
with the arithmetic the loop needs (parameters, FLOPs, memory) and their sharding."""
