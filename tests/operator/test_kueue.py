"""The real Kueue controller (built from sigs.k8s.io/kueue, see tests/controlplane/kueue.py) admits, holds
and preempts ForgeTrainings on a control plane of its own, with a ResourceFlavor, a ClusterQueue with a
GPU quota of 32 (four 8-GPU nodes) and a LocalQueue.

- Before Kueue is installed a queued training says KueueNotInstalled; once its CRDs are served,
  LocalQueueNotFound; once the LocalQueue exists, Kueue admits the 4-node training as one workload.
- A second 4-node training waits whole (no pod of it is created) while the first holds the quota.
- A higher-priority training preempts a lower one: Kueue suspends the lower one's Job (its workers stop,
  writing their checkpoint in their grace period), the operator leaves `suspend` to Kueue, and the lower
  one is admitted again when the quota frees.
- A user's suspension of an admitted training deletes its Job (and so its workload); resuming queues a
  new Job, which Kueue admits.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import pytest

from devcluster import DevCluster
from kubetest import Kube
from kueue import Kueue
from operator_support import ROOT, OperatorProcess, create_pvcs, training
from test_lifecycle import phase_is, running_workers, worker_pods

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

QUOTA = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": "gpus"}, "spec": {
    "namespaceSelector": {},
    "preemption": {"withinClusterQueue": "LowerPriority"},
    "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": [{
        "name": "h100", "resources": [{"name": "cpu", "nominalQuota": "1000"},
                                      {"name": "memory", "nominalQuota": "10Ti"},
                                      {"name": "nvidia.com/gpu", "nominalQuota": 32}]}]}]}}
FLAVOR = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "h100"}}


@pytest.fixture(scope="module")
def kueue_cluster(tmp_path_factory):
    """A control plane of its own (Kueue's CRDs stay out of the shared one), Kueue not started yet."""
    c = DevCluster(tmp_path_factory.mktemp("kueue-controlplane"), gpu_nodes=4)
    c.up()
    kueue = Kueue(c, c.dir / "kueue")
    try:
        c.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        c.wait_established("crd/forgetrainings.forge.dev")
        yield c, kueue
    finally:
        kueue.stop()
        sys.stdout.write(f"\n--- kueue log ---\n{kueue.log_tail(60)}\n")
        c.down()


@pytest.fixture(scope="module")
def queue(kueue_cluster):
    """A namespace with claims, the operator watching it, and its LocalQueue's name (not created yet)."""
    c, kueue = kueue_cluster
    ns = f"kueue-{uuid.uuid4().hex[:6]}"
    c.kubectl("create", "namespace", ns)
    kube = Kube(c, ns)
    kube.wait_for("default ServiceAccount", lambda: kube("get", "sa", "default", check=False).returncode == 0)
    create_pvcs(kube, "corpus", "ckpt", "models")
    op = OperatorProcess(kube.kubeconfig, [ns], c.dir / "operator.log").start()
    try:
        yield kube, kueue
    finally:
        op.stop()
        sys.stdout.write(f"\n--- operator log ---\n{op.log()[-4000:]}\n")


def pods_ready(kube, name: str) -> dict:
    conditions = kube.get("forgetraining", name).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "PodsReady"), {})


def workloads(kube) -> list[dict]:
    return kube.get("workloads.kueue.x-k8s.io")["items"]


def admitted(kube, job: str) -> bool:
    return any(w["metadata"]["ownerReferences"][0]["name"] == job and any(
        c["type"] == "Admitted" and c["status"] == "True" for c in w.get("status", {}).get("conditions", []))
        for w in workloads(kube))


