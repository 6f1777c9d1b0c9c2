"""What a training method is to the loop: it prepares its data, serves its batches and computes its
loss. The loop (train.py) calls these hooks only; a new method is a new module behind this protocol."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..data.tokenizer import TextTokenizer
from ..runtime.dist import Dist
from ..runtime.signals import SigtermFlag


@dataclass
class Dataset:
    """A method's prepared data, as the rest of the run sees it."""

    tokenizer: TextTokenizer
    digest: str
    """Of the source files as read; a resumed run whose data changed warns."""
    provenance: dict
    """provenance.json's `data` section."""


@dataclass
class Loss:
    """One micro-batch's loss."""

    value: torch.Tensor
    """The method's loss: logged, reported, evaluated."""
    total: torch.Tensor
    """What is back-propagated: the value plus any auxiliary term."""
    aux: torch.Tensor | None = None
    """An auxiliary term (the MoE router's balance), logged on its own as aux_loss."""


class Batches(Protocol):
    """A method's training stream: deterministic and resumable; every rank advances the same global
    state and keeps its own slice, so the state does not depend on the world size."""

    def next_step(self, global_batch: int, rank: int, world: int) -> Any:
        """This rank's rows of the next optimizer step: an array or tensor whose first dimension counts
        sequences (the loop cuts it into micro-batches)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Method(Protocol):
    """One training method, built from the TrainerConfig (`methods.build_method`)."""

    def prepare(self, d: Dist, stop: SigtermFlag) -> Dataset:
        """Make the data usable on every rank (rank 0 prepares, the others wait), before the model exists."""

    def batches(self) -> Batches: ...

    def start(self, model: torch.nn.Module, autocast, d: Dist) -> None:
        """Called once with the starting model (the base's or new weights, before a checkpoint is loaded),
        before the first step; a collective. dpo computes its reference log-probabilities here."""

    def step_metrics(self, d: Dist) -> dict[str, float]:
        """The method's own figures (dpo: reward accuracy, margin, ...) averaged over the micro-batches
        since the last call and over every rank (a collective), for the step log and the history."""

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> Loss:
        """The loss of one micro-batch (already on the model's device, under autocast)."""

    def evaluate(self, model: torch.nn.Module, autocast, d: Dist) -> float | None:
        """The validation loss over every rank (None: no validation data); a collective."""


def with_router_loss(value: torch.Tensor, out, model: torch.nn.Module) -> Loss:
    """The method's loss, plus the MoE router's load-balancing loss when the model has one turned on."""
    aux = getattr(out, "aux_loss", None)
    cfg = model.config
    coef = getattr(cfg, "router_aux_loss_coef", 0.0) if getattr(cfg, "output_router_logits", False) else 0.0
    return Loss(value=value, total=value + coef * aux if aux is not None and coef else value, aux=aux)


def each_micro_batch(items: list, micro: int, d: Dist, row: Callable[[Any], np.ndarray],
                     work: Callable[[torch.Tensor, bool], None]) -> None:
    """``work(batch, real)`` for this rank's round-robin share of ``items`` in micro-batches of ``row(item)``.
    Every rank runs the same number of forwards (FSDP gathers weights in each one): a rank short of
    items repeats one with real=False, and ``work`` ignores its result."""
    mine = items[d.rank :: d.world]
    for b in range(math.ceil(math.ceil(len(items) / d.world) / micro)):
        part = mine[b * micro : (b + 1) * micro]
        batch = torch.from_numpy(np.stack([row(x) for x in part or [items[0]]])).to(d.device)
        work(batch, bool(part))
