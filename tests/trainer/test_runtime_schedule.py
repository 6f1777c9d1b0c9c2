"""The learning-rate schedule (runtime/optim.py) and the budget (runtime/budget.py): pure functions."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from trainer_helpers import tiny_config

from forge_trainer.runtime.budget import Timings, budget_reached, total_steps
from forge_trainer.runtime.optim import lr_at


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_learning_rate_schedules(tmp_path, corpus, schedule):
    t = tiny_config(tmp_path, corpus, training__schedule=schedule, training__warmup_steps=10,
                    training__decay_fraction=0.2, training__lr=1.0, training__min_lr=0.1).training
    lrs = [lr_at(s, t, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    if schedule == "constant":
        assert set(lrs[9:]) == {1.0}
    elif schedule == "cosine":
        assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
        assert lrs[55] == pytest.approx(0.55, abs=0.01)  # half way down at half the decay
    else:
        assert set(lrs[9:80]) == {1.0} and lrs[-1] == pytest.approx(0.1) and lrs[90] == pytest.approx(0.55, abs=0.05)


def test_the_nearest_budget_ends_the_run(tmp_path, corpus):
    t = tiny_config(tmp_path, corpus, training__budget={"max_steps": 10, "max_tokens": 5000}).training
    assert total_steps(t, 1024) == 5  # 5000 tokens, rounded up to whole steps of 1024
    assert budget_reached(4, 5, t, Timings()) is None
    assert budget_reached(5, 5, t, Timings()) == "max_tokens"
    t = tiny_config(tmp_path, corpus, training__budget={"max_steps": 3}).training
    assert total_steps(t, 1024) == 3 and budget_reached(3, 3, t, Timings()) == "max_steps"


def test_a_deadline_leaves_time_for_one_more_step_the_evaluation_and_two_saves(tmp_path, corpus):
    soon = datetime.now(timezone.utc) + timedelta(seconds=100)
    t = tiny_config(tmp_path, corpus, training__schedule="constant", training__budget={"deadline": soon.isoformat()}).training
    assert total_steps(t, 1024) is None
    assert budget_reached(7, None, t, Timings(step=1.0, save=10.0, eval=5.0)) is None  # 1 + 5 + 2 x 10 < 100
    assert budget_reached(7, None, t, Timings(step=1.0, save=50.0, eval=5.0)) == "deadline"  # 1 + 5 + 2 x 50 > 100
    # before the first save of this run, a save is taken to last 20 steps
    assert budget_reached(7, None, t, Timings(step=3.0)) == "deadline"  # 3 + 3 + 2 x 60 > 100
