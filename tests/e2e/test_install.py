"""docs/install.md's path from a clone to a training, run exactly as the guide writes it: the block
after its ``tests/e2e/test_install.py runs the next block`` marker, command by command, in one shell
at the repository root (the guide's clone and ``scripts/setup-dev`` are this checkout and its
virtualenv). Ends with a Succeeded training, rank 0's log from ``forge logs`` and the model on the
volume. Uses the default dev cluster (``.dev-cluster``), so it runs before the tests of the other
files, which start a cluster of their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TIMINGS

GUIDE = ROOT / "docs" / "install.md"
MARKER = "<!-- tests/e2e/test_install.py runs the next block -->"
STEP = "@@forge-step@@"


def guide_commands(text: str) -> list[str]:
    """The commands of the block after the marker, one a line (comments and blank lines left out)."""
    after = text.split(MARKER, 1)[1]
    block = re.search(r"```sh\n(.*?)```", after, re.S)
    assert block, f"{GUIDE.name}: no ```sh block after {MARKER}"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def script(commands: list[str]) -> str:
    """One bash script running the commands in order, stopping at the first that fails; before each,
    a line naming it with the time, so that the output shows each command's output and duration."""
    lines = ["set -euo pipefail"]
    for i, command in enumerate(commands):
        lines.append(f'echo "{STEP} {i} $(date +%s.%N)"')
        lines.append(command)
    lines.append(f'echo "{STEP} {len(commands)} $(date +%s.%N)"')
    return "\n".join(lines) + "\n"


def split_output(output: str, commands: list[str]) -> dict[str, tuple[float, str]]:
    """{command: (seconds, its output)} for every command that started."""
    parts = re.split(rf"^{STEP} (\d+) ([\d.]+)\n", output, flags=re.M)
    marks = [(int(parts[i]), float(parts[i + 1]), parts[i + 2]) for i in range(1, len(parts), 3)]
    out: dict[str, tuple[float, str]] = {}
    for (index, start, text), nxt in zip(marks, marks[1:] + [None]):
        if index < len(commands):
            out[commands[index]] = ((nxt[1] - start) if nxt else float("nan"), text)
    return out


def test_the_guide_parses_into_the_documented_commands():
    commands = guide_commands(GUIDE.read_text())
    assert commands[0].startswith("scripts/dev-cluster up") and "helm install forge helm/forge" in "\n".join(commands)
    assert split_output(f"{STEP} 0 1.0\nhi\n{STEP} 1 3.5\n", ["a"]) == {"a": (2.5, "hi\n")}


@pytest.mark.timeout(3600)
def test_the_install_guide_from_clone_to_a_trained_model_on_the_volume(tmp_path, no_other_real_node_cluster):
    commands = guide_commands(GUIDE.read_text())
    venv_bin = str(Path(sys.executable).parent)  # `source .venv/bin/activate`
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", str(tmp_path))}
    env.pop("KUBECONFIG", None)
    t0 = time.monotonic()
    try:
        run = subprocess.run(["bash", "-c", script(commands)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=3600)
        steps = split_output(run.stdout, commands)
        for command, (seconds, _) in steps.items():
            TIMINGS[f"install guide: {command[:70]}"] = seconds
        TIMINGS["install guide: all"] = time.monotonic() - t0
        report = "\n".join(f"$ {c}\n{o}" for c, (_, o) in steps.items()) + f"\nstderr:\n{run.stderr[-6000:]}"
        sys.stdout.write(f"\n{report}\n")
        assert run.returncode == 0, report
        out = {c: o for c, (_, o) in steps.items()}
        _check(commands, out, report)
        # the operator, in its pod as the chart runs it, was refused nothing by the chart's RBAC
        logs = subprocess.run(["kubectl", "--kubeconfig", str(ROOT / ".dev-cluster" / "kubeconfig"), "-n",
                               "forge-system", "logs", "-l", "app.kubernetes.io/instance=forge", "--tail=-1"],
                              env=env, capture_output=True, text=True)
        assert logs.returncode == 0 and "Handler" in logs.stdout, logs.stderr
        assert "forbidden" not in logs.stdout.lower(), logs.stdout[-3000:]
    finally:
        _diagnostics(env)
        subprocess.run([str(ROOT / "scripts" / "dev-cluster"), "down"], cwd=ROOT, env=env, capture_output=True)


def _check(commands: list[str], out: dict[str, str], report: str) -> None:
    def output_of(prefix: str) -> str:
        [command] = [c for c in commands if c.startswith(prefix)]
        return out[command]

    nodes = output_of("kubectl get nodes")
    assert re.search(r"real-node-0\s+Ready\s.*\scpu\s*$", nodes, re.M), nodes
    assert re.search(r"gpu-node-0\s+Ready\s.*\sgpu\s*$", nodes, re.M), nodes
    assert re.search(r"forge-local \(default\)\s+kubernetes.io/no-provisioner\s+Retain\s+WaitForFirstConsumer",
                     output_of("kubectl get storageclass")), report
    # the operator's pods run on the CPU node, admitted under Pod Security "restricted"
    pods = output_of("kubectl -n forge-system get pods")
    assert len(re.findall(r"^forge-\S+\s+1/1\s+Running\s.*\sreal-node-0\s", pods, re.M)) == 2, pods
    assert "Succeeded" in output_of("forge status quickstart"), report
    # rank 0's log, read through the API server from the kubelet of the real node
    log = output_of("forge logs quickstart")
    assert re.search(r"step\s*600\b|exported|export", log, re.I), log
    model = output_of("ls ").split()
    assert "config.json" in model and any(f.endswith(".safetensors") for f in model), model


def _diagnostics(env: dict) -> None:
    kubeconfig = ROOT / ".dev-cluster" / "kubeconfig"
    if not kubeconfig.exists():
        return
    for args in (["get", "pods", "-A", "-o", "wide"], ["get", "forgetrainings", "-o", "yaml"],
                 ["-n", "forge-system", "logs", "deployment/forge", "--tail", "40"],
                 ["get", "events", "-A", "--sort-by", ".lastTimestamp"]):
        got = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), *args], env=env, capture_output=True,
                             text=True)
        sys.stdout.write(f"\n--- kubectl {' '.join(args)} ---\n{got.stdout[-4000:]}{got.stderr[-1000:]}\n")


@pytest.fixture
def no_other_real_node_cluster():
    """The guide's cluster and a test cluster would share the node's bridge and containerd root."""
    running = subprocess.run(["pgrep", "-af", "kubelet --config"], capture_output=True, text=True).stdout
    assert not running.strip(), f"another real-node cluster runs on this machine:\n{running}"
    yield

