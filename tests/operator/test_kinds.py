"""A ForgeTraining and a ForgeEval of the same name, in the same namespace, on the real control
plane: each kind is reconciled under its own key, so each gets its own status, and deleting or
changing one touches neither the other's status nor its timers."""

from __future__ import annotations

import pytest

from forge_operator.api.names import FIELD_MANAGER
from forge_operator.evaluation.reconciler import EvalReconciler
from forge_operator.k8s.clients import Clients
from forge_operator.k8s.objects import Key
from forge_operator.k8s.runtime import Runtime
from forge_operator.training.reconciler import TrainingReconciler
from operator_support import create_pvcs, forge_eval, training
from test_lifecycle import ft, phase_is, report_progress, running_workers

pytestmark = pytest.mark.cluster


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def test_same_name_different_kinds_keep_their_own_keys_timers_and_status(kube, crds):
    create_pvcs(kube, "corpus", "ckpt", "models")
    kube.apply(training("llm", resources={"numNodes": 1}))
    kube.apply(forge_eval("llm"))
    rt = Runtime(Clients(kube.kubeconfig), [TrainingReconciler(), EvalReconciler()], field_manager=FIELD_MANAGER,
                 resync_seconds=3600)
    t, e = Key("ForgeTraining", kube.namespace, "llm"), Key("ForgeEval", kube.namespace, "llm")
    try:
        assert rt.reconcile(t).status["phase"] == "Pending"
        assert rt.reconcile(e).status["phase"] == "Pending"
        trained, evaluated = kube.get("forgetraining", "llm"), kube.get("forgeeval", "llm")
        assert condition(evaluated, "Running")["reason"] == "WaitingForModel"  # its training has not finished
        assert condition(trained, "GatesPassed") is None
        rt.requeue(e, 3600)
        assert rt.pending() == sorted([t, e])

        # changing the eval re-plans the eval only
        kube("patch", "forgeeval", "llm", "--type=merge", "-p", '{"spec":{"batchSize":16}}')
        assert rt.reconcile(e).status["observedGeneration"] == 2
        assert kube.get("forgetraining", "llm")["metadata"]["resourceVersion"] == trained["metadata"]["resourceVersion"]

        # deleting the eval forgets the eval's key only: the training's timer and status stay
        kube("delete", "forgeeval", "llm")
        rt.on_event(e, deleted=True)
        assert rt.reconcile(e) is None and rt.pending() == [t]
        assert kube.get("forgetraining", "llm")["status"] == trained["status"]

        # and the other way round
        kube.apply(forge_eval("llm"))
        rt.reconcile(e)
        rt.requeue(e, 3600)
        evaluated = kube.get("forgeeval", "llm")
        kube("delete", "forgetraining", "llm")
        rt.on_event(t, deleted=True)
        assert rt.pending() == [e]
        assert kube.get("forgeeval", "llm")["status"] == evaluated["status"]
    finally:
        rt.close()


def test_the_operator_reconciles_both_kinds_of_one_name_independently(kube, operator):
    kube.apply(training("llm", resources={"numNodes": 1}))
    kube.apply(forge_eval("llm"))
    pods = kube.wait_for("training running", running_workers(kube, "llm", 1, 0))
    kube.wait_for("Running", phase_is(kube, "llm", "Running"))
    evaluated = kube.wait_for("eval reconciled", lambda: condition(o := kube.get("forgeeval", "llm"), "Running")
                              and o)
    assert evaluated["status"]["phase"] == "Pending" and evaluated["status"]["observedGeneration"] == 1
    waiting = [e for e in kube.events("involvedObject.kind=ForgeEval") if e["reason"] == "WaitingForModel"]
    assert waiting and waiting[0]["type"] == "Normal" and "ForgeTraining llm is" in waiting[0]["message"]

    # the eval changes: only the eval is re-planned
    kube("patch", "forgeeval", "llm", "--type=merge", "-p", '{"spec":{"batchSize":16}}')
    kube.wait_for("eval generation 2", lambda: kube.get("forgeeval", "llm")["status"]["observedGeneration"] == 2)
    assert ft(kube, "llm")["status"]["observedGeneration"] == 1 and not ft(kube, "llm")["status"].get("restartCount")

    # the eval goes: the training goes on and is still reconciled
    kube("delete", "forgeeval", "llm")
    report_progress(kube, pods[0]["metadata"]["name"], step=20, loss=3.0)
    kube.wait_for("training progress", lambda: ft(kube, "llm")["status"].get("progress", {}).get("step") == 20)

    # the training goes: an eval of the same name is still reconciled
    kube.apply(forge_eval("llm"))
    kube.wait_for("new eval reconciled", lambda: condition(kube.get("forgeeval", "llm"), "Running"))
    kube("delete", "forgetraining", "llm")
    kube("patch", "forgeeval", "llm", "--type=merge", "-p", '{"spec":{"batchSize":32}}')
    kube.wait_for("eval generation 2 after the training went",
                  lambda: kube.get("forgeeval", "llm")["status"]["observedGeneration"] == 2)
