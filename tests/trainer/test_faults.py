"""Fault tolerance in real processes: SIGKILL mid-save, resume to the same loss, SIGTERM -> checkpoint + exit 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import REPO, read_termination, run_trainer, tiny_config, trainer_cmd, wait_for, write_config

from forge_trainer.contract import ExitCode
from forge_trainer.runtime.checkpoint import SLEEP_ENV, find_latest, is_complete


@pytest.fixture(scope="module")
def killed_mid_save(tmp_path_factory, corpus, shared_cache):
    """The reference config in a process that is SIGKILLed while it writes its step-20 checkpoint."""
    work = tmp_path_factory.mktemp("killed")
    cfg = tiny_config(work, corpus, shared_cache)
    config_path = write_config(cfg, work / "config.yaml")
    ckpt = Path(cfg.checkpoint.dir)
    log = open(work / "first.log", "w")
    proc = subprocess.Popen(trainer_cmd(config_path), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, SLEEP_ENV: "3"})
    # The hook sleeps after the shards are written and before the commit, in the background: the loop
    # goes on training meanwhile.
    wait_for(lambda: (ckpt / "step-00000020.tmp" / ".metadata").exists(), proc)
    wait_for(lambda: "step 21/30" in (work / "first.log").read_text(), proc)
    assert not (ckpt / "step-00000020").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return cfg, config_path


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_valid(killed_mid_save):
    import torch.distributed.checkpoint as dcp

    cfg, _ = killed_mid_save
    ckpt = Path(cfg.checkpoint.dir)
    assert (ckpt / "step-00000020.tmp").is_dir() and not is_complete(ckpt / "step-00000020.tmp")
    assert not (ckpt / "step-00000020").exists()
    assert (ckpt / "latest").read_text().strip() == "step-00000010"
    assert find_latest(ckpt) == ckpt / "step-00000010"
    metadata = dcp.FileSystemReader(str(ckpt / "step-00000010")).read_metadata()
    assert any(k.startswith("model.") for k in metadata.state_dict_metadata)
    assert json.loads((ckpt / "step-00000010" / "trainer_state.json").read_text())["step"] == 10


def test_a_killed_run_resumes_to_the_same_loss_as_an_uninterrupted_one(killed_mid_save, reference):
    cfg, config_path = killed_mid_save
    _, uninterrupted, _ = reference
    proc = run_trainer(config_path)
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert "resumed from" in proc.stderr and "step-00000010" in proc.stderr
    message = read_termination(cfg)
    assert message["status"] == "completed" and message["step"] == 30
    # log_interval_steps is 1, so trainLoss is the loss of step 30 itself.
    assert message["trainLoss"] == pytest.approx(uninterrupted.history[-1]["loss"], rel=1e-5)
    assert message["valLoss"] == pytest.approx(uninterrupted.val_loss, rel=1e-5)
    ckpt = Path(cfg.checkpoint.dir)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-00000010", "step-00000020", "step-00000030"]
    provenance = json.loads((Path(cfg.output.dir) / "provenance.json").read_text())
    assert provenance["resumed_from"] == str(ckpt / "step-00000010")


def test_sigterm_checkpoints_and_exits_75(tmp_path, corpus, shared_cache):
    """SIGTERM while a checkpoint is written in the background: that one is committed, then the last one is
    written before the process exits."""
    cfg = tiny_config(tmp_path, corpus, shared_cache, training__budget={"max_steps": 100_000}, training__schedule="constant",
                      checkpoint__interval_steps=10)
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen(trainer_cmd(write_config(cfg, tmp_path / "config.yaml")), stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO, env={**os.environ, SLEEP_ENV: "1"})
    wait_for(lambda: (Path(cfg.checkpoint.dir) / "step-00000010.tmp" / ".metadata").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == ExitCode.PREEMPTED
    message = read_termination(cfg)
    assert message["status"] == "preempted" and message["reason"] == "sigterm" and message["step"] >= 10
    latest = find_latest(cfg.checkpoint.dir)
    assert latest.name == f"step-{message['step']:08d}" and message["checkpoint"] == str(latest)
    assert is_complete(Path(cfg.checkpoint.dir) / "step-00000010") and message["lastCheckpoint"]["step"] == message["step"]
    assert not Path(cfg.output.dir).exists()  # preempted runs resume; they do not export


def test_a_sigterm_after_the_loop_does_not_cut_the_termination_message_short(tmp_path, corpus, shared_cache):
    """Once one worker of a node has exited, torchrun sends SIGTERM to the others, maybe while they still
    report their last progress or shut the process group down: they finish and write their message."""
    cfg = tiny_config(tmp_path, corpus, shared_cache, training__budget={"max_steps": 4}, checkpoint__interval_steps=2)
    config_path = write_config(cfg, tmp_path / "config.yaml")
    # the SIGTERM arrives while run() shuts down, after its loop has ended
    script = ("import os, signal, sys\n"
              "import forge_trainer.train as train\n"
              "from forge_trainer.__main__ import main\n"
              "shutdown = train.shutdown\n"
              "def late_sigterm(d, *args):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    shutdown(d, *args)\n"
              "train.shutdown = late_sigterm\n"
              f"sys.exit(main(['--config', {str(config_path)!r}]))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == ExitCode.OK, out.stdout[-2000:] + out.stderr[-2000:]
    message = read_termination(cfg)
    assert message["status"] == "completed" and message["exitCode"] == 0 and message["step"] == 4


def test_a_sigterm_before_the_first_step_ends_the_run_at_once_with_75(tmp_path, corpus):
    """Data preparation can take hours; a pod stopped meanwhile does not wait for its grace period. The
    preparation stops between files and leaves nothing that looks prepared."""
    cfg = tiny_config(tmp_path, corpus, tmp_path / "fresh-cache")
    config_path = write_config(cfg, tmp_path / "config.yaml")
    # the SIGTERM arrives as the data is about to be prepared (after the tokenizer is trained)
    script = ("import os, signal, sys\n"
              "import forge_trainer.data.prepare as data\n"
              "from forge_trainer.__main__ import main\n"
              "prepare = data.prepare_dataset\n"
              "def sigterm_then_prepare(*args, **kwargs):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return prepare(*args, **kwargs)\n"
              "data.prepare_dataset = sigterm_then_prepare\n"
              f"sys.exit(main(['--config', {str(config_path)!r}]))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == ExitCode.PREEMPTED, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == ("forge-trainer: stopped: SIGTERM while the data was being "
                                                   "prepared; nothing to save")
    message = read_termination(cfg)
    assert message["exitCode"] == ExitCode.PREEMPTED and not Path(cfg.checkpoint.dir).exists()
    assert not list((tmp_path / "fresh-cache").glob("tokens/*/manifest.json"))
    assert not list((tmp_path / "fresh-cache").glob("tokens/.*.tmp"))
