"""Operating trainings: suspend/resume, edits, lost nodes, TTL, deletion, operator crashes, many tenants."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest

from kubetest import Kube
from operator_support import OperatorProcess, create_pvcs, training
from test_lifecycle import exit_pod, ft, phase_is, report_progress, running_workers, worker_pods

pytestmark = pytest.mark.cluster


def test_suspend_stops_workers_and_resume_brings_them_back(kube, operator):
    kube.apply(training("llm", resources={"numNodes": 2}))
    pods = kube.wait_for("running", running_workers(kube, "llm", 2, 0))
    kube.wait_for("Running", phase_is(kube, "llm", "Running"))
    report_progress(kube, pods[0]["metadata"]["name"], step=12, loss=4.0, checkpoint_step=10)
    kube.wait_for("checkpoint recorded", lambda: ft(kube, "llm")["status"].get("lastCheckpoint"))

    kube("patch", "forgetraining", "llm", "--type=merge", "-p", '{"spec":{"scheduling":{"suspend":true}}}')
    kube.wait_for("workers gone", lambda: not worker_pods(kube, "llm"), timeout=60)
    o = kube.wait_for("Suspended", phase_is(kube, "llm", "Suspended"))
    assert kube.get("job", "llm-r0")["spec"]["suspend"] is True
    assert any(c["type"] == "Suspended" and c["status"] == "True" for c in o["status"]["conditions"])
    assert o["status"]["lastCheckpoint"]["step"] == 10

    kube("patch", "forgetraining", "llm", "--type=merge", "-p", '{"spec":{"scheduling":{"suspend":false}}}')
    kube.wait_for("workers back", running_workers(kube, "llm", 2, 0))
    o = kube.wait_for("Running again", phase_is(kube, "llm", "Running"))
    running = next(c for c in o["status"]["conditions"] if c["type"] == "Running")
    assert running["reason"] == "Resumed"
    assert not o["status"].get("restartCount"), "a suspension is not a failure"
    # the trainer resumes from the newest complete checkpoint in the same location
    config = kube.get("configmap", "llm-config")["data"]["trainer.yaml"]
    assert "resume: auto" in config and "dir: /mnt/pvc/ckpt/llm" in config


def test_resource_edit_restarts_from_checkpoint_without_using_up_restarts(kube, operator):
    kube.apply(training("llm", resources={"numNodes": 2}, failurePolicy={"maxRestarts": 0}))
    pods = kube.wait_for("running", running_workers(kube, "llm", 2, 0))
    report_progress(kube, pods[0]["metadata"]["name"], step=50, loss=3.0, checkpoint_step=50)
    kube.wait_for("checkpoint recorded", lambda: ft(kube, "llm")["status"].get("lastCheckpoint"))

    # an edit the trainer cannot run: reported, and the running workers are left alone
    kube("patch", "forgetraining", "llm", "--type=merge", "-p", '{"spec":{"resources":{"gpusPerNode":3}}}')
    o = kube.wait_for("Invalid", lambda: (x := ft(kube, "llm")) and any(
        c["type"] == "Invalid" and c["status"] == "True" for c in x["status"].get("conditions", [])) and x)
    invalid = next(c for c in o["status"]["conditions"] if c["type"] == "Invalid")
    assert "spec.training.globalBatch" in invalid["message"] and "2 x 6 = 6" not in invalid["message"]
    assert o["status"]["phase"] == "Running"
    assert {p["metadata"]["name"] for p in running_workers(kube, "llm", 2, 0)()} == {
        p["metadata"]["name"] for p in pods}

    kube("patch", "forgetraining", "llm", "--type=merge", "-p", '{"spec":{"resources":{"gpusPerNode":4}}}')
    new = kube.wait_for("the new group", running_workers(kube, "llm", 2, 1), timeout=60)
    assert "--nproc-per-node=4" in new[0]["spec"]["containers"][0]["command"]
    o = kube.wait_for("Running", phase_is(kube, "llm", "Running"))
    assert not any(c["type"] == "Invalid" for c in o["status"]["conditions"])
    assert o["status"]["restarts"][-1]["reason"] == "ResourcesChanged"
    assert o["status"]["restarts"][-1]["step"] == 50
    assert o["status"]["restartCount"] == 1 and o["status"]["failureCount"] == 0


def test_node_lost_restarts_group_elsewhere(kube, operator, cluster):
    pool = kube.namespace[-6:]
    names = [f"lost-{pool}-{i}" for i in range(3)]
    nodes = []
    for n in names:
        node = cluster.gpu_node_manifest(n)
        node["metadata"]["labels"]["pool"] = pool
        nodes.append(node)
    kube.apply({"apiVersion": "v1", "kind": "List", "items": nodes})
    try:
        kube.apply(training("llm", resources={"numNodes": 2, "nodeSelector": {"pool": pool}}))
        pods = kube.wait_for("running", running_workers(kube, "llm", 2, 0), timeout=60)
        victim = pods[1]["spec"]["nodeName"]
        # the node stops reporting: kwok lets go of it and its Ready condition goes Unknown
        kube("annotate", "node", victim, "kwok.x-k8s.io/node-")
        kube("patch", "node", victim, "--subresource=status", "--type=strategic", "-p",
             '{"status":{"conditions":[{"type":"Ready","status":"Unknown","reason":"NodeStatusUnknown",'
             '"message":"Kubelet stopped posting node status.","lastHeartbeatTime":"2026-01-01T00:00:00Z",'
             '"lastTransitionTime":"2026-01-01T00:00:00Z"}]}}')
        kube("cordon", victim)
        new = kube.wait_for("group restarted on healthy nodes", running_workers(kube, "llm", 2, 1), timeout=90)
        assert victim not in {p["spec"]["nodeName"] for p in new}
        o = kube.wait_for("Running", phase_is(kube, "llm", "Running"))
        assert o["status"]["restarts"][0]["reason"] == "NodeLost"
        assert victim in o["status"]["restarts"][0]["message"]
    finally:
        kube("delete", "node", *names, "--wait=false", check=False)


def test_ttl_removes_workers_but_keeps_the_training(kube, operator):
    kube.apply(training("llm", resources={"numNodes": 1}, ttlSecondsAfterFinished=2))
    pods = kube.wait_for("running", running_workers(kube, "llm", 1, 0))
    exit_pod(kube, pods[0]["metadata"]["name"], 0)
    kube.wait_for("Succeeded", phase_is(kube, "llm", "Succeeded"))
    kube.wait_for("job removed after the TTL", lambda: not kube.get("jobs")["items"], timeout=30)
    assert ft(kube, "llm")["status"]["phase"] == "Succeeded"


def test_deleting_the_training_collects_every_child(kube, operator):
    kube.apply(training("llm", resources={"numNodes": 2}))
    kube.wait_for("running", running_workers(kube, "llm", 2, 0))
    kinds = "configmap,service,serviceaccount,role,rolebinding,job,pod"
    selector = "forge.dev/training=llm"
    assert len(kube.get(kinds, selector=selector)["items"]) >= 8
    kube("delete", "forgetraining", "llm", "--wait=false")
    kube.wait_for("children collected", lambda: not kube.get(kinds, selector=selector)["items"], timeout=90)


@pytest.mark.slow
def test_operator_killed_20_times_converges_without_duplicates(kube, operator):
    stop = threading.Event()
    kills = []

    def chaos():
        rng = random.Random(7)
        while not stop.is_set() and len(kills) < 20:
            time.sleep(rng.uniform(0.2, 1.2))
            operator.kill()
            kills.append(time.monotonic())
            operator.start()

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    try:
        kube.apply(training("llm", resources={"numNodes": 2}, failurePolicy={"maxRestarts": 3, "backoffSeconds": 0}))
        pods = kube.wait_for("running", running_workers(kube, "llm", 2, 0), timeout=120)
        report_progress(kube, pods[0]["metadata"]["name"], step=20, loss=3.3, checkpoint_step=20)
        kube.wait_for("checkpoint seen", lambda: ft(kube, "llm").get("status", {}).get("lastCheckpoint"), timeout=60)
        exit_pod(kube, pods[1]["metadata"]["name"], 1)
        new = kube.wait_for("restarted group", running_workers(kube, "llm", 2, 1), timeout=120)
        for p in new:
            exit_pod(kube, p["metadata"]["name"], 0)
        thread.join(timeout=60)
    finally:
        stop.set()
        thread.join()
    assert len(kills) == 20
    o = kube.wait_for("Succeeded", phase_is(kube, "llm", "Succeeded"), timeout=60)
    assert o["status"]["restartCount"] == 1 and o["status"]["restarts"][0]["reason"] == "PodFailed"
    assert [j["metadata"]["name"] for j in kube.get("jobs")["items"]] == ["llm-r1"]
    for kind in ("configmap", "service", "serviceaccount", "role", "rolebinding"):
        assert len(kube.get(kind, selector="forge.dev/training=llm")["items"]) == 1, kind
    reasons = [e["reason"] for e in kube.events("involvedObject.kind=ForgeTraining")]
    assert reasons.count("PodFailed") == 1, reasons


@pytest.mark.slow
def test_ten_trainings_in_ten_namespaces_do_not_cross_talk(cluster, crds, tmp_path):
    kubes = []
    suffix = uuid.uuid4().hex[:6]
    for i in range(10):
        ns = f"tenant-{i}-{suffix}"
        cluster.kubectl("create", "namespace", ns)
        kubes.append(Kube(cluster, ns))
    op = OperatorProcess(cluster.state.kubeconfig, [k.namespace for k in kubes], tmp_path / "op.log").start()
    try:
        for i, k in enumerate(kubes):
            k.wait_for("sa", lambda k=k: k("get", "sa", "default", check=False).returncode == 0)
            create_pvcs(k, "corpus", "ckpt", "models")
            k.apply(training("llm", resources={"numNodes": 1, "gpusPerNode": 2}))
        pods = [k.wait_for("running", running_workers(k, "llm", 1, 0), timeout=120)[0] for k in kubes]
        for i, (k, pod) in enumerate(zip(kubes, pods)):
            report_progress(k, pod["metadata"]["name"], step=i + 1, loss=float(i))
        for i, k in enumerate(kubes):
            o = k.wait_for("own progress", lambda k=k, i=i: (x := ft(k, "llm"))["status"].get("progress", {}).get(
                "step") == i + 1 and x, timeout=60)
            assert o["status"]["progress"]["loss"] == float(i)
            assert o["status"]["nodes"] == [pods[i]["spec"]["nodeName"]]
            owners = {c["metadata"]["ownerReferences"][0]["uid"]
                      for c in k.get("configmap,service,job", selector="forge.dev/training=llm")["items"]}
            assert owners == {o["metadata"]["uid"]}
    finally:
        op.stop()
        for k in kubes:
            cluster.kubectl("delete", "namespace", k.namespace, "--wait=false", check=False)


def test_forge_status_shows_progress_and_conditions(kube, operator):
    import os
    import subprocess
    import sys

    kube.apply(training("llm", resources={"numNodes": 1}))
    pods = kube.wait_for("running", running_workers(kube, "llm", 1, 0))
    report_progress(kube, pods[0]["metadata"]["name"], step=40, loss=2.5, checkpoint_step=40)
    kube.wait_for("progress", lambda: ft(kube, "llm")["status"].get("progress", {}).get("step") == 40)
    out = subprocess.run([sys.executable, "-m", "forge_operator", "status", "llm", "-n", kube.namespace],
                         env=os.environ | {"KUBECONFIG": kube.kubeconfig}, capture_output=True, text=True, check=True)
    header, row = out.stdout.splitlines()[:2]
    assert header.split()[:5] == ["NAMESPACE", "NAME", "PHASE", "%", "STEP"]
    assert row.split()[1:6] == ["llm", "Running", "40.0", "40", "2.500"]
    assert "Running=True AllRanksRunning" in out.stdout and "last checkpoint: step 40" in out.stdout
