"""Reward functions: what a good completion is, as the organisation writes it.

A reward function has TRL's signature, ``reward(prompts, completions, **columns) -> list[float]``, so
functions written for TRL's GRPOTrainer work unchanged: ``prompts`` and ``completions`` are lists of
equal length (text, or for chat prompts lists of ``{role, content}`` messages, a completion being
``[{"role": "assistant", "content": ...}]``), each column of the prompt records is one more keyword
argument holding a list of the same length. A score may be None where the function does not apply.

``build_rewards`` makes them from the configuration: a Python file's callable (``module.py:function``),
the built-in verifiers (``builtin``) or a scoring service (``http``). ``Rewards.score`` calls each one and
checks what it returns; any failure raises ``RewardError`` naming the function and its first bad item,
never a silent 0. Pure Python: neither torch nor the model is needed (ForgeEval scores with it too).
"""

from __future__ import annotations

from .scoring import RewardError, RewardFunction, Rewards, Scores, build_rewards, completion_text

__all__ = ["RewardError", "RewardFunction", "Rewards", "Scores", "build_rewards", "completion_text"]
