"""The arithmetic of a model: parameters, training FLOPs per token, the memory one worker needs,
and the peak FLOP/s of a device (for MFU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..config import TrainerConfig
from ..contract import ConfigError

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


@dataclass
class ModelStats:
    params: int  # all parameters
    embedding_params: int
    active_params: int  # what one token touches, for FLOPs: non-embedding, active experts only
    flops_per_token: float  # forward + backward


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
