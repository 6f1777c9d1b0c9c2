"""spec.residency: required node affinity on the workers (merged with the user's), recorded in the trainer's
configuration, and a clear PodsReady reason when no node in the allowed regions/zones can run a worker;
pure, and on the control plane with kwok nodes labelled with regions and zones."""

from __future__ import annotations

import pytest

from forge_operator.api import ForgeTraining
from forge_operator.k8s import conditions as C
from forge_operator.k8s.placement import quantity, tolerates, why_not_on
from forge_operator.training.children import WorkerState, desired_children
from forge_operator.training.observe import Observed
from forge_operator.training.planner import plan_training
from forge_operator.training.translate import trainer_config
from operator_support import NOW, job, obj, pod, training
from test_lifecycle import phase_is, running_workers

REGION, ZONE = "topology.kubernetes.io/region", "topology.kubernetes.io/zone"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
NO_MATCH = ("0/4 nodes are available: 4 node(s) didn't match Pod's node affinity/selector. preemption: 0/4 nodes "
            "are available: 4 Preemption is not helpful for scheduling.")


def worker_pod_spec(**spec) -> dict:
    ft = ForgeTraining.model_validate(obj(**spec))
    return next(c for c in desired_children(ft, "x: 1", WorkerState(avoid_nodes=("bad",)))
                if c["kind"] == "Job")["spec"]["template"]["spec"]


def node(name: str, region: str | None = None, zone: str | None = None, gpus: int = 8, **spec) -> dict:
    labels = {"kubernetes.io/hostname": name} | ({REGION: region} if region else {}) | ({ZONE: zone} if zone else {})
    return {"metadata": {"name": name, "labels": labels}, "spec": {"taints": [GPU_TAINT], **spec},
            "status": {"allocatable": {"cpu": "96", "memory": "1Ti", "nvidia.com/gpu": str(gpus)}}}


def test_residency_is_required_on_every_term_of_the_users_affinity():
    users = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]},
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}]}]}}}
    spec = worker_pod_spec(resources={"affinity": users},
                           residency={"regions": ["eu-west-1", "eu-central-1"], "zones": ["eu-west-1a"]})
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    for pool, term in zip("ab", terms):
        assert term["matchExpressions"] == [
            {"key": "pool", "operator": "In", "values": [pool]},
            {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["bad"]},
            {"key": REGION, "operator": "In", "values": ["eu-west-1", "eu-central-1"]},
            {"key": ZONE, "operator": "In", "values": ["eu-west-1a"]}]
    alone = worker_pod_spec(residency={"zones": ["fr-par-2"]})["affinity"]["nodeAffinity"]
    assert alone["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [{"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["bad"]},
        {"key": ZONE, "operator": "In", "values": ["fr-par-2"]}]}]


def test_residency_reaches_the_trainer_config():
    ft = ForgeTraining.model_validate(obj(residency={"regions": ["eu-west-1"]}))
    assert trainer_config(ft).residency.model_dump() == {"regions": ["eu-west-1"], "zones": []}
    assert trainer_config(ForgeTraining.model_validate(obj())).residency is None


def test_a_residency_edit_is_a_new_attempt():
    from forge_operator.training.children import spec_hash
    before = ForgeTraining.model_validate(obj())
    after = ForgeTraining.model_validate(obj(residency={"regions": ["eu-west-1"]}))
    assert spec_hash(before) != spec_hash(after)


@pytest.mark.parametrize("tolerations, taint, expected", [
    ([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}], GPU_TAINT, True),
    ([{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}], GPU_TAINT, True),
    ([{"key": "nvidia.com/gpu", "operator": "Equal", "value": "absent"}], GPU_TAINT, False),
    ([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}], GPU_TAINT, False),
    ([{"operator": "Exists"}], GPU_TAINT, True),
    ([], GPU_TAINT, False),
])
def test_tolerations(tolerations, taint, expected):
    assert tolerates(tolerations, taint) is expected


