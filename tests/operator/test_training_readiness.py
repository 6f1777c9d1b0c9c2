"""Stuck workers, without a cluster: PodsReady says what holds the workers up (the scheduler's or the
kubelet's words, read from the pods already observed)."""

from __future__ import annotations

from datetime import timedelta

from forge_operator.k8s import conditions as C
from forge_operator.training.observe import Observed
from forge_operator.training.planner import plan_training
from operator_support import NOW, READY, job, obj, pod, running_plan

NO_GPUS = ("0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available: "
           "4 No preemption victims found for incoming pod.")
NO_CLAIM = ('0/4 nodes are available: persistentvolumeclaim "ckpt" not found. preemption: 0/4 nodes are '
            'available: 4 Preemption is not helpful for scheduling.')
# the kubelet's status of a container whose image cannot be pulled, as a real node reports it
PULL = {"name": "trainer", "image": "registry.local/forge-trainer:typo", "ready": False, "restartCount": 0,
        "state": {"waiting": {"reason": "ImagePullBackOff",
                              "message": 'Back-off pulling image "registry.local/forge-trainer:typo"'}}}
CLAIMS = [{"name": f"pvc-{c}", "persistentVolumeClaim": {"claimName": c}} for c in ("ckpt", "corpus", "models")]


def unscheduled(name: str, index: int, message: str) -> dict:
    return pod(name, index, phase="Pending", node="", spec={"nodeName": None, "volumes": CLAIMS}, status={
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]})


def pods_ready(plan) -> dict | None:
    return C.find(plan.status.get("conditions"), "PodsReady")


def pending() -> dict:
    o = obj()
    o["status"] = {"phase": "Pending"}
    return o


def test_unschedulable_workers_quote_the_scheduler_and_clear_once_they_run():
    o = pending()
    pods = [unscheduled(f"llm-r0-{i}-x", i, NO_GPUS) for i in range(4)]
    plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=pods))
    c = pods_ready(plan)
    assert (c["status"], c["reason"], plan.status["phase"]) == ("False", "Unschedulable", "Pending")
    assert c["message"] == f"4 of 4 worker pods cannot be scheduled; the scheduler says of llm-r0-0-x (rank 0): {NO_GPUS}"
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "Unschedulable")]
    # the same cause at the next reconcile: nothing new to write or say
    o["status"] = plan.status
    again = plan_training(o, Observed(now=NOW + timedelta(seconds=15), jobs=[job("llm-r0")], pods=pods))
    assert again.status == o["status"] and again.events == []
    # GPUs freed: all ranks run, the condition says so
    o["status"] = again.status
    ready = running_plan(o)
    c = pods_ready(ready)
    assert (c["status"], c["reason"], ready.status["phase"]) == ("True", "AllRanksRunning", "Running")


def test_a_missing_claim_the_spec_names_is_said_as_such():
    pods = [unscheduled(f"llm-r0-{i}-x", i, NO_CLAIM) for i in range(4)]
    c = pods_ready(plan_training(pending(), Observed(now=NOW, jobs=[job("llm-r0")], pods=pods)))
    assert c["reason"] == "PVCNotFound"
    assert c["message"].startswith("PersistentVolumeClaim ckpt does not exist: the workers mount it")
    assert c["message"].endswith(NO_CLAIM)
    # a claim the pods do not mount (the scheduler's words about something else) is no more than unschedulable
    other = [unscheduled("llm-r0-0-x", 0, NO_CLAIM.replace('"ckpt"', '"someone-elses"'))]
    assert pods_ready(plan_training(pending(), Observed(now=NOW, jobs=[job("llm-r0")], pods=other)))["reason"] == \
        "Unschedulable"


def test_an_image_that_cannot_be_pulled_quotes_the_kubelet():
    """kwok never pulls images, so this is tested here only: a pod status shaped like the kubelet's."""
    o = pending()
    pods = [pod("llm-r0-0-x", 0, phase="Running", node="n0"),
            pod("llm-r0-1-y", 1, phase="Pending", node="n1", status={"containerStatuses": [PULL]})]
    plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=pods, nodes={"n0": READY, "n1": READY}))
    c = pods_ready(plan)
    assert (c["status"], c["reason"], plan.status["phase"]) == ("False", "ImagePullFailed", "Initializing")
    assert c["message"] == ('worker llm-r0-1-y (rank 1) cannot pull its image: ImagePullBackOff '
                            'registry.local/forge-trainer:typo: Back-off pulling image "registry.local/forge-trainer:typo"')
    assert ("Warning", "ImagePullFailed") in [(e.type, e.reason) for e in plan.events]
    for reason in ("ErrImagePull", "InvalidImageName"):
        bad = {**PULL, "state": {"waiting": {"reason": reason, "message": "m"}}}
        pods[1]["status"]["containerStatuses"] = [bad]
        plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=pods, nodes={"n0": READY, "n1": READY}))
        assert pods_ready(plan)["reason"] == "ImagePullFailed" and f"{reason} " in pods_ready(plan)["message"]
    # a container that is merely being created is starting, not stuck
    pods[1]["status"]["containerStatuses"] = [{**PULL, "state": {"waiting": {"reason": "ContainerCreating"}}}]
    plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=pods, nodes={"n0": READY, "n1": READY}))
    assert (pods_ready(plan)["reason"], pods_ready(plan)["message"]) == ("PodsStarting", "1/4 ranks running")


