"""When the run ends: the first of training.budget's limits (steps, tokens, deadline) it reaches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone

from ..config import TrainingConfig


@dataclass
class Timings:
    """Seconds the last step, save and evaluation took in this run (0 / None: not measured yet)."""

    step: float = 0.0
    save: float = 0.0
    eval: float | None = None


def total_steps(t: TrainingConfig, tokens_per_step: int) -> int | None:
    """The step max_steps or max_tokens (rounded up to whole steps) ends the run at; None: deadline only."""
    limits = []
    if t.budget.max_steps:
        limits.append(t.budget.max_steps)
    if t.budget.max_tokens:
        limits.append(math.ceil(t.budget.max_tokens / tokens_per_step))
    return min(limits) if limits else None


def budget_reached(step: int, total: int | None, t: TrainingConfig, timings: Timings) -> str | None:
    """max_steps, max_tokens, deadline, or None to go on."""
    b = t.budget
    if b.max_steps is not None and step >= b.max_steps:
        return "max_steps"
    if total is not None and step >= total:
        return "max_tokens"
    if b.deadline is not None:
        # Stop early enough to finish one more step, the final evaluation, checkpoint and export (an
        # export writes less than a checkpoint). Until this run has saved once, a save is taken to
        # last as long as 20 steps, and an evaluation as one step.
        save = timings.save or 20 * timings.step
        evaluation = timings.step if timings.eval is None else timings.eval
        margin = timings.step + evaluation + 2 * save
        if datetime.now(timezone.utc).timestamp() + margin >= b.deadline.timestamp():
            return "deadline"
    return None
