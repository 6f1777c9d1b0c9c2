"""Fixtures of the trainer tests: a small learnable corpus, a shared cache, one reference run."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import tiny_config, write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "toy")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, corpus, shared_cache):
    """One uninterrupted in-process run of the tiny config, 30 steps; several tests compare against it."""
    import forge_trainer

    work = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(work, corpus, shared_cache)
    progress: list[dict] = []
    summary = forge_trainer.run(cfg, on_progress=progress.append)
    return cfg, summary, progress


@pytest.fixture(scope="session")
def models(tmp_path_factory, corpus, shared_cache):
    """The evaluator's tests' models (eval_helpers.train_pair: 30 and 3 steps) and task files."""
    from eval_helpers import train_pair, write_tasks

    work = tmp_path_factory.mktemp("eval-models")
    heldout, strong, weak = train_pair(work, corpus, shared_cache)
    mc, em = write_tasks(work / "tasks")
    return {"heldout": heldout, "strong": strong, "weak": weak, "mc": mc, "em": em, "work": work}
