"""The reconciler runtime called directly, outside kopf, as a requeue timer calls it."""

from __future__ import annotations

import pytest

from forge_operator.api.names import FIELD_MANAGER
from forge_operator.evaluation.reconciler import EvalReconciler
from forge_operator.k8s.clients import Clients
from forge_operator.k8s.objects import Key
from forge_operator.k8s.runtime import Runtime
from forge_operator.training.reconciler import TrainingReconciler
from operator_support import create_pvcs, training

pytestmark = pytest.mark.cluster


@pytest.fixture
def runtime(kube, crds):
    rt = Runtime(Clients(kube.kubeconfig), [TrainingReconciler(), EvalReconciler()], field_manager=FIELD_MANAGER)
    yield rt
    rt.close()


def llm(kube) -> Key:
    return Key("ForgeTraining", kube.namespace, "llm")


def test_a_reconcile_outside_any_kopf_handler_posts_its_events(kube, runtime):
    create_pvcs(kube, "corpus", "ckpt", "models")
    kube.apply(training("llm", resources={"numNodes": 2}))
    plan = runtime.reconcile(llm(kube))
    assert plan is not None and plan.status["phase"] == "Pending"
    assert kube.get("job", "llm-r0")["spec"]["parallelism"] == 2
    created = [e for e in kube.events("involvedObject.kind=ForgeTraining") if e["reason"] == "Created"]
    assert len(created) == 1 and "llm-r0" in created[0]["message"]
    assert created[0]["source"]["component"] == "forge-operator" and created[0]["type"] == "Normal"
    # kwok runs the pods; the next reconcile sees the group running, and one more changes nothing
    kube.wait_for("pods running", lambda: len([p for p in kube.get("pods")["items"]
                                               if p["status"].get("phase") == "Running"]) == 2)
    assert runtime.reconcile(llm(kube)).status["phase"] == "Running"
    status = kube.get("forgetraining", "llm")["status"]
    runtime.reconcile(llm(kube))
    assert kube.get("forgetraining", "llm")["status"] == status
    reasons = [e["reason"] for e in kube.events("involvedObject.kind=ForgeTraining")]
    assert sorted(reasons) == ["AllRanksRunning", "Created"]


def test_a_failed_reconcile_is_tried_again(kube, runtime, monkeypatch):
    calls = []

    def flaky(key: Key):
        calls.append(key)
        if len(calls) == 1:
            raise RuntimeError("API server unavailable")

    monkeypatch.setattr(runtime, "reconcile", flaky)
    runtime.resync_seconds = 0.1
    runtime.reconcile_or_retry(llm(kube))
    kube.wait_for("retried", lambda: len(calls) >= 2, timeout=10)
    assert set(calls) == {llm(kube)}


def test_a_refused_child_is_reported_until_a_child_of_its_kind_is_accepted(kube, runtime):
    create_pvcs(kube, "corpus", "ckpt", "models")
    bad_env = {"numNodes": 1, "env": [{"value": "no name"}]}
    kube.apply(training("llm", resources=bad_env, scheduling={"queueName": "team-a"}))

    def invalid():
        return next((c for c in kube.get("forgetraining", "llm")["status"].get("conditions", [])
                     if c["type"] == "Invalid"), None)

    runtime.reconcile(llm(kube))
    assert invalid()["reason"] == "ChildRejected" and "Job llm-r0" in invalid()["message"]
    # suspended in its queue: no Job is applied, so nothing says the refusal is over
    kube("patch", "forgetraining", "llm", "--type=merge", "-p", '{"spec":{"scheduling":{"suspend":true}}}')
    plan = runtime.reconcile(llm(kube))
    assert plan.status["phase"] == "Suspended" and "Job" not in [c["kind"] for c in plan.apply]
    assert invalid()["reason"] == "ChildRejected"
    refusals = [e for e in kube.events("involvedObject.kind=ForgeTraining") if e["reason"] == "ChildRejected"]
    assert len(refusals) == 1
    # fixed and resumed: the Job is accepted and the condition goes
    kube("patch", "forgetraining", "llm", "--type=merge", "-p",
         '{"spec":{"scheduling":{"suspend":false},"resources":{"env":[{"name":"NCCL_DEBUG","value":"INFO"}]}}}')
    runtime.reconcile(llm(kube))
    assert invalid() is None and kube.get("job", "llm-r0")["spec"]["suspend"] is True
