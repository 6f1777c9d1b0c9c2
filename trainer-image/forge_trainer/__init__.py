"""Forge trainer: the torch training loop that runs inside each worker pod.

`forge_trainer.config` and `forge_trainer.contract` are importable without torch (the operator
uses them); `run` and `sample` import torch and transformers on first use. docs/trainer.md maps
the package.
"""

from .config import TrainerConfig, load_config

__all__ = ["TrainerConfig", "load_config", "run", "sample", "RunSummary"]


def __getattr__(name: str):
    if name in ("run", "RunSummary"):
        from . import train

        return getattr(train, name)
    if name == "sample":
        from .sampling import sample

        return sample
    raise AttributeError(f"module 'forge_trainer' has no attribute {name!r}")
