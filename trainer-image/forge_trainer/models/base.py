"""Continuing a model: a local Hugging Face directory (config.json + safetensors), never downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..contract import ConfigError


def hf_config(base_path: str, vocab_size: int) -> PretrainedConfig:
    """The base model's config, with the router's loss on for an MoE (it is a training term)."""
    path = Path(base_path)
    if not (path / "config.json").exists():
        if (path / "adapter_config.json").exists():
            raise ConfigError(f"model.base_path {path}: a LoRA adapter (adapter_config.json), not a model; to continue "
                              "from a LoRA training, export it merged (training.lora.export: merged)")
        raise ConfigError(f"model.base_path {path}: no config.json (a local Hugging Face model directory is needed)")
    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.base_path {path}: config.json is not a model config that transformers knows: "
                          f"{e}") from e
    _check_causal_lm(path, cfg)
    if getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None):
        cfg.output_router_logits = True
    if vocab_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the base model only {cfg.vocab_size} embeddings")
    return cfg


def _check_causal_lm(path: Path, cfg: PretrainedConfig) -> None:
    """A decoder-only language model that AutoModelForCausalLM builds (not an encoder, a seq2seq or a vision model)."""
    known = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    archs = getattr(cfg, "architectures", None) or []
    if (cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(cfg, "is_encoder_decoder", False)
            or (archs and not any(a in known for a in archs))):
        raise ConfigError(
            f"model.base_path {path}: not a causal language model (model_type {cfg.model_type!r}, architectures "
            f"{archs or 'not given'}); sft, dpo and continued-pretrain need a decoder-only model that transformers' "
            "AutoModelForCausalLM loads, such as Llama, Mistral, Qwen2/Qwen3, Qwen3-MoE or Mixtral")


def load(base_path: str, cfg: PretrainedConfig) -> torch.nn.Module:
    try:
        return AutoModelForCausalLM.from_pretrained(
            base_path, config=cfg, attn_implementation="sdpa", dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model.base_path {base_path}: {e}") from e
