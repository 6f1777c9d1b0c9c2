"""The preStop hook: SIGTERM to the trainer workers under torchrun, then wait until they have checkpointed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import REPO, read_termination, tiny_config, wait_for, write_config

from forge_trainer import prestop
from forge_trainer.contract import ExitCode
from forge_trainer.runtime.checkpoint import find_latest, is_complete
from forge_trainer.prestop import Proc, pick_workers, runs_module

WORKER = ["/opt/conda/bin/python", "-u", "-m", "forge_trainer", "--config", "/etc/forge/trainer.yaml"]
TORCHRUN = ["/opt/conda/bin/python", "/opt/conda/bin/torchrun", "--nnodes=2", "--nproc-per-node=2",
            "--max-restarts=0", "-m", "forge_trainer", "--config", "/etc/forge/trainer.yaml"]
RANK = {"LOCAL_RANK": "0", "RANK": "0", "PATH": "/usr/bin"}


@pytest.mark.parametrize("cmdline, expected", [
    (WORKER, True),
    (["python", "-um", "forge_trainer"], True),
    (["python", "-X", "dev", "-mforge_trainer"], True),
    (TORCHRUN, False),  # the module is only torchrun's argument
    (["python", "-m", "torch.distributed.run", "-m", "forge_trainer"], False),
    (["python", "-m", "forge_trainer.prestop"], False),
    (["python", "-c", "pass", "-m", "forge_trainer"], False),
    (["python", "train.py", "-m", "forge_trainer"], False),
    ([], False),
])
def test_a_worker_is_the_interpreter_running_the_trainer_module(cmdline, expected):
    assert runs_module(cmdline) is expected


def test_only_torchruns_workers_are_picked():
    procs = [
        Proc(1, 0, {"PATH": "/usr/bin"}, TORCHRUN),  # PID 1: torchrun, never signalled
        Proc(7, 1, {**RANK}, WORKER),
        Proc(8, 1, {**RANK, "LOCAL_RANK": "1"}, WORKER),
        Proc(9, 7, {**RANK}, WORKER),  # forked by worker 7 (a data loader): its worker handles it
        Proc(10, 1, {"PATH": "/usr/bin"}, WORKER),  # no LOCAL_RANK: not started by torchrun
        Proc(11, 7, {**RANK}, ["python", "-c", "from multiprocessing.spawn import spawn_main"]),
        Proc(12, 0, {**RANK}, ["python", "-m", "forge_trainer.prestop"]),  # the hook itself
        Proc(13, 0, {}, []),  # another user's process or a zombie: nothing readable
    ]
    assert pick_workers(procs) == [7, 8]
    assert pick_workers(procs, exclude=[8]) == [7]
    # scoped to the descendants of one process: another torchrun's workers are not touched
    other = [Proc(30, 0, {}, ["bash"]), Proc(31, 30, {}, TORCHRUN), Proc(32, 31, {**RANK}, WORKER)]
    assert pick_workers(procs + other) == [7, 8, 32]
    assert pick_workers(procs + other, ancestor=1) == [7, 8]
    assert pick_workers(procs + other, ancestor=30) == [32]
    assert pick_workers(procs + other, ancestor=12) == []


def test_proc_is_read_including_odd_command_names(tmp_path):
    def fake(pid: int, comm: str, ppid: int, environ: list[str], cmdline: list[str], state: str = "S"):
        d = tmp_path / str(pid)
        d.mkdir()
        rest = [state, str(ppid)] + ["0"] * 17 + ["4242"] + ["0"] * 30  # field 22: the start time
        (d / "stat").write_text(f"{pid} ({comm}) {' '.join(rest)}\n")
        (d / "environ").write_bytes(b"".join(v.encode() + b"\0" for v in environ))
        (d / "cmdline").write_bytes(b"".join(v.encode() + b"\0" for v in cmdline))

    fake(1, "torchrun", 0, ["PATH=/bin"], TORCHRUN)
    fake(20, "pt_main) (thread", 1, ["LOCAL_RANK=0", "EMPTY="], WORKER)
    fake(21, "python", 1, [], [], state="Z")
    (tmp_path / "self").mkdir()
    procs = {p.pid: p for p in prestop.read_procs(tmp_path)}
    assert procs[20] == Proc(20, 1, {"LOCAL_RANK": "0", "EMPTY": ""}, WORKER)
    assert pick_workers(procs.values()) == [20]
    assert prestop.alive(20, 4242, tmp_path) and not prestop.alive(20, 1, tmp_path)  # a reused pid
    assert not prestop.alive(21, 4242, tmp_path) and not prestop.alive(99, 4242, tmp_path)


def test_without_workers_it_exits_at_once(capsys):
    assert prestop.main(["--parent", str(os.getpid())]) == 0
    assert capsys.readouterr().out == "forge-prestop: no trainer worker found\n"


def test_under_torchrun_the_workers_checkpoint_before_torchrun_is_stopped(tmp_path, corpus, shared_cache):
    cfg = tiny_config(tmp_path, corpus, shared_cache, training__budget={"max_steps": 100_000},
                      training__schedule="constant", checkpoint__interval_steps=10)
    log = open(tmp_path / "log", "w")
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
         "--max-restarts=0", "-m", "forge_trainer", "--config", str(write_config(cfg, tmp_path / "config.yaml"))],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True)  # its own process group: a failure below kills its workers too
    try:
        wait_for(lambda: is_complete(Path(cfg.checkpoint.dir) / "step-00000010"), torchrun)
        # in the container every process descends from PID 1 and no argument is needed; here, only
        # the workers of this torchrun (other tests may be running their own)
        hook = subprocess.run([sys.executable, "-m", "forge_trainer.prestop", "--parent", str(torchrun.pid)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert hook.returncode == 0, hook.stderr
        assert hook.stdout.startswith("forge-prestop: sent SIGTERM to 2 trainer worker(s)"), hook.stdout
        assert "all exited after" in hook.stdout
        # torchrun then stops on its own: its workers are gone (the kubelet's SIGTERM finds nothing to kill)
        assert torchrun.wait(60) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(torchrun.pid, signal.SIGKILL)  # torchrun and any worker left (100,000 steps to go)
        torchrun.wait()
    message = read_termination(cfg)
    assert message["status"] == "preempted" and message["exitCode"] == ExitCode.PREEMPTED, message
    assert message["reason"] == "sigterm" and message["step"] >= 10
    latest = find_latest(cfg.checkpoint.dir)
    assert latest.name == f"step-{message['step']:08d}" and message["checkpoint"] == str(latest)
    assert len(list(latest.glob("*.distcp"))) == 2  # both workers wrote their shard
    assert "exitcode  : 75" in (tmp_path / "log").read_text()  # torchrun saw the trainer's code
