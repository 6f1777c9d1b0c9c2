"""The status stays bounded whatever the cluster says: hundreds of nodes over many restarts, messages of
megabytes (an eviction, a termination message, a Job's condition). A status over the CRD's limits or the
API server's size limit would be refused, and the training could never be reconciled again."""

from __future__ import annotations

import json

import pytest

from forge_operator.api.training import ForgeTrainingStatus
from forge_operator.k8s.objects import MESSAGE_LIMIT, event_body
from forge_operator.training.observe import Observed
from forge_operator.training.planner import plan_training
from forge_operator.training.status import MAX_NODE_CHARS, MAX_NODES, bounded_nodes
from operator_support import NOW, READY, job, obj, pod, training
from test_lifecycle import running_workers

STATUS_BOUND = 320 * 1024  # bytes of JSON: docs/operator.md, "Bounded status"
HUGE = "x" * 1_000_000


def node(i: int, attempt: int) -> str:
    return f"gpu-{attempt:03d}-{i:04d}-" + "n" * 230  # 253 characters, the longest a node name may be


def test_the_status_stays_under_its_bound_in_a_pathological_case():
    o = obj()
    earlier = [node(i, 0) for i in range(4000)]  # an older operator recorded them all
    restarts = [{"time": "2026-11-22T11:00:00Z", "reason": "PodFailed", "message": "m" * 4096, "exitCode": 1}] * 20
    o["status"] = {"phase": "Running", "restartCount": 0, "nodes": earlier, "restarts": restarts,
                   "lastCheckpoint": {"step": 10, "path": "ckpt/step-10"}}
    pods = [pod(f"p{i}", i, node=node(i, 1)) for i in range(4)]
    pods[0]["status"] = {"phase": "Failed", "reason": "Evicted", "message": HUGE}
    pods[1]["status"] = {"phase": "Failed", "containerStatuses": [
        {"state": {"terminated": {"exitCode": 1, "message": HUGE + "\n" + HUGE}}}]}
    pods[0]["metadata"]["annotations"]["forge.dev/progress"] = json.dumps(  # rank 0, before it was evicted
        {"step": 12, "last_checkpoint": {"step": 11, "path": "c" * 200_000}})
    failed = job("llm-r0", conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                        "message": HUGE}])
    plan = plan_training(o, Observed(now=NOW, jobs=[failed], pods=pods,
                                     nodes={node(i, 1): READY for i in range(4)}))
    status = plan.status

    assert plan.deleted("Job") == ["llm-r0"] and status["restartCount"] == 1  # the restart happened
    assert len(json.dumps(status)) < STATUS_BOUND
    ForgeTrainingStatus.model_validate(status)  # within every limit of the CRD's schema
    assert {node(i, 1) for i in range(4)} <= set(status["nodes"])  # the current attempt's nodes are kept
    assert len(status["nodes"]) <= MAX_NODES and sum(map(len, status["nodes"])) <= MAX_NODE_CHARS
    assert len(status["restarts"]) == 20 and status["restarts"][-1]["message"].endswith(" ... (truncated)")
    assert all(len(c["message"]) <= MESSAGE_LIMIT for c in status["conditions"])
    assert all(len(r["message"]) <= MESSAGE_LIMIT for r in status["restarts"][-1:])
    assert status["lastCheckpoint"]["step"] == 11 and len(status["lastCheckpoint"]["path"]) <= 4096
    for e in plan.events:
        assert len(event_body(o, e, "forge-operator", "test", NOW)["message"]) <= MESSAGE_LIMIT


def test_status_nodes_keep_the_current_attempts_first_and_are_stable():
    earlier = {f"old-{i:05d}" for i in range(5000)}
    current = {f"new-{i:04d}" for i in range(300)}
    kept = bounded_nodes(current, earlier)
    assert len(kept) == MAX_NODES and current <= set(kept)
    assert bounded_nodes(current, set(kept)) == kept  # the next reconcile writes nothing new
    assert bounded_nodes(set(), {"b", "a"}) == ["a", "b"]


@pytest.mark.cluster
def test_a_huge_eviction_message_does_not_wedge_the_training(kube, operator, tmp_path):
    """On the real API server: a worker evicted with a message of 200 kB (a CRD allows a condition message
    of 32768 characters and a restart record's of 4096; a status over them is refused). The training
    restarts and records the eviction, cut to the documented limit."""
    kube.apply(training("llm"))
    pods = kube.wait_for("4 running ranks", running_workers(kube, "llm", 4, 0))
    patch = tmp_path / "evicted.json"
    patch.write_text(json.dumps({"status": {"phase": "Failed", "reason": "Evicted",
                                            "message": "The node was low on resource: memory. " + "x" * 200_000}}))
    kube("patch", "pod", pods[1]["metadata"]["name"], "--subresource=status", "--type=merge",
         "--patch-file", str(patch))
    status = kube.wait_for("the restart recorded", lambda: (s := kube.get("forgetraining", "llm").get("status", {}))
                           and s.get("restartCount") == 1 and s)
    record = status["restarts"][-1]
    assert record["reason"] == "Evicted" and len(record["message"]) == MESSAGE_LIMIT
    assert record["message"].startswith(f"pod {pods[1]['metadata']['name']} on node ")
    assert record["message"].endswith(" ... (truncated)")
    assert all(len(c["message"]) <= MESSAGE_LIMIT for c in status["conditions"])
    kube.wait_for("the next attempt's ranks", running_workers(kube, "llm", 4, 1))
