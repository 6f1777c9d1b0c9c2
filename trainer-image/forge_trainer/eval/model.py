"""Loading the model to evaluate: a Forge export, any Hugging Face causal LM folder, or a training's
checkpoint (DCP, read on this one process), never downloaded."""

from __future__ import annotations

import json
import warnings
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
    """The model and tokenizer in `path` (a model folder, a training's checkpoint folder, or one of its
    checkpoints); a ConfigError naming `field` when it cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..runtime.checkpoint import MODEL_FILES

    hf_logging.disable_progress_bar()
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{field} {path}: no such model folder")
    ckpt = training_checkpoint(p)
    files = ckpt / MODEL_FILES if ckpt is not None else p
    if not (files / "config.json").exists():
        raise ConfigError(f"{field} {path}: " + (
            f"checkpoint {ckpt.name} has no {MODEL_FILES}/config.json (written by an older trainer: evaluate the "
            "training's export)" if ckpt is not None else
            "no config.json (a Hugging Face model folder or a training's checkpoint folder is needed)"))
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    try:
        tok = AutoTokenizer.from_pretrained(str(files), local_files_only=True)
        if ckpt is not None:
            model = load_checkpoint(ckpt).to(getattr(torch, dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"{field} {path}: cannot be loaded: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tok, device=dev, path=str(p))


def training_checkpoint(path: Path) -> Path | None:
    """The checkpoint `path` is, or the newest complete one in it (a training's checkpoint.dir); None
    when it is neither."""
    from ..runtime.checkpoint import find_latest, is_complete

    return path if is_complete(path) else find_latest(path)


def load_checkpoint(ckpt: Path) -> torch.nn.Module:
    """The model of a DCP checkpoint on one process: built from the config saved with it, its weights
    read from the shards of however many workers wrote them; a LoRA training's adapters merged in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..config import LoraConfig
    from ..models.lora import add_adapters
    from ..runtime.checkpoint import MODEL_FILES, STATE_FILE

    cfg = AutoConfig.from_pretrained(str(ckpt / MODEL_FILES), local_files_only=True)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    trainer = json.loads((ckpt / STATE_FILE).read_text()).get("config", {})
    lora = trainer.get("training", {}).get("lora")
    if lora is not None:
        model = add_adapters(model, LoraConfig.model_validate(lora), trainer.get("model", {}).get("base_path"))
    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(model, state["model"])
    return model.merge_and_unload() if lora is not None else model
