"""Continuing a model: a local Hugging Face directory (config.json + safetensors), never downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..contract import ConfigError


def hf_config(base_path: str, vocab_size: int) -> PretrainedConfig:
    """The base model's config, with the router's loss on for an MoE (it is a training term)."""
    path = Path(base_path)
    if not (path / "config.json").exists():
        raise ConfigError(f"model.base_path {path}: no config.json (a local Hugging Face model directory is needed)")
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None):
        cfg.output_router_logits = True
    if vocab_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the base model only {cfg.vocab_size} embeddings")
    return cfg


def load(base_path: str, cfg: PretrainedConfig) -> torch.nn.Module:
    try:
        return AutoModelForCausalLM.from_pretrained(
            base_path, config=cfg, attn_implementation="sdpa", dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model.base_path {base_path}: {e}") from e
