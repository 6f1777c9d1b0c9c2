"""The workers' static rendezvous (`python -m forge_trainer.launch`, the operator's torchrun command):
nodes that start minutes apart still train together, and a node that never comes fails the group
within the configured limit with a reason that says so."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml
from test_distributed import _free_port
from trainer_helpers import REPO, read_termination, tiny_config, write_config

from forge_operator.api.training import ForgeTraining
from forge_operator.training.children import WorkerState, build_pod_template
from forge_trainer.contract import ExitCode
from forge_trainer.launch import rendezvous_timeout
from forge_trainer.prestop import is_worker


def _node(rank: int, config_path, port: int, timeout: int) -> subprocess.Popen:
    """One node (pod) as the operator starts it, on 127.0.0.1 instead of rank 0's DNS name."""
    return subprocess.Popen(
        [sys.executable, "-m", "forge_trainer.launch", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
         "--rdzv-backend=static", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=forge-test",
         f"--rdzv-conf=timeout={timeout}", "--max-restarts=0", "-m", "forge_trainer", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_reads_the_operators_command_as_a_static_rendezvous():
    from torch.distributed.run import config_from_args, parse_args

    spec = yaml.safe_load((REPO / "examples" / "moe.yaml").read_text())  # two nodes of eight GPUs
    spec["metadata"].update(name="llm", namespace="ns")
    spec["spec"]["failurePolicy"] = {"rendezvousTimeoutSeconds": 900}
    ft = ForgeTraining.model_validate(spec)
    command = build_pod_template(ft, WorkerState(), "img")["spec"]["containers"][0]["command"]
    args = [a.replace("$(JOB_COMPLETION_INDEX)", "1") for a in command[3:]]
    config, entry, script_args = config_from_args(parse_args(args))
    assert (config.rdzv_backend, config.rdzv_endpoint) == ("static", "llm-r0-0.llm.ns.svc:29400")
    assert (config.rdzv_configs["rank"], config.rdzv_configs["timeout"]) == (1, "900")
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node, config.max_restarts) == (2, 2, 8, 0)
    assert script_args[-2:] == ["--config", "/etc/forge/trainer.yaml"]
    assert not is_worker({"LOCAL_RANK": "0"}, command)  # the preStop hook stops the trainers, never torchrun


def test_what_a_node_says_when_the_rendezvous_times_out():
    rank0 = rendezvous_timeout(0, "4", "h:29400", "timeout=1800",
                               "Timed out after 1801 seconds waiting for clients. 2/4 clients joined.")
    assert str(rank0) == "rendezvous timed out: node rank 0 waited 1800 s for the other nodes of 4: 2 of 4 nodes joined"
    other = rendezvous_timeout(3, "4", "h:29400", "timeout=60", "The client socket has timed out after 60000ms "
                                                                "while trying to connect to (h, 29400).")
    assert str(other) == ("rendezvous timed out: node rank 3 waited 60 s for the group of 4 nodes (node rank 0 at "
                          "h:29400): The client socket has timed out after 60000ms while trying to connect to (h, 29400).")
    assert rank0.exit_code == other.exit_code == ExitCode.RENDEZVOUS_TIMEOUT


@pytest.mark.slow
@pytest.mark.soak  # the static rendezvous on the oldest torch is covered by the test below, in 25 s
def test_a_node_that_starts_90_s_after_the_first_still_trains_with_it(tmp_path, corpus, shared_cache):
    cfg = tiny_config(tmp_path, corpus, shared_cache)
    node1 = cfg.model_copy(update={"termination_message_path": str(tmp_path / "termination-log-node1")})
    paths = [write_config(cfg, tmp_path / "config.yaml"), write_config(node1, tmp_path / "config-node1.yaml")]
    port = _free_port()
    first = _node(0, paths[0], port, timeout=300)
    time.sleep(90)  # an image pull, a volume attach on the second node
    assert first.poll() is None, first.communicate()[0]
    second = _node(1, paths[1], port, timeout=300)
    outputs = [n.communicate(timeout=300)[0] for n in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert "2 worker(s) on cpu" in outputs[0]
    for message in (read_termination(cfg), read_termination(node1)):
        assert (message["status"], message["exitCode"], message["step"]) == ("completed", 0, 30)


@pytest.mark.slow
def test_a_node_that_never_comes_fails_the_group_within_the_limit_and_says_so(tmp_path, corpus, shared_cache):
    cfg = tiny_config(tmp_path, corpus, shared_cache)
    started = time.monotonic()
    alone = _node(0, write_config(cfg, tmp_path / "config.yaml"), _free_port(), timeout=20)
    output = alone.communicate(timeout=120)[0]
    waited = time.monotonic() - started
    assert alone.returncode == ExitCode.RENDEZVOUS_TIMEOUT, output
    assert 20 <= waited < 60
    message = read_termination(cfg)
    assert message == {"status": "failed", "exitCode": 69, "message": "rendezvous timed out: node rank 0 waited 20 s "
                                                                      "for the other nodes of 2: 1 of 2 nodes joined"}
    assert "forge-trainer: rendezvous timed out: node rank 0 waited 20 s" in output


@pytest.mark.parametrize("worker_exit, node_exit", [(75, 75), (3, 1)])
def test_the_node_exits_75_when_its_workers_stopped_after_a_checkpoint(tmp_path, worker_exit, node_exit):
    """Found on a real node (tests/e2e): a deleted pod's worker saved its checkpoint and exited 75, but
    torchrun ended with exit code 1, so the container's exit code said crash. Other failures stay 1."""
    script = tmp_path / "worker.py"
    script.write_text(f"raise SystemExit({worker_exit})\n")
    out = subprocess.run(
        [sys.executable, "-m", "forge_trainer.launch", "--nnodes=1", "--nproc-per-node=1", "--rdzv-backend=static",
         f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--max-restarts=0", str(script)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == node_exit, out.stderr[-2000:]
