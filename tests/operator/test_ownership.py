"""Apply only to objects we own, on the real API server: an object that holds the name of a child and is
not ours (no owner reference to the training, or not our managed-by label) is never modified; the
training says which one, starts no workers, and goes on once it is gone."""

from __future__ import annotations

import pytest

from operator_support import training
from test_lifecycle import running_workers

pytestmark = pytest.mark.cluster


def invalid(kube, name: str) -> dict | None:
    conditions = kube.get("forgetraining", name).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "Invalid" and c["status"] == "True"), None)


def jobs(kube, name: str) -> list[dict]:
    return kube.get("jobs", selector=f"forge.dev/training={name}")["items"]


@pytest.mark.parametrize("kind, name, manifest", [
    # applied with the workers' Job, when an attempt starts
    ("ConfigMap", "llm-config", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "llm-config"},
                                 "data": {"mine": "yes"}}),
    # applied at every reconcile; labelled like ours, but owned by nobody
    ("ServiceAccount", "forge-trainer-llm",
     {"apiVersion": "v1", "kind": "ServiceAccount",
      "metadata": {"name": "forge-trainer-llm", "labels": {"app.kubernetes.io/managed-by": "forge-operator"}}}),
])
def test_an_object_that_is_not_ours_is_never_taken_over(kube, operator, kind, name, manifest):
    kube.apply(manifest)
    before = kube.get(kind, name)
    kube.apply(training("llm"))
    cond = kube.wait_for("the ChildConflict condition", lambda: (c := invalid(kube, "llm")) and
                         c["reason"] == "ChildConflict" and c)
    assert cond["message"].startswith(f"{kind} {name} exists and is not this training's (no owner reference "
                                      f"to ForgeTraining llm")
    assert kube.wait_for("a ChildConflict event", lambda: kube.events(
        "involvedObject.kind=ForgeTraining,reason=ChildConflict"))[0]["type"] == "Warning"
    after = kube.get(kind, name)
    assert after["metadata"] == before["metadata"]  # no owner reference, label, field manager or write added
    assert {k: v for k, v in after.items() if k != "metadata"} == {k: v for k, v in before.items()
                                                                    if k != "metadata"}
    assert not jobs(kube, "llm")  # the training does not start

    kube("delete", kind, name)  # the user's object goes: the training goes on
    kube.wait_for("4 running ranks", running_workers(kube, "llm", 4, 0))
    kube.wait_for("the condition cleared", lambda: invalid(kube, "llm") is None)
    ours = kube.get(kind, name)["metadata"]
    assert [r["name"] for r in ours["ownerReferences"]] == ["llm"]
