"""PodsReady: are the workers of the attempt running, and if not, what holds them up, in the words of
the component that knows (the scheduler's PodScheduled condition, the kubelet's waiting reason).

Read from the pods the planner already has: no extra request. The condition holds beside the phase,
like Kueue's PodsReady on a Workload: True once every rank runs, False with the reason otherwise,
and False (NotRunning) in the phases where no worker should run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..api.enums import ConditionType as T, Phase, Reason
from ..api.training import ForgeTraining
from ..k8s import conditions as C
from ..k8s.objects import labels_of
from ..k8s.placement import matches_requirements, why_not_on
from .children import residency_requirements
from .draft import Draft
from .observe import Attempt, Observed, QueueSeen, active, phase, pod_index, unschedulable

WORKER_PHASES = (Phase.PENDING, Phase.INITIALIZING, Phase.RUNNING)
# the kubelet's waiting reasons of a container whose image cannot be pulled
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")
# the scheduler's words for a claim that does not exist (VolumeBinding / VolumeRestrictions plugins)
MISSING_CLAIM = re.compile(r'persistentvolumeclaim "([^"]+)" not found')


@dataclass(frozen=True)
class Stuck:
    reason: Reason
    message: str


def why_not_ready(ft: ForgeTraining, attempt: Attempt, obs: Observed) -> Stuck:
    """What holds up the workers that do not run yet: an image that cannot be pulled (the kubelet), a pod
    the scheduler cannot place (a missing or unbound claim named as such, from the claims read; a
    spec.residency no node can satisfy, from every node read), or nothing but time. The first stuck rank
    speaks for the others."""
    n = ft.spec.resources.num_nodes
    pods = sorted((p for p in attempt.pods if phase(p) == "Pending"), key=lambda p: int(pod_index(p) or 0))
    for pod in pods:
        if (pull := image_pull_failure(pod)) is not None:
            return Stuck(Reason.IMAGE_PULL_FAILED, f"worker {who(pod)} cannot pull its image: {pull}")
    unschedulable = [(p, m) for p in pods if (m := unschedulable_message(p)) is not None]
    if unschedulable:
        pod, said = unschedulable[0]
        count = f"{len(unschedulable)} of {n} worker pods cannot be scheduled"
        return claim_problem(pod, said, count, obs.claims) or \
            residency_problem(ft, pod, said, count, obs.all_nodes) or \
            Stuck(Reason.UNSCHEDULABLE, f"{count}; the scheduler says of {who(pod)}: {said}")
    return Stuck(Reason.PODS_STARTING, f"{len(attempt.running)}/{n} ranks running")


def claim_problem(pod: dict[str, Any], said: str, count: str,
                  claims: dict[str, dict[str, Any] | None]) -> Stuck | None:
    """A claim of an unschedulable pod that does not exist (the scheduler's words, or the claim read) or is
    not bound to a volume (the scheduler says only "unbound immediate PersistentVolumeClaims")."""
    mounted = sorted(claims_of(pod))
    missing = [c for c in MISSING_CLAIM.findall(said) if c in mounted] or \
        [c for c in mounted if c in claims and claims[c] is None]
    if missing:
        return Stuck(Reason.PVC_NOT_FOUND,
                     f"PersistentVolumeClaim {missing[0]} does not exist: the workers mount it (the spec names "
                     f"it); {count}, the scheduler says of {who(pod)}: {said}")
    unbound = [(c, (claims[c].get("status") or {}).get("phase") or "Pending") for c in mounted
               if claims.get(c) is not None and (claims[c].get("status") or {}).get("phase") != "Bound"]
    if unbound:
        name, claim_phase = unbound[0]
        return Stuck(Reason.PVC_NOT_BOUND,
                     f"PersistentVolumeClaim {name} is not bound to a volume (phase {claim_phase}): the workers "
                     f"mount it; {count}, the scheduler says of {who(pod)}: {said}")
    return None


def residency_problem(ft: ForgeTraining, pod: dict[str, Any], said: str, count: str,
                      nodes: list[dict[str, Any]] | None) -> Stuck | None:
    """No node in spec.residency could ever run the pod (none there, or none there with its GPUs, resources,
    tolerations and nodeSelector), so waiting will not help. None: some node there could (the cluster is
    only full), or the nodes were not read."""
    requirements = residency_requirements(ft)
    if not requirements or nodes is None:
        return None
    inside = [n["metadata"]["name"] for n in nodes if matches_requirements(labels_of(n), requirements)]
    why = {n["metadata"]["name"]: why_not_on(pod.get("spec") or {}, n) for n in nodes}
    if any(why[name] is None for name in inside):
        return None
    outside = sum(1 for name, no in why.items() if no is None and name not in inside)
    where = residency_words(ft)
    if not inside:
        found = f"no node is in {where}"
    else:
        first = sorted(inside)[0]
        found = f"none of the {len(inside)} nodes in {where} can run a worker ({first}: {why[first]})"
    return Stuck(Reason.RESIDENCY_UNSATISFIABLE,
                 f"spec.residency: {found}; {outside} node(s) outside could, but the residency keeps the workers "
                 f"off them. {count}; the scheduler says of {who(pod)}: {said}")


def residency_words(ft: ForgeTraining) -> str:
    """'regions a, b and zones c' of spec.residency."""
    res = ft.spec.residency
    parts = [f"{what} {', '.join(values)}" for what, values in (("regions", res.regions), ("zones", res.zones))
             if res is not None and values]
    return " and ".join(parts)


def why_queued(queue: QueueSeen | None, namespace: str) -> Stuck | None:
    """What keeps Kueue from ever admitting a queued training: Kueue not installed, no LocalQueue of the
    name, or a LocalQueue Kueue calls inactive (its ClusterQueue missing or stopped). None: waiting is all."""
    if queue is None:
        return None
    if not queue.kueue_installed:
        return Stuck(Reason.KUEUE_NOT_INSTALLED,
                     f"scheduling.queueName is {queue.name}, but Kueue is not installed (the API server serves no "
                     "LocalQueue): install Kueue, or remove scheduling.queueName to start without a queue")
    if queue.local_queue is None:
        return Stuck(Reason.LOCAL_QUEUE_NOT_FOUND,
                     f"LocalQueue {queue.name} does not exist in namespace {namespace} (scheduling.queueName): "
                     "Kueue admits nothing from it; create it, or name an existing one")
    active_ = C.find((queue.local_queue.get("status") or {}).get("conditions"), "Active")
    if active_ is not None and active_.get("status") == "False":
        return Stuck(Reason.LOCAL_QUEUE_INACTIVE,
                     f"LocalQueue {queue.name} is not active, Kueue says: {active_.get('reason', '')}: "
                     f"{active_.get('message', '')}")
    return None


def report_pods_ready(d: Draft, ft: ForgeTraining, attempt: Attempt, obs: Observed) -> None:
    """PodsReady after the phase is known. While the attempt's workers should run (its Job active and
    not suspended, the phase Pending, Initializing or Running), True when all ranks run, else False
    with what holds them up; in any other state False with reason NotRunning (the cause, if any, went
    with the workers). Absent until the first workers are wanted."""
    p = d.status.get("phase")
    wanted = p in WORKER_PHASES and active(attempt.job) and not attempt.suspended
    queue_stuck = why_queued(obs.queue, ft.metadata.namespace) if p == Phase.QUEUED else None
    if queue_stuck is not None:
        stuck = queue_stuck
    elif not wanted:
        d.pods_not_running(p)
        return
    elif len(attempt.running) == ft.spec.resources.num_nodes and p == Phase.RUNNING:
        d.set_condition(T.PODS_READY, True, Reason.ALL_RANKS_RUNNING, f"all {len(attempt.running)} ranks running")
        return
    else:
        stuck = why_not_ready(ft, attempt, obs)
    was = C.find(d.old_status.get("conditions"), T.PODS_READY) or {}
    d.set_condition(T.PODS_READY, False, stuck.reason, stuck.message)
    if stuck.reason != Reason.PODS_STARTING and was.get("reason") != stuck.reason:  # one event per new cause
        d.event(stuck.reason, stuck.message, warning=True)


def image_pull_failure(pod: dict[str, Any]) -> str | None:
    """'<kubelet reason>: <message>' of the first container whose image cannot be pulled; None otherwise."""
    status = pod.get("status") or {}
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            image = f" {cs['image']}" if cs.get("image") else ""
            return f"{waiting['reason']}{image}: {waiting.get('message') or 'no message from the kubelet'}"
    return None


def unschedulable_message(pod: dict[str, Any]) -> str | None:
    """The scheduler's message on a pod it could not place (PodScheduled False, reason Unschedulable)."""
    if not unschedulable(pod):
        return None
    return C.find(pod["status"]["conditions"], "PodScheduled").get("message") or "no message from the scheduler"


def claims_of(pod: dict[str, Any]) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in (pod.get("spec") or {}).get("volumes") or []
            if (v.get("persistentVolumeClaim") or {}).get("claimName")}


def who(pod: dict[str, Any]) -> str:
    return f"{pod['metadata']['name']} (rank {pod_index(pod) or '?'})"
