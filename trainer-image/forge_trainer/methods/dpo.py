"""Direct preference optimisation: make the chosen answer likelier than the rejected one, relative to a
frozen reference (the starting model), on sft's prepared records.

A pair is packed whole (prompt + chosen, then prompt + rejected, as two examples that do not attend to
each other: ``data.records``), so both answers of a pair are always in the same micro-batch. The
packed row's fourth line says which answer each learned label belongs to.

The reference log-probabilities are computed once, by ``start``, with the starting model over every
training and validation pair, before the first step (and again, identically, when a run resumes: the
checkpoint is loaded after ``start``). So no second copy of the model is held in memory and the
reference costs one forward pass over the data instead of one per step; no gradient can reach it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..config import DpoMethod, TrainerConfig
from ..data.packed import TrainLoader, validation_indices
from ..data.records import IGNORE, RecordData
from ..models.logprobs import token_logprobs
from ..runtime.dist import Dist
from ..runtime.signals import SigtermFlag
from .base import Batches, Dataset, Loss, each_micro_batch, with_router_loss
from .sft import prepare_record_data

log = logging.getLogger(__name__)

METRICS = ("reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected")


class Dpo:
    def __init__(self, config: TrainerConfig):
        self.config = config
        self.settings: DpoMethod = config.method
        self.data: RecordData | None = None
        self.reference: torch.Tensor | None = None
        """float64 [pairs, 2]: the reference's summed log-probabilities of each pair's chosen and rejected answer."""
        self._window: list[torch.Tensor] = []  # per training micro-batch: METRICS, no device sync

    def prepare(self, d: Dist, stop: SigtermFlag) -> Dataset:
        self.data, dataset = prepare_record_data(self.config, d, stop)
        return dataset

    def batches(self) -> Batches:
        return TrainLoader(self.data, self.config.training.seed)

    @torch.no_grad()
    def start(self, model: torch.nn.Module, autocast, d: Dist) -> None:
        """The reference log-probabilities of every pair, from the starting model (split over ranks)."""
        data = self.data
        rows = [(s, i) for s in range(len(data.train)) for i in range(data.train_rows(s))]
        rows += [(None, i) for i in range(data.val_windows)]
        ref = torch.zeros(2 * data.units, dtype=torch.float64, device=d.device)
        model.eval()
        each_micro_batch(rows, self.config.training.micro_batch_sequences, d,
                          lambda r: data.train_row(*r) if r[0] is not None else data.val_window(r[1]),
                          lambda batch, real: _fill(ref, model, batch, autocast, real))
        model.train()
        self.reference = torch.tensor(d.sum(ref.tolist()), dtype=torch.float64, device=d.device).view(-1, 2)

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> Loss:
        """The mean DPO loss of the micro-batch's pairs; batch: [rows, 4, seq_len]."""
        keys, sums, counts, out = _answer_logps(model, batch, None)
        losses, metrics = self._pair_losses(keys, sums, counts)
        self._window.append(metrics)
        return with_router_loss(losses.mean(), out, model)

    def _pair_losses(self, keys, sums, counts) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair: the loss; and the micro-batch's METRICS (detached)."""
        pairs = keys.view(-1, 2)[:, 0] // 2
        policy, ref = sums.view(-1, 2), self.reference[pairs].to(sums.dtype)
        losses, rewards = preference_loss(policy, ref, counts.view(-1, 2), self.settings.beta, self.settings.loss_type)
        metrics = torch.stack([(rewards[:, 0] > rewards[:, 1]).float().mean(), (rewards[:, 0] - rewards[:, 1]).mean(),
                               sums.view(-1, 2)[:, 0].detach().mean(), sums.view(-1, 2)[:, 1].detach().mean()])
        return losses, metrics

    def step_metrics(self, d: Dist) -> dict[str, float]:
        if not self._window:
            return {}
        means = torch.stack(self._window).mean(0).tolist()
        self._window = []
        return dict(zip(METRICS, (v / d.world for v in d.sum(means))))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, autocast, d: Dist) -> float | None:
        """The mean DPO loss of the validation pairs (their reward accuracy and margin are logged)."""
        data = self.data
        indices = validation_indices(data, self.config.training)
        if not indices:
            return None
        totals = torch.zeros(4, dtype=torch.float64, device=d.device)  # pairs, loss, correct, margin

        def add(batch, real):
            keys, sums, counts, _ = _answer_logps(model, batch, autocast)
            losses, m = self._pair_losses(keys, sums, counts)
            if real:
                p = len(losses)
                totals.add_(torch.stack([torch.tensor(float(p), device=d.device), losses.sum(), m[0] * p, m[1] * p])
                            .double())

        model.eval()
        each_micro_batch(indices, self.config.training.micro_batch_sequences, d, data.val_window, add)
        model.train()
        pairs, loss, correct, margin = d.sum(totals.tolist())
        if not pairs:
            return None
        if d.is_main:
            log.info("validation: %d pairs | reward accuracy %.3f | reward margin %.4f", pairs, correct / pairs,
                     margin / pairs)
        return loss / pairs


def preference_loss(policy: torch.Tensor, ref: torch.Tensor, counts: torch.Tensor, beta: float,
                    loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per pair: the DPO loss, the implicit rewards [pairs, 2], detached) from the summed log-probabilities
    of each pair's (chosen, rejected) answer under the policy and the reference, [pairs, 2]; counts: their
    tokens (ipo compares per-token means, as TRL does)."""
    if loss_type == "ipo":
        policy, ref = policy / counts, ref / counts
    h = (policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1])
    losses = -F.logsigmoid(beta * h) if loss_type == "sigmoid" else (h - 1 / (2 * beta)) ** 2
    return losses, beta * (policy - ref).detach()


def _fill(ref: torch.Tensor, model, batch, autocast, real: bool) -> None:
    keys, sums, _, _ = _answer_logps(model, batch, autocast)
    if real:
        ref[keys] = sums.double()


def answer_logps(model: torch.nn.Module, batch: torch.Tensor):
    """(answer keys, summed log-probabilities, learned tokens) of the answers in packed rows: key 2p is
    pair p's chosen answer, 2p + 1 its rejected one (sorted, so pairs are adjacent)."""
    keys, sums, counts, _ = _answer_logps(model, batch, None)
    return keys, sums, counts


def _answer_logps(model, batch: torch.Tensor, autocast):
    input_ids, labels, positions, answer = batch[:, 0], batch[:, 1], batch[:, 2], batch[:, 3]
    # no cache: with one, transformers does not look for packed sequences and the answers would see each other
    if autocast is None:
        out = model(input_ids=input_ids, position_ids=positions, use_cache=False)
    else:
        with autocast:
            out = model(input_ids=input_ids, position_ids=positions, use_cache=False)
    learned = labels != IGNORE
    token = token_logprobs(out.logits, labels)
    keys, inverse = torch.unique(answer[learned], return_inverse=True)
    sums = torch.zeros(len(keys), dtype=token.dtype, device=token.device).scatter_add(0, inverse, token[learned])
    counts = torch.zeros(len(keys), dtype=token.dtype, device=token.device).scatter_add(
        0, inverse, torch.ones_like(token[learned]))
    return keys, sums, counts, out