def test_why_a_node_can_never_run_a_worker():
    spec = worker_pod_spec(resources={"cpu": "500m", "memory": "64Gi", "nodeSelector": {"pool": "a"}})
    assert quantity("500m") * 2 == 1 and quantity("64Gi") == 64 * 2**30 and quantity("1e3") == 1000
    ok = node("n", gpus=8)
    ok["metadata"]["labels"]["pool"] = "a"
    assert why_not_on(spec, ok) is None
    assert why_not_on(spec, node("n")) == "no nodeSelector label pool=a"
    small = node("n", gpus=4)
    small["metadata"]["labels"]["pool"] = "a"
    assert why_not_on(spec, small) == "nvidia.com/gpu: 8 requested, 4 allocatable"
    assert why_not_on(spec, {**ok, "spec": {**ok["spec"], "unschedulable": True}}) == "cordoned"
    tainted = {**ok, "spec": {"taints": [{"key": "dedicated", "value": "infer", "effect": "NoExecute"}]}}
    assert why_not_on(spec, tainted) == "taint dedicated=infer:NoExecute not tolerated"


def pending_plan(residency: dict, nodes: list[dict]):
    o = obj(residency=residency)
    o["status"] = {"phase": "Pending"}
    spec = worker_pod_spec(residency=residency)
    pods = [pod(f"llm-r0-{i}-x", i, phase="Pending", node="", spec={**spec, "nodeName": None}, status={
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": NO_MATCH}]})
        for i in range(4)]
    return plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=pods, all_nodes=nodes))


def test_no_node_in_the_residency_is_said_as_such():
    plan = pending_plan({"regions": ["eu-west-1"], "zones": ["eu-west-1a"]},
                        [node("us-1", "us-east-1", "us-east-1a"), node("us-2", "us-east-1", "us-east-1b")])
    c = C.find(plan.status["conditions"], "PodsReady")
    assert (c["status"], c["reason"]) == ("False", "ResidencyUnsatisfiable")
    assert c["message"].startswith("spec.residency: no node is in regions eu-west-1 and zones eu-west-1a; 2 node(s) "
                                   "outside could, but the residency keeps the workers off them. 4 of 4 worker pods")
    assert NO_MATCH in c["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "ResidencyUnsatisfiable")]


def test_nodes_in_the_residency_that_cannot_run_a_worker_are_named():
    plan = pending_plan({"regions": ["eu-west-1"]}, [node("eu-1", "eu-west-1", gpus=2), node("us-1", "us-east-1")])
    c = C.find(plan.status["conditions"], "PodsReady")
    assert c["reason"] == "ResidencyUnsatisfiable"
    assert ("none of the 1 nodes in regions eu-west-1 can run a worker (eu-1: nvidia.com/gpu: 8 requested, "
            "2 allocatable); 1 node(s) outside could") in c["message"]


def test_a_full_node_in_the_residency_is_only_waiting():
    plan = pending_plan({"regions": ["eu-west-1"]}, [node("eu-1", "eu-west-1"), node("us-1", "us-east-1")])
    assert C.find(plan.status["conditions"], "PodsReady")["reason"] == "Unschedulable"


@pytest.mark.cluster
def test_residency_on_the_control_plane(kube, operator, cluster):
    """No node in the region: ResidencyUnsatisfiable (the shared GPU nodes carry no region). A node labelled
    with the region joins: the workers run there and only there."""
    suffix = kube.namespace[-6:]
    region = f"eu-{suffix}"
    kube.apply(training("llm", resources={"numNodes": 2}, residency={"regions": [region]}))

    def stuck():
        o = kube.get("forgetraining", "llm")
        c = C.find((o.get("status") or {}).get("conditions"), "PodsReady") or {}
        return c if c.get("reason") == "ResidencyUnsatisfiable" else None

    c = kube.wait_for("ResidencyUnsatisfiable", stuck, timeout=60)
    assert f"no node is in regions {region}" in c["message"] and "node affinity" in c["message"]
    names = [f"res-{suffix}-{i}" for i in range(2)]
    nodes = []
    for i, n in enumerate(names):
        manifest = cluster.gpu_node_manifest(n)
        manifest["metadata"]["labels"] |= {REGION: region, ZONE: f"{region}{'ab'[i]}"}
        nodes.append(manifest)
    kube.apply({"apiVersion": "v1", "kind": "List", "items": nodes})
    try:
        pods = kube.wait_for("2 running ranks", running_workers(kube, "llm", 2, 0), timeout=90)
        assert {p["spec"]["nodeName"] for p in pods} == set(names)
        kube.wait_for("Running", phase_is(kube, "llm", "Running"))
        events = [e for e in kube.events() if e.get("reason") == "ResidencyUnsatisfiable"]
        assert events and region in events[0]["message"]
    finally:
        kube("delete", "forgetraining", "llm", "--wait=false", check=False)
        kube("delete", "node", *names, "--wait=false", check=False)
