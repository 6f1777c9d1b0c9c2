"""Two nodes x one process under torchrun (c10d rendezvous, gloo, FSDP2) match the single-process run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import REPO, read_termination, tiny_config, write_config

import forge_trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_like_one_process_and_checkpoints_reshard(tmp_path, corpus, shared_cache, reference):
    _, single, _ = reference
    cfg = tiny_config(tmp_path, corpus, shared_cache)
    # each node (pod) has its own termination log; c10d assigns the global ranks
    node1 = cfg.model_copy(update={"termination_message_path": str(tmp_path / "termination-log-node1")})
    config_paths = [write_config(cfg, tmp_path / "config.yaml"), write_config(node1, tmp_path / "config-node1.yaml")]
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(i),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "forge-test",
             "-m", "forge_trainer", "--config", str(config_paths[i])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
        for i in range(2)
    ]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs
    log = "\n".join(outputs)
    assert "2 worker(s) on cpu" in log

    # The same loss curve as one process: same data per step, gradients averaged over the two workers.
    curve = {int(m[1]): float(m[2]) for m in re.finditer(r"\[rank 0\] step (\d+)/30 \| loss ([\d.]+)", log)}
    assert sorted(curve) == list(range(1, 31))
    for h in single.history:
        assert curve[h["step"]] == pytest.approx(h["loss"], abs=2e-4), h["step"]
    message = read_termination(cfg)
    assert message["valLoss"] == pytest.approx(single.val_loss, rel=1e-4)
    assert message["exitCode"] == 0 and message["totalSteps"] == 30 and message["lastCheckpoint"]["step"] == 30
    other = read_termination(node1)  # not only global rank 0: each node's local rank 0 writes its own
    assert other["status"] == "completed" and other["exitCode"] == 0 and other["step"] == 30
    provenance = json.loads((Path(cfg.output.dir) / "provenance.json").read_text())
    assert provenance["world_size"] == 2

    # DCP reshards: the two-worker checkpoint of step 20 resumes in one process and ends where the single run did.
    ckpt20 = Path(cfg.checkpoint.dir) / "step-00000020"
    assert len(list(ckpt20.glob("*.distcp"))) == 2
    resumed = forge_trainer.run(tiny_config(tmp_path / "resumed", corpus, shared_cache, checkpoint__resume=str(ckpt20)))
    assert resumed.step == 30 and [h["step"] for h in resumed.history] == list(range(21, 31))
    assert resumed.history[-1]["loss"] == pytest.approx(single.history[-1]["loss"], abs=2e-4)


def _on_two_ranks(rank: int, init_file: str, results: str, work) -> None:
    """One of two gloo processes: runs ``work(rank, dist)`` and writes what came of it to rank-N."""
    import torch.distributed as dist

    from forge_trainer.runtime.dist import Dist, shutdown

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    d = Dist(rank=rank, world=2, setup_group=dist.new_group(backend="gloo"))
    error = None
    try:
        work(rank, d)
        outcome = "went on"
    except Exception as e:
        error, outcome = e, f"{type(e).__name__}: {e}"
    Path(results, f"rank-{rank}").write_text(outcome)
    shutdown(d, error)  # as run() leaves the group; a process that gloo aborts fails mp.spawn


def _two_ranks(tmp_path: Path, work) -> list[str]:
    import torch.multiprocessing as mp

    mp.spawn(_on_two_ranks, args=(str(tmp_path / "init"), str(tmp_path), work), nprocs=2, join=True)
    return [(tmp_path / f"rank-{r}").read_text() for r in range(2)]


def _memory_fits_only_on_rank_0(rank: int, d) -> None:
    from forge_trainer.contract import ConfigError
    from forge_trainer.runtime.signals import on_every_rank

    def check():
        if rank == 1:
            raise ConfigError("the model needs 90 GiB, this node has 80 GiB")

    on_every_rank(d, check)


def test_a_check_that_fails_on_one_rank_fails_on_every_rank(tmp_path):
    """A rank whose own machine fails a set-up check (memory, data) must not leave the others waiting in
    a collective: all end with the same error."""
    outcomes = _two_ranks(tmp_path, _memory_fits_only_on_rank_0)
    assert set(outcomes) == {"ConfigError: config error: the model needs 90 GiB, this node has 80 GiB"}


def _commit_refused_on_rank_0(rank: int, d) -> None:
    import os

    import torch

    from forge_trainer.runtime import checkpoint

    rename = os.rename

    def refused(src, dst, **kw):  # rank 0's file system refuses the commit
        if str(src).endswith("step-00000010.tmp"):
            raise OSError(28, "No space left on device")
        rename(src, dst, **kw)

    if rank == 0:
        checkpoint.os.rename = refused
    model = torch.nn.Linear(4, 4)
    root = Path(os.environ["FORGE_TEST_CKPT"])
    checkpoint.save(root, model, torch.optim.AdamW(model.parameters()), checkpoint.TrainState(step=10), 2, d)


def test_a_checkpoint_commit_that_fails_on_rank_0_fails_on_every_rank(tmp_path, monkeypatch):
    from forge_trainer.runtime.checkpoint import find_latest

    monkeypatch.setenv("FORGE_TEST_CKPT", str(tmp_path / "ckpt"))
    assert _two_ranks(tmp_path, _commit_refused_on_rank_0) == [
        "OSError: [Errno 28] No space left on device",
        "RuntimeError: rank 0 failed committing checkpoint step-00000010: OSError: [Errno 28] No space left on device"]
    assert find_latest(tmp_path / "ckpt") is None  # nothing half-committed looks valid


def _leave_late_on_rank_1(rank: int, d) -> None:
    """Rank 1 arrives at the teardown 2 s after rank 0; rank 0 notes when its teardown returned."""
    import time

    from forge_trainer.runtime.dist import shutdown

    root = Path(os.environ["FORGE_TEST_TIMES"])
    if rank == 1:
        time.sleep(2)
        (root / "rank-1-arrived").write_text(repr(time.time()))
    shutdown(d)
    (root / f"rank-{rank}-left").write_text(repr(time.time()))


def test_ranks_leave_the_process_group_together(tmp_path, monkeypatch):
    """A rank that finished first waits for the others before it closes its connections (gloo aborts
    a process whose peer closes while it still has a collective in flight)."""
    monkeypatch.setenv("FORGE_TEST_TIMES", str(tmp_path))
    import torch.multiprocessing as mp

    mp.spawn(_leaving, args=(str(tmp_path / "init"), _leave_late_on_rank_1), nprocs=2, join=True)
    arrived = float((tmp_path / "rank-1-arrived").read_text())
    assert float((tmp_path / "rank-0-left").read_text()) >= arrived


def _leaving(rank: int, init_file: str, work) -> None:
    """One of two gloo processes whose ``work(rank, dist)`` leaves the process group itself."""
    import torch.distributed as dist

    from forge_trainer.runtime.dist import Dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    work(rank, Dist(rank=rank, world=2, setup_group=dist.new_group(backend="gloo")))


def _rank_1_dies(rank: int, d) -> None:
    """Rank 1's process ends without leaving the group; rank 0 leaves with a 3 s limit."""
    import time
    from datetime import timedelta

    from forge_trainer.runtime.dist import shutdown

    if rank == 1:
        os._exit(0)
    started = time.monotonic()
    shutdown(d, timeout=timedelta(seconds=3))
    Path(os.environ["FORGE_TEST_TIMES"], "rank-0-waited").write_text(repr(time.monotonic() - started))


