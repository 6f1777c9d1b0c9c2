"""Models: Hugging Face causal LMs built from the config or loaded from a local
directory, plus the arithmetic the loop needs (parameters, FLOPs, memory)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen3MoeConfig

from .config import TrainerConfig
from .exitcodes import ConfigError

# Peak dense bf16 tensor-core FLOP/s per device, by a substring of the CUDA device name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
}


def hf_config(config: TrainerConfig, vocab_size: int, eos_id: int) -> PretrainedConfig:
    """The Hugging Face config of the model to train (from the architecture or the base model)."""
    if config.model.base_path is not None:
        path = Path(config.model.base_path)
        if not (path / "config.json").exists():
            raise ConfigError(f"model.base_path {path}: no config.json (a local Hugging Face model directory is needed)")
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
        if getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None):
            cfg.output_router_logits = True
        if vocab_size > cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab_size} tokens but the base model only {cfg.vocab_size} embeddings")
        return cfg
    a = config.model.architecture
    common = dict(
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
    if common["vocab_size"] < vocab_size:
        raise ConfigError(f"model.architecture.vocab_size {a.vocab_size} is smaller than the tokenizer's {vocab_size} tokens")
    if a.family == "dense":
        return LlamaConfig(intermediate_size=a.intermediate_size, head_dim=a.hidden_size // a.num_attention_heads, **common)
    return Qwen3MoeConfig(
        intermediate_size=a.intermediate_size,
        num_experts=a.num_experts,
        num_experts_per_tok=a.num_experts_per_token,
        moe_intermediate_size=a.moe_intermediate_size,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=a.router_aux_loss_coef,
        **common,
    )


@dataclass
class ModelStats:
    params: int  # all parameters
    embedding_params: int
    active_params: int  # what one token touches, for FLOPs: non-embedding, active experts only
    flops_per_token: float  # forward + backward

    @property
    def is_moe(self) -> bool:
        return self.active_params < self.params - self.embedding_params


def model_stats(cfg: PretrainedConfig, seq_len: int) -> ModelStats:
    """Parameter counts and training FLOPs per token, from a meta-device model (allocates nothing).

    flops_per_token = 6 N + 12 L H Q T (N: non-embedding parameters, MoE experts
    counted as top_k / num_experts of them), as torchtitan and nanoGPT count.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    total = embedding = active = 0
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue  # tied lm_head: counted below as compute, not as new parameters
        seen.add(id(p))
        n = p.numel()
        total += n
        if name.endswith("embed_tokens.weight"):
            embedding += n
        elif experts and top_k and ".experts." in name:
            active += n * top_k / experts
        else:
            active += n
    if getattr(cfg, "tie_word_embeddings", False):
        active += embedding  # the output projection still costs 6 d V per token
    L = cfg.num_hidden_layers
    H = cfg.num_attention_heads
    Q = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    flops = 6 * active + 12 * L * H * Q * seq_len
    return ModelStats(params=total, embedding_params=embedding, active_params=int(active), flops_per_token=flops)


def available_memory(device: torch.device, local_world: int) -> int:
    """Bytes one worker may use: free GPU memory, or its share of the host's (or cgroup's) memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        usage = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            cg = int(limit) - usage
            avail = cg if avail is None else min(avail, cg)
    except (OSError, ValueError):
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return avail // max(local_world, 1)


def estimate_memory(cfg: PretrainedConfig, stats: ModelStats, micro_batch: int, seq_len: int, world: int, device: torch.device, bf16: bool) -> int:
    """A rough upper estimate of one worker's peak training memory in bytes.

    fp32 parameters, gradients and two AdamW moments (16 bytes per parameter,
    sharded over the workers), one unsharded block, activations (about 34 bytes
    per token and width per layer in 16-bit, as Korthikanti et al. count, doubled
    in fp32; plus the attention matrix where SDPA has no fused kernel: CPU),
    and the fp32 logits with their gradient.
    """
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    tokens = micro_batch * seq_len
    states = 16 * stats.params / world + (16 * (stats.params - stats.embedding_params) / L if world > 1 else 0)
    act_bytes = 2 if bf16 else 4
    acts = L * tokens * d * 34 * act_bytes / 2
    if device.type != "cuda":
        acts += L * micro_batch * cfg.num_attention_heads * seq_len * seq_len * 4 * 2
    logits = tokens * cfg.vocab_size * 4 * 3
    return int(states + acts + logits)


def check_fits(cfg: PretrainedConfig, stats: ModelStats, config: TrainerConfig, world: int, local_world: int, device: torch.device, bf16: bool) -> None:
    t = config.training
    need = estimate_memory(cfg, stats, t.micro_batch_sequences, t.seq_len, world, device, bf16)
    have = available_memory(device, local_world if device.type != "cuda" else 1)
    if need > 0.9 * have:
        gib = 1 << 30
        raise ConfigError(
            f"the model ({stats.params / 1e6:,.1f}M parameters) with micro_batch_sequences {t.micro_batch_sequences} "
            f"and seq_len {t.seq_len} needs about {need / gib:,.1f} GiB per worker, but only {have / gib:,.1f} GiB "
            f"is available on {device.type}; use a smaller model or micro-batch, or more workers"
        )


def check_context(cfg: PretrainedConfig, seq_len: int) -> None:
    ctx = getattr(cfg, "max_position_embeddings", None)
    if ctx is not None and seq_len > ctx:
        raise ConfigError(f"training.seq_len {seq_len} exceeds the model's context (max_position_embeddings {ctx})")


def build_model(config: TrainerConfig, cfg: PretrainedConfig) -> torch.nn.Module:
    """Random init from cfg (seeded), or the base model's weights; always SDPA attention, fp32 master weights."""
    if config.model.base_path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                config.model.base_path, config=cfg, attn_implementation="sdpa", dtype=torch.float32, local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load model.base_path {config.model.base_path}: {e}") from e
    else:
        torch.manual_seed(config.training.seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    return model


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def describe(cfg: PretrainedConfig) -> dict:
    return json.loads(cfg.to_json_string(use_diff=False))
