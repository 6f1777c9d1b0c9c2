"""Workers held up, on the real control plane: a training whose checkpoint claim does not exist waits in
Pending with PodsReady False, reason PVCNotFound, quoting the real scheduler; creating the claim lets the
scheduler place the workers and clears it. (Image pulls are never tried on kwok's nodes: that case is
tested in test_training_readiness.py with a pod status shaped like the kubelet's.)"""

from __future__ import annotations

import pytest

from operator_support import create_pvcs, training
from test_lifecycle import phase_is, running_workers

pytestmark = pytest.mark.cluster


def pods_ready(kube, name: str) -> dict | None:
    conditions = kube.get("forgetraining", name).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "PodsReady"), None)


def test_a_missing_claim_holds_the_workers_until_it_is_created(kube, operator):
    kube.apply(training("llm", checkpoint={"location": {"pvc": {"claimName": "later", "path": "llm"}}}))
    cond = kube.wait_for("PodsReady False with reason PVCNotFound", lambda: (c := pods_ready(kube, "llm")) and
                         c["reason"] == "PVCNotFound" and c)
    assert cond["status"] == "False"
    assert cond["message"].startswith("PersistentVolumeClaim later does not exist: the workers mount it")
    said = next(c["message"] for p in kube.get("pods", selector="forge.dev/training=llm")["items"]
                for c in p["status"].get("conditions", []) if c["type"] == "PodScheduled")
    assert 'persistentvolumeclaim "later" not found' in said and cond["message"].endswith(said)  # the scheduler's words
    assert kube.get("forgetraining", "llm")["status"]["phase"] == "Pending"
    told = kube.wait_for("a PVCNotFound event", lambda: kube.events(
        "involvedObject.kind=ForgeTraining,reason=PVCNotFound"))
    assert told[0]["type"] == "Warning"
    printed = kube("get", "forgetraining", "llm").stdout
    assert "PVCNotFound" in printed.splitlines()[1], printed  # kubectl get shows why

    create_pvcs(kube, "later")
    kube.wait_for("4 running ranks", running_workers(kube, "llm", 4, 0))
    kube.wait_for("Running", phase_is(kube, "llm", "Running"))
    cond = kube.wait_for("PodsReady True", lambda: (c := pods_ready(kube, "llm")) and c["status"] == "True" and c)
    assert cond["reason"] == "AllRanksRunning"


def test_an_unbound_claim_is_named_until_a_volume_binds_it(kube, operator):
    """The scheduler only says "unbound immediate PersistentVolumeClaims"; the condition names the claim."""
    kube.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "unbound"},
                "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "",
                         "resources": {"requests": {"storage": "100Gi"}}}})
    kube.apply(training("llm", checkpoint={"location": {"pvc": {"claimName": "unbound", "path": "llm"}}}))
    cond = kube.wait_for("PodsReady False with reason PVCNotBound", lambda: (c := pods_ready(kube, "llm")) and
                         c["reason"] == "PVCNotBound" and c)
    assert cond["status"] == "False"
    assert cond["message"].startswith("PersistentVolumeClaim unbound is not bound to a volume (phase Pending): "
                                      "the workers mount it")
    said = next(c["message"] for p in kube.get("pods", selector="forge.dev/training=llm")["items"]
                for c in p["status"].get("conditions", []) if c["type"] == "PodScheduled")
    assert "unbound immediate PersistentVolumeClaims" in said and cond["message"].endswith(said)
    printed = kube("get", "forgetraining", "llm").stdout
    assert "PVCNotBound" in printed.splitlines()[1], printed  # kubectl get shows why
    assert kube.wait_for("a PVCNotBound event", lambda: kube.events(
        "involvedObject.kind=ForgeTraining,reason=PVCNotBound"))[0]["type"] == "Warning"

    # a volume for it: the PV controller binds the claim, the scheduler places the workers, the cause goes
    pv = f"{kube.namespace}-unbound"
    kube.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                         "hostPath": {"path": f"/tmp/forge-test-pv/{pv}"},
                         "claimRef": {"namespace": kube.namespace, "name": "unbound"}}})
    kube.wait_for("4 running ranks", running_workers(kube, "llm", 4, 0), timeout=120)
    cond = kube.wait_for("PodsReady True", lambda: (c := pods_ready(kube, "llm")) and c["status"] == "True" and c)
    assert cond["reason"] == "AllRanksRunning"


def test_a_queue_name_without_kueue_says_so(kube, operator):
    """This control plane has no Kueue CRDs (the Kueue tests run their own): the training would wait in
    Queued for ever, and says why, in the condition and in kubectl get."""
    kube.apply(training("llm", scheduling={"queueName": "team-a"}))
    cond = kube.wait_for("PodsReady KueueNotInstalled", lambda: (c := pods_ready(kube, "llm")) and
                         c["reason"] == "KueueNotInstalled" and c)
    assert cond["status"] == "False" and "Kueue is not installed" in cond["message"]
    stored = kube.get("forgetraining", "llm")["status"]
    queued = next(c for c in stored["conditions"] if c["type"] == "Queued")
    assert stored["phase"] == "Queued" and (queued["reason"], queued["message"]) == ("KueueNotInstalled",
                                                                                     cond["message"])
    assert "KueueNotInstalled" in kube("get", "forgetraining", "llm").stdout.splitlines()[1]
    job = kube.get("jobs", selector="forge.dev/training=llm")["items"][0]
    assert job["spec"]["suspend"] is True  # created for Kueue, which is not there to admit it
