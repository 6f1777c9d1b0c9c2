"""Failure handling: each failed pod's reason in the restart record and its event, a pod the kubelet refused
(UnexpectedAdmissionError) blamed on its node, and a node blamed twice kept out of the next attempts by
node affinity. Pure planner cases, then on the control plane with kwok, pod statuses set as the kubelet does."""

from __future__ import annotations

import json

import pytest

from forge_operator.training.children import avoiding
from forge_operator.training.observe import Observed
from forge_operator.training.planner import plan_training
from operator_support import NOW, READY, job, obj, pod, training
from test_lifecycle import ft, running_workers, worker_pods

REJECTED = {"phase": "Failed", "reason": "UnexpectedAdmissionError",
            "message": "Allocate failed due to no healthy devices present; cannot allocate unhealthy devices nvidia.com/gpu"}
KEEP_OFF = {"key": "kubernetes.io/hostname", "operator": "NotIn"}


def failed(name: str, index: int, node: str, code: int, reason: str = "Error") -> dict:
    p = pod(name, index, phase="Failed", node=node)
    p["status"]["containerStatuses"] = [{"state": {"terminated": {"exitCode": code, "reason": reason}}}]
    return p


def running_obj(**spec) -> dict:
    o = obj(**spec)
    o["status"] = {"phase": "Running"}
    return o


def test_every_failed_pod_is_recorded_with_its_reason():
    pods = [failed("p0", 0, "n0", 137, "OOMKilled"), pod("p1", 1, node="n1"),
            failed("p2", 2, "n2", 139), pod("p3", 3, node="n3", status={"phase": "Failed", **REJECTED})]
    plan = plan_training(running_obj(), Observed(now=NOW, jobs=[job("llm-r0")], pods=pods,
                                                 nodes={f"n{i}": READY for i in range(4)}))
    record = plan.status["restarts"][0]
    assert plan.deleted("Job") == ["llm-r0"]  # the whole group stops at once
    assert record["failedPods"] == [
        {"name": "p0", "rank": 0, "node": "n0", "reason": "OOMKilled", "exitCode": 137},
        {"name": "p2", "rank": 2, "node": "n2", "reason": "PodFailed", "exitCode": 139},
        {"name": "p3", "rank": 3, "node": "n3", "reason": "PodRejected"}]
    event = next(e for e in plan.events if "restarting all" in e.message)
    assert "failed pods: p0 (OOMKilled, exit code 137, node n0), p2 (PodFailed, exit code 139, node n2), " \
           "p3 (PodRejected, node n3)" in event.message


@pytest.mark.parametrize("the_pod, reason, node", [
    (pod("p0", 0, node="n0", status=REJECTED), "PodRejected", "n0"),
    (pod("p0", 0, node="n0", status={"phase": "Failed", "reason": "Evicted", "message": "disk pressure"}), "Evicted", "n0"),
    (failed("p0", 0, "n0", 139), "PodFailed", "n0"),   # a segfault the trainer did not report
    (failed("p0", 0, "n0", 1), "PodFailed", None),     # the program's own error: not the node's
    (failed("p0", 0, "n0", 137, "OOMKilled"), "OOMKilled", None),  # the program's memory
])
def test_the_node_is_blamed_only_for_what_the_node_does(the_pod, reason, node):
    plan = plan_training(running_obj(resources={"numNodes": 1}),
                         Observed(now=NOW, jobs=[job("llm-r0")], pods=[the_pod], nodes={"n0": READY}))
    record = plan.status["restarts"][0]
    assert record["reason"] == reason and record.get("node") == node
    if reason == "PodRejected":
        assert record["message"] == f"pod p0 was rejected by node n0: UnexpectedAdmissionError: {REJECTED['message']}"


def restarted_twice(nodes: list[str], **spec) -> dict:
    o = obj(**spec)
    o["status"] = {"phase": "Restarting", "restartCount": 2, "failureCount": 2, "restarts": [
        {"time": "2026-11-22T11:00:00Z", "reason": "PodRejected", "message": "m", "node": n} for n in nodes]}
    return o


def next_job(o: dict) -> dict:
    plan = plan_training(o, Observed(now=NOW))
    return next(c for c in plan.apply if c["kind"] == "Job")


def test_a_node_blamed_twice_is_kept_out_of_the_next_attempt():
    affinity = next_job(restarted_twice(["n1", "n1"]))["spec"]["template"]["spec"]["affinity"]
    assert affinity == {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{**KEEP_OFF, "values": ["n1"]}]}]}}}
    assert "affinity" not in next_job(restarted_twice(["n1", "n2"]))["spec"]["template"]["spec"]


def test_keeping_a_node_out_narrows_every_term_of_the_users_affinity():
    zone = {"key": "zone", "operator": "In", "values": ["a"]}
    users = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [zone]}, {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["x"]}]}]}},
        "podAffinity": {"x": 1}}
    out = avoiding(users, ("n1",))
    terms = out["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"] == [zone, {**KEEP_OFF, "values": ["n1"]}]
    assert terms[1]["matchExpressions"] == [{**KEEP_OFF, "values": ["n1"]}] and "matchFields" in terms[1]
    assert out["podAffinity"] == {"x": 1} and users["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchExpressions"] == [zone]  # the spec's own is not modified
    assert avoiding(users, ()) is users


def reject(kube, pod_name: str) -> None:
    """What the kubelet does to a pod it cannot admit (e.g. an unhealthy GPU): Failed, UnexpectedAdmissionError."""
    kube("patch", "pod", pod_name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": REJECTED}))


@pytest.mark.cluster
@pytest.mark.slow
def test_a_node_that_refuses_a_worker_twice_is_avoided_on_the_next_restart(kube, operator):
    kube.apply(training("llm", failurePolicy={"maxRestarts": 3, "backoffSeconds": 1}))
    bad = None
    for attempt in (0, 1):
        pods = kube.wait_for(f"attempt {attempt} running", running_workers(kube, "llm", 4, attempt))
        victim = next(p for p in pods if bad is None or p["spec"]["nodeName"] == bad)
        bad = victim["spec"]["nodeName"]
        reject(kube, victim["metadata"]["name"])
        kube.wait_for(f"restart {attempt + 1}", lambda: (ft(kube, "llm").get("status") or {}).get("restartCount") == attempt + 1)
    record = ft(kube, "llm")["status"]["restarts"][-1]
    assert record["reason"] == "PodRejected" and record["node"] == bad
    assert record["failedPods"][0]["reason"] == "PodRejected" and record["failedPods"][0]["node"] == bad
    assert any("PodRejected" == e["reason"] and bad in e["message"] for e in kube.events("involvedObject.kind=ForgeTraining"))
    # attempt 2: every worker kept off the bad node; 3 of the 4 nodes remain, so one rank waits unschedulable
    job2 = kube.wait_for("the Job of attempt 2", lambda: next(iter(kube.get("jobs", selector="forge.dev/attempt=2")["items"]), None))
    terms = job2["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{**KEEP_OFF, "values": [bad]}]}]
    def three_placed():
        pods = [p for p in worker_pods(kube, "llm", 2) if p["spec"].get("nodeName")]
        return pods if len(pods) == 3 else None
    placed = kube.wait_for("3 of attempt 2 placed", three_placed)
    assert bad not in {p["spec"]["nodeName"] for p in placed}
    unplaced = kube.wait_for("the fourth unschedulable", lambda: [
        p for p in worker_pods(kube, "llm", 2) if not p["spec"].get("nodeName")
        and any(c.get("reason") == "Unschedulable" for c in p["status"].get("conditions") or [])])
    assert len(unplaced) == 1
