"""Online DPO: the policy samples a group of completions per prompt with its current weights, the reward
functions score them, and the best and the worst completion of each group form a preference pair trained
with DPO's loss (dpo.py's) relative to the frozen reference, the starting model. A group whose
completions all score the same gives no pair: its rows are kept (every rank runs the same forwards) but
weigh nothing.

training.global_batch_sequences counts the pairs' sequences: two per prompt. Rows handed to the loop:
float32 [2 x prompts, 5, length], each pair's chosen then rejected row: token ids, attention mask,
learned mask (the completion and its stop token), the reference's log-probabilities, the pair's weight
(1, or 0 for a group without a preference).
"""

from __future__ import annotations

import torch

from ..config import OnlineDpoMethod, TrainerConfig
from ..runtime.dist import Dist
from ..runtime.signals import SigtermFlag
from .base import Batches, Dataset, Loss, with_router_loss
from .dpo import preference_loss
from .online import Rollouts, Sample, SampledBatches, token_logps


def best_and_worst(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group: the index of its best and of its worst completion (the first of equals), and whether they
    differ in reward (a pair to learn from)."""
    groups = rewards.view(-1, group_size)
    offset = torch.arange(len(groups)) * group_size
    best, worst = groups.argmax(1), groups.argmin(1)
    return best + offset, worst + offset, groups.max(1).values > groups.min(1).values


class OnlineDpo:
    def __init__(self, config: TrainerConfig):
        self.config = config
        self.settings: OnlineDpoMethod = config.method
        self.rollouts = Rollouts(config)
        self._window: list[torch.Tensor] = []

    def prepare(self, d: Dist, stop: SigtermFlag) -> Dataset:
        return self.rollouts.prepare(d, stop)

    def batches(self) -> Batches:
        return SampledBatches(self.rollouts, self.rows, lambda global_batch: global_batch // 2)

    def start(self, model: torch.nn.Module, autocast, d: Dist) -> None:
        self.rollouts.start(model, autocast, d, reference=True,
                            prompts_per_step=self.config.training.global_batch_sequences // 2)

    def rows(self, sample: Sample) -> torch.Tensor:
        r = self.rollouts
        best, worst, valid = best_and_worst(torch.tensor(sample.scores.total), self.settings.group_size)
        order = torch.stack([best, worst], 1).flatten().to(sample.ids.device)
        ids, attention, learned = sample.ids[order], sample.attention[order], sample.learned[order]
        rows = torch.zeros(len(order), 5, ids.shape[1], dtype=torch.float32, device=ids.device)
        rows[:, 0], rows[:, 1], rows[:, 2] = ids, attention, learned
        rows[:, 3, :-1] = r.logps(r.reference, ids, attention)
        rows[:, 4] = valid.repeat_interleave(2).float().to(ids.device)[:, None]
        return rows.cpu()

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> Loss:
        """The mean DPO loss over the micro-batch's pairs that have a preference."""
        s = self.settings
        ids, attention = batch[:, 0].long(), batch[:, 1].long()
        learned = batch[:, 2, 1:] > 0
        logp, out = token_logps(model, ids, attention, s.temperature)
        policy = torch.where(learned, logp, 0.0).sum(1).view(-1, 2)
        ref = torch.where(learned, batch[:, 3, :-1], 0.0).sum(1).view(-1, 2)
        counts = learned.sum(1).view(-1, 2).clamp(min=1)
        weight = batch[::2, 4, 0]
        losses, rewards = preference_loss(policy, ref, counts, s.beta, s.loss_type)
        loss = (losses * weight).sum() / weight.sum().clamp(min=1)
        margin = rewards[:, 0] - rewards[:, 1]
        self._window.append(torch.stack([weight.sum(), ((margin > 0).float() * weight).sum(), (margin * weight).sum()]))
        return with_router_loss(loss, out, model)

    def step_metrics(self, d: Dist) -> dict[str, float]:
        out = self.rollouts.figures.report(d)
        if self._window:
            pairs, correct, margin = d.sum(torch.stack(self._window).sum(0).tolist())
            self._window = []
            if pairs:
                out["reward_accuracy"], out["reward_margin"] = correct / pairs, margin / pairs
        return out

    def evaluate(self, model: torch.nn.Module, autocast, d: Dist) -> float | None:
        """None: online-dpo has no validation loss (an evaluation's generation suite scores held-out prompts)."""
        return None
