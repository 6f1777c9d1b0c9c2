"""Pretraining (from scratch or continued): next-token cross-entropy on packed text windows, plus the
router's load-balancing loss for an MoE."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainerConfig
from ..data.packed import TokenData, TrainLoader, validation_indices
from ..data.prepare import prepare_on_ranks
from ..runtime.dist import Dist
from ..runtime.signals import SigtermFlag
from .base import Batches, Dataset, Loss


class Pretrain:
    def __init__(self, config: TrainerConfig):
        self.config = config
        self.data: TokenData | None = None

    def prepare(self, d: Dist, stop: SigtermFlag) -> Dataset:
        tokenizer, path, digest = prepare_on_ranks(self.config, d, stop)
        self.data = TokenData(path, self.config)
        return Dataset(tokenizer=tokenizer, digest=digest, provenance=_provenance(self.data))

    def batches(self) -> Batches:
        return TrainLoader(self.data, self.config.training.seed)

    def start(self, model: torch.nn.Module, autocast, d: Dist) -> None:
        pass

    def step_metrics(self, d: Dist) -> dict[str, float]:
        return {}

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> Loss:
        out = model(input_ids=batch[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        aux = getattr(out, "aux_loss", None)
        coef = _aux_coef(model.config)
        return Loss(value=loss, total=loss + coef * aux if aux is not None and coef else loss, aux=aux)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, autocast, d: Dist) -> float | None:
        """Mean cross-entropy per token over the validation windows, split round-robin over ranks."""
        t, data = self.config.training, self.data
        indices = validation_indices(data, t)
        if not indices:
            return None
        model.eval()
        mine = indices[d.rank :: d.world]
        per_rank = math.ceil(len(indices) / d.world)
        micro = t.micro_batch_sequences
        total = torch.zeros((), dtype=torch.float64, device=d.device)
        count = 0
        # Every rank runs the same number of forwards (FSDP gathers weights in each one);
        # a rank short of windows repeats one and ignores its loss.
        for b in range(math.ceil(per_rank / micro)):
            part = mine[b * micro : (b + 1) * micro]
            real = len(part)
            part = part or [indices[0]]
            batch = torch.from_numpy(np.stack([data.val_window(i) for i in part])).to(d.device)
            with autocast:
                logits = model(input_ids=batch[:, :-1]).logits
            losses = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
            total += losses.view(len(part), -1)[:real].sum().double()
            count += real * t.seq_len
        s, c = d.sum([total.item(), float(count)])
        model.train()
        return s / c


def _aux_coef(cfg) -> float:
    """The weight of the MoE router's auxiliary loss (0: a dense model, or the router's loss is off)."""
    return getattr(cfg, "router_aux_loss_coef", 0.0) if getattr(cfg, "output_router_logits", False) else 0.0


def _provenance(data: TokenData) -> dict:
    m = data.manifest
    return {
        "digest": m["data_digest"],
        "manifest": str(data.path / "manifest.json"),
        "sources": [
            {"name": s["name"], "path": s["path"], "format": s["format"], "tokens": s["tokens"], "documents": s["documents"],
             "files": [{"path": f["path"], "sha256": f["sha256"], "tokens": f["tokens"]} for f in s["files"]]}
            for s in m["sources"]
        ],
    }
