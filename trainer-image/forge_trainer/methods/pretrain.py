"""Pretraining (from scratch or continued): next-token cross-entropy on packed text windows, plus the
router's load-balancing loss for an MoE. With method.document_masking, each document of a window attends
only to itself (position ids that restart after every end-of-text token: data.packed.document_positions)."""

from __future__ import annotations

import torch

from ..config import TrainerConfig
from ..data.packed import TokenData, TrainLoader, document_positions, validation_indices
from ..data.prepare import prepare_on_ranks
from ..models.logprobs import cross_entropy_sum
from ..runtime.dist import Dist
from ..runtime.signals import SigtermFlag
from .base import Batches, Dataset, Loss, each_micro_batch, with_router_loss


class Pretrain:
    def __init__(self, config: TrainerConfig):
        self.config = config
        self.data: TokenData | None = None
        self.eos_id: int | None = None
        """Where documents end, when each attends only to itself (method.document_masking); None: windows
        are one sequence."""

    def prepare(self, d: Dist, stop: SigtermFlag) -> Dataset:
        tokenizer, path, digest = prepare_on_ranks(self.config, d, stop)
        self.data = TokenData(path, self.config)
        self.eos_id = tokenizer.eos_id if self.config.method.document_masking else None
        return Dataset(tokenizer=tokenizer, digest=digest, provenance=_provenance(self.data))

    def batches(self) -> Batches:
        return TrainLoader(self.data, self.config.training.seed)

    def start(self, model: torch.nn.Module, autocast, d: Dist) -> None:
        pass

    def step_metrics(self, d: Dist) -> dict[str, float]:
        return {}

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> Loss:
        out = self.forward(model, batch[:, :-1])
        targets = batch[:, 1:]
        return with_router_loss(cross_entropy_sum(out.logits, targets) / targets.numel(), out, model)

    def forward(self, model: torch.nn.Module, inputs: torch.Tensor):
        """The model's output on windows of tokens; documents masked from each other where eos_id is set."""
        if self.eos_id is None:
            return model(input_ids=inputs)
        # no cache: with one, transformers does not look for packed sequences (as sft)
        return model(input_ids=inputs, position_ids=document_positions(inputs, self.eos_id), use_cache=False)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, autocast, d: Dist) -> float | None:
        """Mean cross-entropy per token over the validation windows, split round-robin over ranks."""
        t, data = self.config.training, self.data
        indices = validation_indices(data, t)
        if not indices:
            return None
        totals = torch.zeros(2, dtype=torch.float64, device=d.device)  # summed loss, tokens

        def add(batch: torch.Tensor, real: bool) -> None:
            with autocast:
                logits = self.forward(model, batch[:, :-1]).logits
            if real:
                summed = cross_entropy_sum(logits, batch[:, 1:])
                totals.add_(torch.stack([summed.double(), torch.tensor(float(batch[:, 1:].numel()), device=d.device)]))

        model.eval()
        each_micro_batch(indices, t.micro_batch_sequences, d, data.val_window, add)
        model.train()
        s, c = d.sum(totals.tolist())
        return s / c


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
