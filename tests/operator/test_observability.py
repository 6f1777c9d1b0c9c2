"""What a cluster operator sees, on the real control plane: structured JSON logs that name the object
and the decision, the operator's own Prometheus metrics next to the trainings', and `forge status -w`,
`forge events` and `forge logs` finding things the way kubectl does."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from operator_support import OperatorProcess, create_pvcs, training
from test_lifecycle import phase_is, report_progress, running_workers

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """The exposition as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def forge(*args: str, kubeconfig: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {"KUBECONFIG": kubeconfig}
    return subprocess.run([sys.executable, "-m", "forge_operator", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture
def json_operator(crds, kube, tmp_path):
    create_pvcs(kube, "corpus", "ckpt", "models")
    port = free_port()
    op = OperatorProcess(kube.kubeconfig, [kube.namespace], tmp_path / "operator.log",
                         env={"FORGE_LOG_FORMAT": "json", "FORGE_METRICS_PORT": str(port)}).start()
    op.metrics_port = port
    try:
        yield op
    finally:
        op.stop()
        sys.stdout.write(f"\n--- operator log ({kube.namespace}) ---\n{op.log()[-4000:]}\n")


def test_json_logs_operator_metrics_and_the_cli_tell_the_story(kube, json_operator):
    kube.apply(training("llm"))
    pods = kube.wait_for("4 running ranks", running_workers(kube, "llm", 4, 0), timeout=90)
    report_progress(kube, pods[0]["metadata"]["name"], step=30, loss=2.5, checkpoint_step=20)
    kube.wait_for("Running", phase_is(kube, "llm", "Running"))

    # every line is one JSON object; the operator's own lines name the object and the decision
    def ours() -> list[dict]:
        records = [json.loads(line) for line in json_operator.log().splitlines() if line.strip()]
        return [r for r in records if (r.get("object") or {}).get("name") == "llm"]

    ours = kube.wait_for("the transition to Running logged", lambda: (
        o := ours()) and any(r.get("decision") == "phase" and r["phase"] == "Running" for r in o) and o)
    assert all(r["object"]["namespace"] == kube.namespace and r["object"]["kind"] == "ForgeTraining" for r in ours)
    assert any(r.get("decision") == "event" and r.get("reason") for r in ours)

    # the operator's metrics beside the training's
    m = kube.wait_for("the training's loss and phase exported",
                      lambda: (m := scrape(json_operator.metrics_port))
                      .get(f'forge_training_loss{{name="llm",namespace="{kube.namespace}"}}') == 2.5
                      and m.get('forge_operator_resources{kind="ForgeTraining",phase="Running"}') == 1 and m)
    assert m['forge_operator_reconcile_duration_seconds_count{kind="ForgeTraining"}'] > 0
    assert m['forge_operator_last_reconcile_timestamp_seconds{kind="ForgeTraining"}'] > 0
    assert "forge_operator_requeues_pending" in m

    # `forge events`: the training's events and its children's, oldest first, kubectl's columns
    posted = {e["reason"] for e in kube.events() if e["involvedObject"]["name"] == "llm"}
    events = forge("events", "llm", "-n", kube.namespace, kubeconfig=kube.kubeconfig)
    assert events.returncode == 0, events.stderr
    header, *rows = events.stdout.splitlines()
    assert header.split()[:4] == ["LAST", "SEEN", "TYPE", "REASON"]
    assert any("forgetraining/llm" in r for r in rows), events.stdout
    assert posted and all(any(reason in r for r in rows) for reason in posted)

    # `forge logs`: rank 0 of the newest attempt is asked for its log (kwok runs no kubelet to serve it)
    logs = forge("logs", "llm", "-n", kube.namespace, kubeconfig=kube.kubeconfig)
    assert logs.returncode == 1 and "Traceback" not in logs.stderr
    assert logs.stderr.startswith(f"forge logs: no log from pod {pods[0]['metadata']['name']}:"), logs.stderr
    missing = forge("logs", "llm", "--rank", "7", "-n", kube.namespace, kubeconfig=kube.kubeconfig)
    assert missing.stderr.strip() == 'forge logs: forgetraining "llm" has no worker of rank 7 in its attempt 0'
    none = forge("logs", "nope", "-n", kube.namespace, kubeconfig=kube.kubeconfig)
    assert none.returncode == 1 and 'forgetraining "nope" has no worker pods' in none.stderr


def test_status_watch_prints_each_change(kube, crds):
    kube.apply(training("llm"))
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {"KUBECONFIG": kube.kubeconfig}
    proc = subprocess.Popen([sys.executable, "-m", "forge_operator", "status", "-w", "-n", kube.namespace],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=60).split()[:2] == ["NAMESPACE", "NAME"]
        assert lines.get(timeout=30).split()[:2] == [kube.namespace, "llm"]
        kube("patch", "forgetraining", "llm", "--subresource=status", "--type=merge",
             "-p", '{"status":{"phase":"Running","progress":{"step":42}}}')
        changed = lines.get(timeout=30).split()
        assert changed[:3] == [kube.namespace, "llm", "Running"] and "42" in changed
    finally:
        proc.terminate()
        proc.wait(10)