def test_a_rank_that_never_arrives_at_the_teardown_is_waited_for_a_bounded_time(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_TEST_TIMES", str(tmp_path))
    import torch.multiprocessing as mp

    mp.spawn(_leaving, args=(str(tmp_path / "init"), _rank_1_dies), nprocs=2, join=True)
    assert float((tmp_path / "rank-0-waited").read_text()) < 60


RANK_THAT_FAILS_A_CHECK = """
import sys
import torch.distributed as dist
from forge_trainer.contract import ConfigError, TrainerError
from forge_trainer.runtime.dist import Dist, shutdown
from forge_trainer.runtime.signals import on_every_rank

rank, init = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
d = Dist(rank=rank, world=2, setup_group=dist.new_group(backend="gloo"))

def check():
    if rank == 1:
        raise ConfigError("the model needs 90 GiB, this node has 80 GiB")

try:
    on_every_rank(d, check)
    code = 0
except TrainerError as e:
    code = e.exit_code
    shutdown(d, e)
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(900)  # 20 pairs of processes that import torch: about 9 s each on a quiet machine
def test_every_rank_keeps_its_exit_code_through_the_teardown_20_times(tmp_path):
    """A set-up check that fails on one rank ends every rank with the check's exit code (78), also
    after leaving the process group: a signal at teardown would make the operator retry a failure
    that no retry can fix. The abort it guards against came at interpreter exit, from gloo threads
    still running, and not every time: hence the repeats."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(20):
        init = tmp_path / f"init-{attempt}"
        ranks = [subprocess.Popen([sys.executable, "-c", RANK_THAT_FAILS_A_CHECK, str(r), str(init)], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(2)]
        outputs = [r.communicate(timeout=120)[0] for r in ranks]
        assert [r.returncode for r in ranks] == [78, 78], (attempt, outputs)
