"""provenance.json: how an exported model came to be (run, data, tokenizer, model, versions, config)."""

from __future__ import annotations

import platform
from datetime import datetime
from pathlib import Path

import torch

from ..config import TrainerConfig
from ..contract import rfc3339
from .dist import Dist, hostname
from .checkpoint import TrainState


def versions() -> dict:
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cuda": torch.version.cuda,
    }


def build_provenance(config: TrainerConfig, state: TrainState, *, reason: str, started: datetime, ended: datetime,
                     resumed_from: Path | None, d: Dist, tokenizer: dict, data: dict, model: dict) -> dict:
    """The provenance record; ``tokenizer``, ``data`` and ``model`` are their own sections. A collective:
    every rank calls it (the host names are gathered)."""
    return {
        "run_name": config.run_name,
        "method": config.method.kind,
        "base_model": config.model.base_path,
        "started_at": rfc3339(started),
        "ended_at": rfc3339(ended),
        "stop_reason": reason,
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "final_train_loss": state.train_loss,
        "final_val_loss": state.val_loss,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "world_size": d.world,
        "hostnames": sorted(set(d.all_gather_object(hostname()))),
        "versions": versions(),
        "tokenizer": tokenizer,
        "data": data,
        "model": model,
        "config": config.model_dump(mode="json"),
    }
