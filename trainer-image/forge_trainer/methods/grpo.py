"""Group relative policy optimisation (GRPO, DeepSeekMath): the policy samples a group of completions per
prompt, the reward functions score them, each completion's advantage is its reward relative to its group's
(mean subtracted, divided by the group's standard deviation unless scale_rewards is off), and the policy
follows PPO's clipped objective on those advantages, optionally held near the frozen reference by a KL
penalty (the k3 estimator, as TRL). The loss of a completion is the mean over its tokens; of a micro-batch,
the mean over its completions (TRL's loss_type "grpo").

A batch is sampled once and trained on for ``updates_per_generation`` optimizer steps; the probabilities
it was sampled with (the "old" policy) are kept with it. With one update per batch they equal the current
ones, so the ratio is 1 and no extra forward pass is needed.

Rows handed to the loop: float32 [completions, 6, length]: token ids, attention mask, learned mask (the
completion, its stop token included), old log-probabilities, reference log-probabilities (both at the
position of the token they predict from), the advantage.
"""

from __future__ import annotations

import torch

from ..config import GrpoMethod, TrainerConfig
from ..runtime.dist import Dist
from ..runtime.signals import SigtermFlag
from .base import Batches, Dataset, Loss, with_router_loss
from .online import Rollouts, Sample, SampledBatches, token_logps

STD_EPS = 1e-4  # as TRL: a group whose rewards are all equal gets advantages 0, not a division by 0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Each reward minus its group's mean, divided by the group's standard deviation (unbiased, as TRL)
    when ``scale``; ``rewards`` holds whole groups one after another."""
    groups = rewards.view(-1, group_size)
    adv = groups - groups.mean(1, keepdim=True)
    if scale:
        adv = adv / (groups.std(1, keepdim=True) + STD_EPS)
    return adv.flatten()


def clipped_loss(logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, advantages: torch.Tensor,
                 learned: torch.Tensor, epsilon: float, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the mean over completions of each one's mean per-token loss, the summed KL, the number of clipped
    tokens); logp/old/ref/learned: [completions, tokens], advantages: [completions].

    Per token: -min(r A, clip(r, 1 - eps, 1 + eps) A) + beta KL, with r = exp(logp - old) and
    KL = exp(ref - logp) - (ref - logp) - 1."""
    ratio = torch.exp(logp - old)
    a = advantages[:, None]
    objective = torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    per_token = -objective
    kl = torch.zeros_like(logp)
    if ref is not None:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = per_token + beta * kl
    mask = learned > 0
    per_token = torch.where(mask, per_token, 0.0)
    loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))
    return loss, torch.where(mask, kl, 0.0).sum().detach(), (clipped & mask).sum().detach()


class Grpo:
    def __init__(self, config: TrainerConfig):
        self.config = config
        self.settings: GrpoMethod = config.method
        self.rollouts = Rollouts(config)

    def prepare(self, d: Dist, stop: SigtermFlag) -> Dataset:
        return self.rollouts.prepare(d, stop)

    def batches(self) -> Batches:
        s = self.settings
        return SampledBatches(self.rollouts, self.rows, lambda global_batch: global_batch // s.group_size,
                              s.updates_per_generation)

    def start(self, model: torch.nn.Module, autocast, d: Dist) -> None:
        self.rollouts.start(model, autocast, d, reference=self.settings.beta > 0,
                            prompts_per_step=self.config.training.global_batch_sequences // self.settings.group_size)

    def step_metrics(self, d: Dist) -> dict[str, float]:
        return self.rollouts.figures.report(d)

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> Loss:
        s = self.settings
        ids, attention = batch[:, 0].long(), batch[:, 1].long()
        learned = batch[:, 2, 1:]
        logp, out = token_logps(model, ids, attention, s.temperature)
        old = logp.detach() if s.updates_per_generation == 1 else batch[:, 3, :-1]
        ref = batch[:, 4, :-1] if s.beta > 0 else None
        loss, kl, clipped = clipped_loss(logp, old, ref, batch[:, 5, 0], learned, s.epsilon, s.beta)
        self.rollouts.figures.add(kl=kl.item(), clipped=clipped.item(), learned_tokens=float((learned > 0).sum()))
        return with_router_loss(loss, out, model)

    def evaluate(self, model: torch.nn.Module, autocast, d: Dist) -> float | None:
        """None: grpo has no validation loss (an evaluation's generation suite scores held-out prompts)."""
        return None

    def rows(self, sample: Sample) -> torch.Tensor:
        """The loop's rows of one sample: advantages, and the old and reference log-probabilities."""
        s, r = self.settings, self.rollouts
        rewards = torch.tensor(sample.scores.total, dtype=torch.float32)
        adv = group_advantages(rewards, s.group_size, s.scale_rewards).to(sample.ids.device)
        n, length = sample.ids.shape
        rows = torch.zeros(n, 6, length, dtype=torch.float32, device=sample.ids.device)
        rows[:, 0], rows[:, 1], rows[:, 2] = sample.ids, sample.attention, sample.learned
        if s.updates_per_generation > 1:
            rows[:, 3, :-1] = r.logps(r.model, sample.ids, sample.attention)
        if s.beta > 0:
            rows[:, 4, :-1] = r.logps(r.reference, sample.ids, sample.attention)
        rows[:, 5] = adv[:, None]
        return rows.cpu()
