"""Checkpoint files on disk (runtime/checkpoint.py): a save of a step that already exists replaces it
without a moment in which no complete copy exists; an explicit resume starts a line of its own."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from forge_trainer.runtime.dist import Dist
from forge_trainer.runtime import checkpoint
from forge_trainer.runtime.checkpoint import REPLACED, TrainState, find_latest, is_complete, load


def save(root: Path, step: int, model, optimizer, keep_last: int) -> Path:
    return Path(checkpoint.save(root, model, optimizer, TrainState(step=step), keep_last, Dist()).path)


def _model_and_optimizer(value: float):
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(value)
    return model, torch.optim.AdamW(model.parameters())


def _weight(path: Path) -> float:
    model, optimizer = _model_and_optimizer(0.0)
    load(path, model, optimizer, Dist())
    return model.weight[0, 0].item()


def test_saving_a_step_again_replaces_it(tmp_path):
    save(tmp_path, 10, *_model_and_optimizer(1.0), keep_last=2)
    final = save(tmp_path, 10, *_model_and_optimizer(2.0), keep_last=2)
    assert find_latest(tmp_path) == final and _weight(final) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000010"]


def test_a_kill_between_the_two_renames_leaves_the_old_copy_found_and_restored(tmp_path, monkeypatch):
    save(tmp_path, 10, *_model_and_optimizer(1.0), keep_last=1)
    rename = os.rename

    def killed_after_the_first_rename(src, dst, **kw):
        if str(src).endswith("step-00000010.tmp") and Path(dst) == tmp_path / "step-00000010":
            raise KeyboardInterrupt("killed")  # the new copy would move into place now
        rename(src, dst, **kw)

    monkeypatch.setattr(checkpoint.os, "rename", killed_after_the_first_rename)
    try:
        save(tmp_path, 10, *_model_and_optimizer(2.0), keep_last=1)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    aside = tmp_path / (REPLACED + "step-00000010")
    assert not (tmp_path / "step-00000010").exists() and is_complete(aside)
    assert find_latest(tmp_path) == aside and _weight(aside) == 1.0
    # the next save puts it back where it was before it writes its own
    final = save(tmp_path, 20, *_model_and_optimizer(3.0), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000010", "step-00000020"]
    assert _weight(tmp_path / "step-00000010") == 1.0 and find_latest(tmp_path) == final


def test_an_explicit_resume_starts_a_line_that_restarts_continue(tmp_path, corpus, shared_cache):
    """Going back to step 10 of a run that reached 30: a restart of the new run continues from its own
    newest checkpoint (not from step 10 again), and pruning keeps the new line's checkpoints, never the
    one it started from."""
    import forge_trainer
    from trainer_helpers import tiny_config

    first = tiny_config(tmp_path, corpus, shared_cache, checkpoint__keep_last=2)
    assert forge_trainer.run(first).step == 30  # checkpoints 20 and 30 kept
    ckpt = Path(first.checkpoint.dir)
    back = str(ckpt / "step-00000020")
    rerun = tiny_config(tmp_path, corpus, shared_cache, checkpoint__keep_last=2, checkpoint__resume=back,
                        training__budget={"max_steps": 25}, checkpoint__interval_steps=2)
    summary = forge_trainer.run(rerun)
    assert (summary.start_step, summary.step) == (20, 25)
    # the new line kept its newest two (22 replaced nothing, 24 and 25 are its own), the old line is untouched
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000020", "step-00000024", "step-00000025",
                                                          "step-00000030"]
    restarted = tiny_config(tmp_path, corpus, shared_cache, checkpoint__keep_last=2, checkpoint__resume=back,
                            training__budget={"max_steps": 28}, checkpoint__interval_steps=2)
    summary = forge_trainer.run(restarted)
    assert (summary.start_step, summary.step) == (25, 28)
    assert (ckpt / "step-00000020").is_dir() and (ckpt / "step-00000030").is_dir()
