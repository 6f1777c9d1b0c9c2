"""Export: the trained model in Hugging Face format plus provenance.json (and its signature).

The directory is written under a temporary name and renamed when complete:
an output directory that exists holds a model that loads, its record and the modes it was asked for.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Protocol

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from ..provenance import set_modes, write_record
from .dist import Dist

TRAINING_LOG = "training_log.jsonl"
"""The training's curve beside the model: one JSON object per line, {step, loss} or {step, val_loss}."""


class ExportedTokenizer(Protocol):
    """What the export needs of a tokenizer (data.tokenizer.TextTokenizer is one)."""

    eos_id: int
    stop_ids: list[int]

    def save_pretrained(self, out_dir: str | Path) -> None: ...


class Adapters(Protocol):
    """What the export needs of a LoRA training (models.lora.LoraExport is one)."""

    def wrap(self, plain: torch.nn.Module) -> torch.nn.Module:
        """The plain model with the adapters, shaped like the trained model's state."""

    def finish(self, wrapped: torch.nn.Module) -> torch.nn.Module:
        """The model to save: the adapters merged in, or the adapter alone (a peft model)."""


def export(out_dir: str | Path, model, hf_cfg: PretrainedConfig, tokenizer: ExportedTokenizer, provenance: dict,
           d: Dist, adapters: Adapters | None = None, log_history: list[dict] = (), signing_key=None,
           file_mode: int = 0o644) -> Path | None:
    """Gather the full weights (a collective) and write the export on rank 0; with ``adapters`` (LoRA),
    the merged model or the adapter alone, as it says; ``log_history`` (the training's curve) as
    training_log.jsonl. The record, last, gets every exported file's hash and, with ``signing_key``
    (Ed25519), a signature; the files get ``file_mode``."""
    state = plain_tensors(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    if not d.is_main:
        return None
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        # A plain model (the trained one may be sharded or compiled), built empty on the meta device and
        # given the gathered tensors themselves: no second copy of the weights, no initialisation.
        plain = meta_model(hf_cfg)
        trained = adapters.wrap(plain) if adapters is not None else plain
        dtypes = {k: v.dtype for k, v in trained.state_dict().items()}
        state = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in state.items()}
        missing, unexpected = trained.load_state_dict(state, strict=False, assign=True)
        if getattr(plain.config, "tie_word_embeddings", False):
            plain.tie_weights()  # the output head is the (new) embedding again
        empty = [n for n, t in (*trained.named_parameters(), *trained.named_buffers()) if t.is_meta]
        if unexpected or empty:
            raise RuntimeError(f"export: state dict mismatch (missing {missing}, unexpected {unexpected})")
        for_inference(plain.config)
        plain.generation_config = generation_config(tokenizer)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        (adapters.finish(trained) if adapters is not None else plain).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINING_LOG).write_text("".join(json.dumps(h) + "\n" for h in log_history))
        write_record(tmp, provenance, signing_key)
        set_modes(tmp, file_mode)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex}.old"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with plain tensors where the model's are wrappers of them: the weights of FP8 layers
    gathered in FP8 (torchao's WeightWithDynamicFloat8CastTensor keeps the weight itself as ``_tensor``),
    which safetensors cannot write."""
    def plain(t: torch.Tensor) -> torch.Tensor:
        inner = getattr(t, "_tensor", None)
        while type(t) not in (torch.Tensor, torch.nn.Parameter) and isinstance(inner, torch.Tensor):
            t, inner = inner, getattr(inner, "_tensor", None)
        return t

    return {k: plain(v) for k, v in state.items()}


def for_inference(cfg: PretrainedConfig) -> PretrainedConfig:
    """The config as a loaded model uses it: with the KV cache, and without the router's auxiliary loss
    (a training term: a loaded model's loss is the plain cross-entropy)."""
    cfg.use_cache = True
    if getattr(cfg, "output_router_logits", False):
        cfg.output_router_logits = False
    return cfg


def generation_config(tokenizer: ExportedTokenizer) -> GenerationConfig:
    """Generation stops at the tokenizer's stop tokens and pads with end-of-text."""
    return GenerationConfig(
        bos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.stop_ids if len(tokenizer.stop_ids) > 1 else tokenizer.eos_id,
    )


def write_model_files(folder: Path, hf_cfg: PretrainedConfig, tokenizer: ExportedTokenizer) -> None:
    """Everything of a Hugging Face model folder but the weights: config.json, generation_config.json and
    the tokenizer (a checkpoint keeps them so that it loads as a model without the training's config)."""
    folder.mkdir(parents=True, exist_ok=True)
    for_inference(copy.deepcopy(hf_cfg)).save_pretrained(folder)
    generation_config(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def meta_model(cfg: PretrainedConfig) -> torch.nn.Module:
    """The plain model on the meta device (no memory, no initialisation), but for the buffers its modules
    compute when built (the rotary embedding's frequencies), which are real, on the host."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    for module in model.modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            _rebuild_buffers(module)
    return model


def _rebuild_buffers(module: torch.nn.Module) -> None:
    """Build a module that computes its buffers (a Hugging Face rotary embedding: built from the model's
    config, with no parameters) again on the host, and take its buffers."""
    if getattr(module, "config", None) is None or next(module.parameters(recurse=False), None) is not None:
        raise RuntimeError(f"{type(module).__name__} computes buffers when built and cannot be built again alone")
    fresh = type(module)(module.config)
    for name, buffer in fresh.named_buffers(recurse=False):
        module._buffers[name] = buffer
