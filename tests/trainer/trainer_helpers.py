"""Helpers shared by the trainer tests: a learnable corpus, a tiny config, running the trainer."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from forge_trainer.config import TrainerConfig

REPO = Path(__file__).resolve().parents[2]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
FRUITS = ["apples", "pears", "plums", "figs", "limes", "dates"]


def write_corpus(root: Path, files: int = 40, lines: int = 60, seed: int = 0) -> Path:
    """Sentences with a simple, learnable structure (counting down fruit)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        out = []
        for _ in range(lines):
            n, k, fr = rng.choice(NAMES), rng.randint(1, 9), rng.choice(FRUITS)
            out.append(f"{n} has {k} {fr}. {n} eats one. now {n} has {k - 1} {fr}.")
        (root / f"doc{f:03d}.txt").write_text("\n".join(out) + "\n")
    return root


def tiny_config(work: Path, corpus: Path, cache: Path | None = None, **overrides) -> TrainerConfig:
    """A 2-layer, 64-wide Llama on the toy corpus: about a second of CPU per 30 steps."""
    cfg = {
        "run_name": "test",
        "model": {"architecture": {"num_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}},
        "tokenizer": {"train": {"vocab_size": 320}},
        "data": {"sources": [{"name": "toy", "path": str(corpus)}], "validation": {"fraction": 0.05}},
        "training": {"seq_len": 64, "global_batch_sequences": 16, "micro_batch_sequences": 4, "lr": 3e-3, "min_lr": 3e-4,
                     "warmup_steps": 5, "budget": {"max_steps": 30}, "eval_interval_steps": 15, "eval_batches": 4,
                     "log_interval_steps": 1},
        "checkpoint": {"dir": str(work / "ckpt"), "interval_steps": 10, "interval_minutes": None},
        "output": {"dir": str(work / "out")},
        "cache_dir": str(cache or work / "cache"),
        "metrics": {"port": 0, "progress_interval_seconds": 0.01},
        "termination_message_path": str(work / "termination-log"),
    }
    for dotted, value in overrides.items():
        node = cfg
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return TrainerConfig.model_validate(cfg)


def write_config(cfg: TrainerConfig, path: Path) -> Path:
    path.write_text(cfg.to_yaml())
    return path


def run_two_workers(cfg: TrainerConfig, work: Path) -> str:
    """Train ``cfg`` with two worker processes on this machine (torchrun, gloo); the log, after checking that
    both workers ran and the run succeeded."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "forge_trainer", "--config", str(write_config(cfg, work / "config.yaml"))],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "2 worker(s) on cpu" in log
    return log


def trainer_cmd(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "forge_trainer", "--config", str(config_path)]


def run_trainer(config_path: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(trainer_cmd(config_path), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def read_termination(cfg: TrainerConfig) -> dict:
    return json.loads(Path(cfg.termination_message_path).read_text())


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll ``predicate`` until it holds; fails if ``proc`` exits first or it never does."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("condition never became true")
        time.sleep(0.02)
