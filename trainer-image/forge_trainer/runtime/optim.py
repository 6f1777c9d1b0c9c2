"""The optimizer (AdamW, no weight decay on norms and biases) and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..config import TrainingConfig


def build_optimizer(model: torch.nn.Module, t: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=device.type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_at(step: int, t: TrainingConfig, total_steps: int | None) -> float:
    """The learning rate of the step with 0-based index `step`."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant" or not total_steps:
        return t.lr
    if t.schedule == "cosine":
        progress = min((step - t.warmup_steps) / max(total_steps - t.warmup_steps, 1), 1.0)
        return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))
    decay_start = total_steps - max(int(round(t.decay_fraction * total_steps)), 1)  # wsd
    if step < decay_start:
        return t.lr
    progress = min((step - decay_start + 1) / max(total_steps - decay_start, 1), 1.0)
    return t.lr - (t.lr - t.min_lr) * progress
