"""Loading the model to evaluate: a Forge export or any Hugging Face causal LM folder, never downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..contract import ConfigError


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    path: str

    @property
    def context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id


def load_model(path: str, field: str, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """The model and tokenizer in `path`; a ConfigError naming `field` when it cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{field} {path}: no such model folder")
    if not (p / "config.json").exists():
        raise ConfigError(f"{field} {path}: no config.json (a Hugging Face model folder is needed)")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{field} {path}: cannot be loaded: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tok, device=dev, path=str(p))