def test_a_queued_training_says_why_until_kueue_admits_it_as_one_workload(queue):
    kube, kueue = queue
    kube.apply(training("first", scheduling={"queueName": "team-a"}))
    c = kube.wait_for("KueueNotInstalled", lambda: (c := pods_ready(kube, "first")).get("reason") ==
                      "KueueNotInstalled" and c)
    assert "Kueue is not installed" in c["message"]

    kueue.start()  # its CRDs served, its controller running
    c = kube.wait_for("LocalQueueNotFound", lambda: (c := pods_ready(kube, "first")).get("reason") ==
                      "LocalQueueNotFound" and c, timeout=60)
    assert f"LocalQueue team-a does not exist in namespace {kube.namespace}" in c["message"]
    assert "LocalQueueNotFound" in kube("get", "forgetraining", "first").stdout.splitlines()[1]

    kube.cluster.kubectl("apply", "-f", "-", input=_json([FLAVOR, QUOTA]))
    kube.apply({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": "team-a"},
                "spec": {"clusterQueue": "gpus"}})
    kube.wait_for("admitted", lambda: admitted(kube, "first-r0"), timeout=60)
    kube.wait_for("4 running ranks", running_workers(kube, "first", 4, 0), timeout=90)
    o = kube.wait_for("Running", phase_is(kube, "first", "Running"), timeout=60)
    assert pods_ready(kube, "first")["reason"] == "AllRanksRunning"
    [w] = [w for w in workloads(kube) if w["metadata"]["ownerReferences"][0]["name"] == "first-r0"]
    assert [(p["count"]) for p in w["spec"]["podSets"]] == [4]  # one workload for the whole group
    assert not o["status"].get("restartCount")

    # a second 4-node training: no quota left, it waits whole (not one of its pods exists)
    kube.apply(training("second", scheduling={"queueName": "team-a"}))
    kube.wait_for("second queued", lambda: (o := kube.get("forgetraining", "second")).get("status", {}).get(
        "phase") == "Queued" and pods_ready(kube, "second").get("reason") != "LocalQueueNotFound" and o)
    kube.wait_for("second's workload", lambda: any(
        w["metadata"]["ownerReferences"][0]["name"] == "second-r0" for w in workloads(kube)), timeout=30)
    time.sleep(3)
    assert not admitted(kube, "second-r0") and not worker_pods(kube, "second")
    assert kube.get("job", "second-r0")["spec"]["suspend"] is True
    queued = next(c for c in kube.get("forgetraining", "second")["status"]["conditions"] if c["type"] == "Queued")
    assert queued["reason"] == "WaitingForAdmission"

    # both go; the quota frees (the next test shows a workload admitted again when it does)
    kube("delete", "forgetraining", "first", "second", "--wait=false")
    kube.wait_for("quota free", lambda: not [p for p in kube.get("pods")["items"]
                                             if p["metadata"]["labels"].get("forge.dev/training")], timeout=120)


def test_a_higher_priority_training_preempts_a_lower_one_which_requeues(queue):
    kube, _ = queue
    kube.cluster.kubectl("apply", "-f", "-", input=_json([
        {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}, "value": value}
        for name, value in (("forge-low", 100), ("forge-high", 1000))]))
    kube.apply(training("low", scheduling={"queueName": "team-a"}, resources={"priorityClassName": "forge-low"}))
    kube.wait_for("low running", running_workers(kube, "low", 4, 0), timeout=120)
    kube.wait_for("low Running", phase_is(kube, "low", "Running"), timeout=60)

    kube.apply(training("high", scheduling={"queueName": "team-a"}, resources={"priorityClassName": "forge-high"}))
    # Kueue evicts the lower one: it suspends its Job; the workers stop (with their grace period to checkpoint)
    kube.wait_for("low's Job suspended by Kueue", lambda: kube.get("job", "low-r0")["spec"]["suspend"] is True,
                  timeout=90)
    kube.wait_for("high running", running_workers(kube, "high", 4, 0), timeout=120)
    kube.wait_for("low's workers gone", lambda: not [p for p in worker_pods(kube, "low")
                                                     if p["status"].get("phase") == "Running"], timeout=120)
    o = kube.wait_for("low Queued", phase_is(kube, "low", "Queued"), timeout=60)
    assert not o["status"].get("failureCount"), "a preemption is not a failure"
    evicted = next(w for w in workloads(kube) if w["metadata"]["ownerReferences"][0]["name"] == "low-r0")
    assert any(c["type"] == "Evicted" and c["status"] == "True" and c["reason"] == "Preempted"
               for c in evicted["status"]["conditions"]), evicted["status"]
    for _ in range(4):  # several resyncs: the operator never unsuspends what Kueue suspended
        time.sleep(1)
        assert kube.get("job", "low-r0")["spec"]["suspend"] is True

    # the higher one leaves: Kueue admits the lower one again, which resumes (same attempt, from its checkpoint)
    kube("delete", "forgetraining", "high", "--wait=false")
    kube.wait_for("low running again", running_workers(kube, "low", 4, 0), timeout=120)
    o = kube.wait_for("low Running again", phase_is(kube, "low", "Running"), timeout=60)
    assert not o["status"].get("failureCount")

    # the user suspends the admitted training: its Job goes (Kueue would unsuspend an admitted Job), and
    # with it the workload and its hold on the quota; resuming queues a new Job that Kueue admits
    uid = kube.get("job", "low-r0")["metadata"]["uid"]
    kube("patch", "forgetraining", "low", "--type=merge", "-p", '{"spec":{"scheduling":{"suspend":true}}}')
    kube.wait_for("Suspended", phase_is(kube, "low", "Suspended"), timeout=60)
    kube.wait_for("Job and workload gone", lambda: not kube.get("jobs")["items"] and not workloads(kube),
                  timeout=90)
    kube("patch", "forgetraining", "low", "--type=merge", "-p", '{"spec":{"scheduling":{"suspend":false}}}')
    kube.wait_for("a new Job admitted", lambda: (j := next(iter(kube.get("jobs")["items"]), None)) and
                  j["metadata"]["uid"] != uid and admitted(kube, "low-r0"), timeout=90)
    kube.wait_for("low running after the resume", running_workers(kube, "low", 4, 0), timeout=120)
    o = kube.wait_for("Running", phase_is(kube, "low", "Running"), timeout=60)
    assert not o["status"].get("restartCount"), "a suspension is not a restart"


def _json(items: list[dict]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
