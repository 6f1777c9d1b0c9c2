"""Rewards of the arithmetic example (examples/grpo.yaml, benchmarks/grpo_reward_curve.py), written the way
TRL's GRPOTrainer takes them: f(prompts, completions, **columns) -> list[float].

The prompt records are {"prompt": "12+7=", "answer": "19"}; a completion should be the number alone."""

from __future__ import annotations

import re


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def digits(prompts, completions, **kwargs):
    """The share of the completion's characters that are digits: a dense signal for the format."""
    out = []
    for c in completions:
        t = _text(c).strip()
        out.append(sum(ch.isdigit() for ch in t) / len(t) if t else 0.0)
    return out


def correct(prompts, completions, answer, **kwargs):
    """1.0 when the completion's first number is the answer."""
    out = []
    for c, a in zip(completions, answer):
        m = re.search(r"\d+", _text(c))
        out.append(1.0 if m and m.group() == str(a) else 0.0)
    return out
