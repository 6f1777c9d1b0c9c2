"""Loading the model to evaluate: a Forge export, any Hugging Face causal LM folder, or a training's
checkpoint (DCP, read on this one process), never downloaded. On one GPU or the CPU the whole model sits on
that device; with several GPUs it is split across them by layers (accelerate's big-model inference: each
GPU holds a run of whole decoder layers and the batches flow through them in turn)."""

from __future__ import annotations

import contextlib
import json
import logging
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
    """Where inputs go: the device of the input embedding (the first GPU of a split model); outputs come
    back there."""
    path: str

    @property
    def context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id


def load_model(path: str, field: str, device: str = "auto", dtype: str = "float32", gpus: int | None = None) -> LoadedModel:
    """The model and tokenizer in `path` (a model folder, a training's checkpoint folder, or one of its
    checkpoints); a ConfigError naming `field` when it cannot be loaded. On CUDA the model is split across
    `gpus` GPUs (default: every visible one) when that is more than one."""
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
    model.eval()
    count = cuda_devices(gpus, field, path) if dev.type == "cuda" else 1
    if count > 1:
        memory = min(torch.cuda.mem_get_info(i)[0] for i in range(count)) * 9 // 10  # a tenth for activations
        dev = split_model(model, device_map(model, count, memory, f"{field} {path}"))
    else:
        model.to(dev)
    return LoadedModel(model=model, tokenizer=tok, device=dev, path=str(p))


def cuda_devices(gpus: int | None, field: str, path: str) -> int:
    """How many GPUs the model is split across: `gpus`, or every visible one."""
    visible = torch.cuda.device_count()
    if gpus is not None and gpus > visible:
        raise ConfigError(f"{field} {path}: {gpus} GPUs requested, {visible} visible")
    return gpus or visible


def device_map(model: torch.nn.Module, devices: int, memory: int, what: str = "the model") -> dict[str, int]:
    """Where each part of `model` goes on `devices` GPUs of `memory` bytes each (the model may be on the
    meta device): whole blocks of the model's `_no_split_modules` (its decoder layers), in order, the
    embedding on the first GPU, the head on the last (or beside the embedding it is tied to). Balanced: the
    smallest per-GPU share (found by bisection) with which accelerate's infer_auto_device_map places
    every block, so that no GPU holds more than the mean plus one block. A ConfigError naming `what` when
    the model does not fit."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    dtype = next(model.parameters()).dtype
    model.tie_weights()
    total = compute_module_sizes(model, dtype=dtype)[""]

    def place(share: int) -> dict[str, int] | None:
        with _quiet_accelerate():  # "Device 1 is not available": the plan may be made where the GPUs are not
            placed = infer_auto_device_map(model, max_memory={i: share for i in range(devices)},
                                           no_split_module_classes=no_split, dtype=dtype)
        return placed if all(isinstance(d, int) for d in placed.values()) else None

    if (placed := place(memory)) is None:
        raise ConfigError(f"{what}: {total / 2**30:.1f} GiB of {str(dtype).removeprefix('torch.')} weights do not "
                          f"fit in {devices} GPUs with {memory / 2**30:.1f} GiB free each")
    low, high = total // devices, memory  # place(low - 1) fails, place(high) succeeds
    while high - low > max(total // 1000, 1):
        mid = (low + high) // 2
        if (found := place(mid)) is not None:
            high, placed = mid, found
        else:
            low = mid
    return placed


def split_model(model: torch.nn.Module, placement: dict[str, int | str]) -> torch.device:
    """`model` dispatched over the devices of `placement` (accelerate's dispatch_model: each block runs on its
    device, activations move between them); the device of its input embedding, where inputs go and where
    its outputs come back."""
    from accelerate import dispatch_model

    embedding = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embedding)
    first = next(d for part, d in placement.items() if part == "" or name == part or name.startswith(part + "."))
    with _quiet_accelerate():
        dispatch_model(model, device_map=placement, main_device=first, force_hooks=True)
    return torch.device(first if isinstance(first, str) else f"cuda:{first}")


@contextlib.contextmanager
def _quiet_accelerate():
    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
