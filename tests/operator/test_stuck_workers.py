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
