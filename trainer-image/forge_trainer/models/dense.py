"""Dense models: Llama (LlamaForCausalLM)."""

from __future__ import annotations

from transformers import LlamaConfig

from ..config import ArchitectureConfig


def hf_config(a: ArchitectureConfig, **common) -> LlamaConfig:
    return LlamaConfig(intermediate_size=a.intermediate_size, head_dim=a.hidden_size // a.num_attention_heads, **common)