def test_the_cause_goes_with_the_workers():
    stuck = plan_training(pending(), Observed(now=NOW, jobs=[job("llm-r0")], pods=[unscheduled("p0", 0, NO_GPUS)]))
    # suspended: the Job's pods are deleted, nothing is held up any more
    o = obj(scheduling={"suspend": True})
    o["status"] = stuck.status
    plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=[unscheduled("p0", 0, NO_GPUS)]))
    c = pods_ready(plan)
    assert plan.status["phase"] == "Suspended" and (c["status"], c["reason"]) == ("False", "NotRunning")
    # failed (here: the deadline passed while no worker ran)
    o = obj(training={"budget": {"maxSteps": 100, "deadline": "2026-11-22T11:00:00Z"}})
    o["status"] = stuck.status
    plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=[unscheduled("p0", 0, NO_GPUS)]))
    assert plan.status["phase"] == "Failed" and pods_ready(plan)["reason"] == "NotRunning"
    # a fresh training has no PodsReady until its workers are wanted, and then they are starting
    first = plan_training(obj(), Observed(now=NOW))
    assert pods_ready(first) is None
    o = obj()
    o["status"] = first.status
    c = pods_ready(plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")])))
    assert (c["status"], c["reason"], c["message"]) == ("False", "PodsStarting", "0/4 ranks running")


# --------------------------------------------------------------------------- claims and queues
UNBOUND = ("0/4 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/4 nodes are "
           "available: 4 Preemption is not helpful for scheduling.")


def claim(name: str, claim_phase: str = "Bound") -> dict:
    return {"metadata": {"name": name}, "status": {"phase": claim_phase}}


def test_an_unbound_claim_is_named_though_the_scheduler_does_not_name_it():
    pods = [unscheduled(f"llm-r0-{i}-x", i, UNBOUND) for i in range(4)]
    claims = {"ckpt": claim("ckpt"), "corpus": claim("corpus", "Pending"), "models": claim("models")}
    plan = plan_training(pending(), Observed(now=NOW, jobs=[job("llm-r0")], pods=pods, claims=claims))
    c = pods_ready(plan)
    assert (c["status"], c["reason"], plan.status["phase"]) == ("False", "PVCNotBound", "Pending")
    assert c["message"].startswith("PersistentVolumeClaim corpus is not bound to a volume (phase Pending): "
                                   "the workers mount it; 4 of 4 worker pods cannot be scheduled")
    assert c["message"].endswith(UNBOUND)
    assert ("Warning", "PVCNotBound") in [(e.type, e.reason) for e in plan.events]
    # a claim read as absent is missing, whatever the scheduler's words
    claims["corpus"] = None
    assert pods_ready(plan_training(pending(), Observed(now=NOW, jobs=[job("llm-r0")], pods=pods,
                                                        claims=claims)))["reason"] == "PVCNotFound"
    # every claim bound: the scheduler's reason stands
    claims["corpus"] = claim("corpus")
    assert pods_ready(plan_training(pending(), Observed(now=NOW, jobs=[job("llm-r0")], pods=pods,
                                                        claims=claims)))["reason"] == "Unschedulable"


def queued(queue_seen) -> tuple[dict, object]:
    o = obj(scheduling={"queueName": "team-a"})
    plan = plan_training(o, Observed(now=NOW, queue=queue_seen))
    o["status"] = plan.status
    suspended = job("llm-r0")
    suspended["spec"]["suspend"] = True
    return o, plan_training(o, Observed(now=NOW, jobs=[suspended], queue=queue_seen))


def test_a_queue_that_can_never_admit_says_why_and_clears_when_it_can():
    from forge_operator.training.observe import QueueSeen

    for seen, reason, words in (
        (QueueSeen("team-a", kueue_installed=False), "KueueNotInstalled", "Kueue is not installed"),
        (QueueSeen("team-a", True, None), "LocalQueueNotFound", "LocalQueue team-a does not exist in namespace ns"),
        (QueueSeen("team-a", True, {"status": {"conditions": [{"type": "Active", "status": "False",
                                                                "reason": "ClusterQueueDoesNotExist",
                                                                "message": "Can't submit new workloads to "
                                                                           "clusterQueue"}]}}),
         "LocalQueueInactive", "LocalQueue team-a is not active, Kueue says: ClusterQueueDoesNotExist"),
    ):
        o, plan = queued(seen)
        c = pods_ready(plan)
        assert (plan.status["phase"], c["status"], c["reason"]) == ("Queued", "False", reason), c
        assert words in c["message"]
        assert C.find(plan.status["conditions"], "Queued")["reason"] == reason
        o["status"] = plan.status
        # the cause goes (Kueue installed, the LocalQueue created and active): waiting for admission is all
        suspended = job("llm-r0")
        suspended["spec"]["suspend"] = True
        fine = plan_training(o, Observed(now=NOW, jobs=[suspended], queue=QueueSeen("team-a", True, {"status": {}})))
        c = pods_ready(fine)
        assert (fine.status["phase"], c["reason"]) == ("Queued", "NotRunning")
        assert C.find(fine.status["conditions"], "Queued")["reason"] == "WaitingForAdmission"
    # one warning when the cause appears, none while it stays
    from forge_operator.training.observe import QueueSeen as Q
    o = obj(scheduling={"queueName": "team-a"})
    first = plan_training(o, Observed(now=NOW, queue=Q("team-a", True, None)))
    assert [(e.type, e.reason) for e in first.events] == [("Warning", "LocalQueueNotFound")]
    o, plan = queued(Q("team-a", True, None))
    assert plan.events == []
