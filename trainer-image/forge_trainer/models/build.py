"""The model to train: its Hugging Face config (a family from the architecture, or the base model's),
the checks that it can run here, and its weights (seeded random init, or the base's)."""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import PretrainedConfig

from .. import defaults
from ..config import TrainerConfig
from ..contract import ConfigError
from ..runtime.dist import Dist
from ..runtime.export import meta_model
from ..runtime.signals import SigtermFlag, on_every_rank
from . import base, dense, lora, moe
from .parallel import parallelize, placed_on
from .stats import ModelStats, check_fits, model_stats

FAMILIES = {"dense": dense.hf_config, "moe": moe.hf_config}
"""model.architecture.family -> the function that builds its Hugging Face config."""


def hf_config(config: TrainerConfig, vocab_size: int, eos_id: int) -> PretrainedConfig:
    """The Hugging Face config of the model to train (from the architecture or the base model)."""
    if config.model.base_path is not None:
        return base.hf_config(config.model.base_path, vocab_size)
    a = config.model.architecture
    if (a.vocab_size or vocab_size) < vocab_size:
        raise ConfigError(f"model.architecture.vocab_size {a.vocab_size} is smaller than the tokenizer's {vocab_size} tokens")
    return FAMILIES[a.family](
        a,
        vocab_size=a.vocab_size or vocab_size,
        hidden_size=a.hidden_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads or a.num_attention_heads,
        max_position_embeddings=a.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        tie_word_embeddings=a.tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        use_cache=False,
    )


def check_model(config: TrainerConfig, cfg: PretrainedConfig, d: Dist, bf16: bool, stop: SigtermFlag) -> ModelStats:
    """Fail before allocating anything when training.seq_len exceeds the model's context, or when the
    model and micro-batch cannot fit in one worker's memory (checked on every rank: all fail together)."""
    seq_len = config.training.seq_len
    context = getattr(cfg, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ConfigError(f"training.seq_len {seq_len} exceeds the model's context (max_position_embeddings {context})")
    stats = model_stats(cfg, seq_len)
    on_every_rank(d, lambda: check_fits(cfg, stats, config, d.world, d.local_world, d.device, bf16), stop)
    return stats


def preflight(config: TrainerConfig, d: Dist, bf16: bool, stop: SigtermFlag) -> None:
    """check_model with the configured vocabulary size, before any data is tokenized (it runs again
    with the real tokenizer once that exists)."""
    compiles(config, d.device)  # training.compile true without the compiler it needs: refused before any data
    arch, train = config.model.architecture, config.tokenizer.train
    vocab = (arch and arch.vocab_size) or (train and train.vocab_size) or 1
    check_model(config, hf_config(config, vocab, 0), d, bf16, stop)


def build_model(config: TrainerConfig, cfg: PretrainedConfig, d: Dist | None = None, bf16: bool = False) -> torch.nn.Module:
    """The model to train on its devices: always SDPA attention, fp32 master weights; with
    training.lora, the base frozen and LoRA adapters beside it (a peft model).

    Built on the meta device (no memory, no time) and materialised block by block as it is sharded
    (``parallel.parallelize``): a new model takes Hugging Face's initialisation, drawn from
    training.seed in the order Hugging Face draws it, so every worker count gives the same weights. With
training.precision fp8 the blocks' linear layers compute in FP8 (models/fp8.py), under the same names.
    A base model is read whole by one process only (rank 0, on the host), whose weights every worker
    then receives shard by shard; in one process it is read and placed on the device. Sharded (FSDP2,
    training.sharding) whenever ``d`` has a process group, one process included (train.run's)."""
    d = d or Dist()
    t = config.training
    compile = compiles(config, d.device)
    fp8 = t.precision == "fp8"
    if config.model.base_path is not None and not d.distributed:
        return parallelize(_base_model(config, cfg), d, bf16, compile, t.activation_checkpointing,
                           placed_on(d.device), t.sharding, fp8)
    model = on_meta(config, cfg)
    if config.model.base_path is None:
        torch.manual_seed(t.seed)
        return parallelize(model, d, bf16, compile, t.activation_checkpointing, _initialised(model, d.device),
                           t.sharding, fp8)
    holder = {}
    d.on_every_rank(lambda: holder.update(state=_base_model(config, cfg).state_dict()) if d.is_main else None,
                    f"loading model.base_path {config.model.base_path}")
    model = parallelize(model, d, bf16, compile, t.activation_checkpointing, placed_on(d.device), t.sharding, fp8)
    set_model_state_dict(model, holder.get("state", {}),
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def compiles(config: TrainerConfig, device: torch.device) -> bool:
    """Whether the blocks are compiled: training.compile, or when it is not set, by the device
    (``defaults.compile_blocks``: on GPUs, not on CPUs) if the compiler torch.compile needs is there.
    training.compile true without that compiler is refused."""
    t = config.training
    if t.compile is False or (t.compile is None and not defaults.compile_blocks(device.type)):
        return False
    missing = missing_compiler(device)
    if missing is not None and t.compile:
        raise ConfigError(f"training.compile: torch.compile needs {missing}; install one in the image, "
                          "or set training.compile to false")
    return missing is None


def missing_compiler(device: torch.device) -> str | None:
    """What torch.compile lacks here to build its kernels (None: nothing): on a GPU, Triton builds each
    kernel's launcher with a C compiler (CC, gcc or clang, as Triton looks for it); on a CPU, Inductor
    writes C++ (CXX, g++ or clang++). The slim runtime images of PyTorch had neither."""
    variable, names, what = (("CC", ("gcc", "clang"), "a C compiler for Triton") if device.type == "cuda"
                             else ("CXX", ("g++", "clang++"), "a C++ compiler for Inductor"))
    found = [os.environ[variable]] if os.environ.get(variable) else [shutil.which(n) for n in names]
    return None if any(found) else f"{what} ({variable}, {' or '.join(names)}), and none was found"


def on_meta(config: TrainerConfig, cfg: PretrainedConfig) -> torch.nn.Module:
    """The model on the meta device (no memory, no initialisation), but for the buffers its modules
    compute when built (the rotary embedding's frequencies), which are real, on the host."""
    return _with_adapters(meta_model(cfg), config)


def _base_model(config: TrainerConfig, cfg: PretrainedConfig) -> torch.nn.Module:
    return _with_adapters(base.load(config.model.base_path, cfg), config)


def _with_adapters(model: torch.nn.Module, config: TrainerConfig) -> torch.nn.Module:
    model.config.use_cache = False
    if config.training.lora is not None:
        torch.manual_seed(config.training.seed)  # the adapters' initialisation
        model = lora.add_adapters(model, config.training.lora, config.model.base_path)
    return model


def _initialised(model: torch.nn.Module, device: torch.device):
    """Materialise a module with Hugging Face's initial values (the model's own ``_init_weights``)."""
    place = placed_on(device)

    @torch.no_grad()
    def materialise(module: torch.nn.Module) -> None:
        place(module)
        model._init_weights(module)

    return materialise


def describe(cfg: PretrainedConfig) -> dict:
    return json.loads(cfg.to_json_string(use_diff=False))
