"""The arithmetic of a model: parameters, training FLOPs per token, the memory one worker needs,
and the peak FLOP/s of a device (for MFU)."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable
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


def activation_bytes(cfg: PretrainedConfig, micro_batch: int, seq_len: int, bf16: bool, checkpointing: str) -> int:
    """The bytes one micro-batch's forward pass keeps for its backward pass, the logits included.

    Counted from the block's shapes, per token and layer: what selective checkpointing keeps (the outputs
    of the matrix products and of attention: queries, keys, values, attention, its projection, the MLP's
    or each routed expert's gate, up and down projections) and what it recomputes (two RMS norms, which
    Hugging Face computes in fp32; the rotary embedding; the activation function and its product; the
    residual sums; an MoE's router scores and the routed copies of each token). Full checkpointing keeps
    each block's input only (the backward pass recomputes one block at a time: ``recompute_bytes``)."""
    b = 2 if bf16 else 4
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, kv_heads * head_dim
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    copies = getattr(cfg, "num_experts_per_tok", 1) if experts else 1
    # Qwen3-MoE names its experts' width moe_intermediate_size; Mixtral's experts are intermediate_size wide
    width = (experts and getattr(cfg, "moe_intermediate_size", None)) or cfg.intermediate_size
    kept = (2 * q + 2 * kv + d + copies * (2 * width + d)) * b
    recomputed = (2 * d + q + kv + 2 * copies * width + 2 * d) * b + 2 * 3 * d * 4
    if experts:
        recomputed += copies * d * b + 2 * experts * 4
    per_layer = {"none": kept + recomputed, "selective": kept + d * b, "full": d * b}[checkpointing]
    # beside the blocks: the rotary tables, the final norm, the logits (the loss keeps no fp32 copy of them)
    outside = 2 * head_dim * 4 + d * b + 2 * d * 4 + cfg.vocab_size * b
    return micro_batch * seq_len * (layers * per_layer + outside)


def recompute_bytes(cfg: PretrainedConfig, micro_batch: int, seq_len: int, bf16: bool, checkpointing: str) -> int:
    """What the backward pass holds beside the kept activations: one block's recomputed activations (full
    checkpointing) or the recomputed part of them (selective)."""
    if checkpointing == "none":
        return 0
    dropped = (activation_bytes(cfg, micro_batch, seq_len, bf16, "none")
               - activation_bytes(cfg, micro_batch, seq_len, bf16, checkpointing))
    return dropped // cfg.num_hidden_layers


def estimate_memory(cfg: PretrainedConfig, stats: ModelStats, micro_batch: int, seq_len: int, shards: int,
                    device: torch.device, bf16: bool, checkpointing: str = "none") -> int:
    """A rough upper estimate of one worker's peak training memory in bytes.

    What is kept the whole time: fp32 parameters, gradients and two AdamW moments, 16 bytes per parameter,
    sharded over ``shards`` workers (``shards_of``; gradients stay sharded through gradient accumulation:
    train.train_step). What comes and goes (FSDP2, one worker included): two gathered blocks (the one computing and the one prefetched) with their unsharded
    gradients; one micro-batch's activations (``activation_bytes``), plus the attention matrix where SDPA
    has no fused kernel for the mask (CPU); and in the backward pass the logits' gradient and two fp32
    chunks of the loss (models.logprobs)."""
    from .logprobs import CHUNK_BYTES

    b = 2 if bf16 else 4
    tokens = micro_batch * seq_len
    states = 16 * stats.params / shards
    states += 2 * (b + 4) * (stats.params - stats.embedding_params) / cfg.num_hidden_layers
    acts = activation_bytes(cfg, micro_batch, seq_len, bf16, checkpointing) + recompute_bytes(
        cfg, micro_batch, seq_len, bf16, checkpointing)
    if device.type != "cuda":
        acts += cfg.num_hidden_layers * micro_batch * cfg.num_attention_heads * seq_len * seq_len * 4 * 2
    backward = tokens * cfg.vocab_size * b + 2 * CHUNK_BYTES
    return int(states + acts + backward)


def shards_of(sharding: str, world: int, local_world: int) -> int:
    """The workers each parameter's state is sharded over: all of them (FullShard), or those of one node
    (HybridShard on several nodes: every node holds a whole replica)."""
    return local_world if sharding == "HybridShard" and world > local_world else world


def check_fits(cfg: PretrainedConfig, stats: ModelStats, config: TrainerConfig, world: int, local_world: int, device: torch.device, bf16: bool) -> None:
    t = config.training
    need = estimate_memory(cfg, stats, t.micro_batch_sequences, t.seq_len, shards_of(t.sharding, world, local_world),
                           device, bf16, t.activation_checkpointing)
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


def held_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[object, int]:
    """``forward()``'s result, and the bytes of the tensors its operations made that are still alive once it
    returned: what the autograd graph keeps for the backward pass (activations), plus the result itself.
    Storages of ``exclude`` (the parameters, whose views the operations make) are not counted. A measurement
    for tests and benchmarks: it works on any device, CPU included, where torch keeps no allocator figures."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    made: dict[int, tuple[StorageWeakRef, int]] = {}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    s = t.untyped_storage()
                    seen = made.get(s.data_ptr())
                    if seen is None or seen[0].expired():  # an address freed and handed out again
                        made[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
            return out

    with Track():
        result = forward()
    gc.collect()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    return result, sum(n for ptr, (ref, n) in made.items() if ptr not in skip and not ref.expired())
