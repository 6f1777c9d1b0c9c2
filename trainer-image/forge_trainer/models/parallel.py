"""Placing a model on its device, compiled and sharded (FSDP2) per transformer block."""

from __future__ import annotations

import torch

from ..runtime.dist import Dist


def parallelize(model: torch.nn.Module, d: Dist, bf16: bool, compile: bool) -> torch.nn.Module:
    """Compile and shard each transformer block (FSDP2), then the root; plain in one process."""
    model.to(d.device)
    layers = blocks(model)
    if compile:
        for layer in layers:
            layer.compile()
    if d.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the modules Hugging Face marks as not to be split."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    return found or list(model.model.layers)
