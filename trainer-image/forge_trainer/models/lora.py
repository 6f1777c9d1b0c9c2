"""LoRA with peft: adapters beside the base's linear layers (training.lora), and the model the export
writes (the adapters merged into the base, or the adapter alone in peft's format).

Only the adapters require gradients, so the optimizer (which takes the parameters that do) holds and
updates nothing else; checkpoints keep the whole model, so a run resumes exactly like a full one.
Under FSDP2 the decoder layers are sharded with their adapters inside them, frozen and trainable
parameters together (FSDP2 shards per parameter, so a mixed layer needs no special handling).

The adapters start at zero (peft's B matrices), so the starting model is the base: dpo's reference,
computed before the first step, is the base's, as with peft's adapters disabled.
"""

from __future__ import annotations

import torch

from ..config import LoraConfig
from ..contract import ConfigError


def peft_config(lora: LoraConfig, base_path: str | None = None):
    from peft import LoraConfig as PeftLoraConfig, TaskType

    return PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=TaskType.CAUSAL_LM,
        target_modules=list(lora.target_modules) if lora.target_modules else "all-linear",
        base_model_name_or_path=base_path,
    )


def add_adapters(model: torch.nn.Module, lora: LoraConfig, base_path: str | None = None) -> torch.nn.Module:
    """The model with LoRA adapters (a peft model); everything but the adapters frozen."""
    from peft import get_peft_model

    try:
        wrapped = get_peft_model(model, peft_config(lora, base_path))
    except ValueError as e:  # e.g. "Target modules {...} not found in the base model"
        raise ConfigError(f"training.lora.target_modules {lora.target_modules}: {e}") from e
    wrapped.peft_config["default"].base_model_name_or_path = base_path
    return wrapped


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class LoraExport:
    """What runtime.export needs to write a LoRA training's model (its ``Adapters`` protocol)."""

    def __init__(self, lora: LoraConfig, base_path: str | None):
        self.lora, self.base_path = lora, base_path

    def wrap(self, plain: torch.nn.Module) -> torch.nn.Module:
        """The fresh plain model with the adapters, to load the trained state into."""
        return add_adapters(plain, self.lora, self.base_path)

    def finish(self, wrapped: torch.nn.Module) -> torch.nn.Module:
        """What to save: the peft model (save_pretrained writes the adapter alone) or the merged model."""
        return wrapped if self.lora.export == "adapter" else wrapped.merge_and_unload()
