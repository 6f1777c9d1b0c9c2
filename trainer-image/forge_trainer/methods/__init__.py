"""Training methods: each one prepares its data, serves its batches and computes its loss behind the
protocol in base.py; the loop is the same for all. The registry maps config.method.kind to one."""

from __future__ import annotations

from collections.abc import Callable

from ..config import TrainerConfig
from .base import Batches, Dataset, Loss, Method
from .dpo import Dpo
from .grpo import Grpo
from .online_dpo import OnlineDpo
from .pretrain import Pretrain
from .sft import Sft

METHODS: dict[str, Callable[[TrainerConfig], Method]] = {
    "pretrain": Pretrain,
    "continued-pretrain": Pretrain,  # the same objective; the model comes from model.base_path
    "sft": Sft,
    "dpo": Dpo,
    "grpo": Grpo,
    "online-dpo": OnlineDpo,
}

__all__ = ["METHODS", "Batches", "Dataset", "Loss", "Method", "build_method"]


def build_method(config: TrainerConfig) -> Method:
    return METHODS[config.method.kind](config)
