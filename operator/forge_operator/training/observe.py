"""What the planner sees of a ForgeTraining: its Jobs, Pods and Nodes, and the current attempt.

``read`` is the only function here that reads the API (through the runtime's reader); the rest
are pure views of what it read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..api import defaults
from ..api.base import API_VERSION
from ..api.names import LABEL_ATTEMPT, LABEL_MANAGED_BY, LABEL_TRAINING, MANAGED_BY
from ..k8s import conditions as C
from ..k8s.objects import NotAllowed, NotServed, Reader, annotations_of, deleting, labels_of, owned_by, parse_ts
from ..k8s.network import NetworkSeen, read_network, read_network_policy
from .children import egress_urls

JOB_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
CHILD_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
FAILED_CREATE = "FailedCreate"  # the Job controller's event reason when the API server refuses a pod
# Kueue's LocalQueue, newest version first (Kueue 0.15+ serves v1beta2; older ones v1beta1 only)
KUEUE_VERSIONS = ("kueue.x-k8s.io/v1beta2", "kueue.x-k8s.io/v1beta1")


@dataclass(frozen=True)
class QueueSeen:
    """What the API server said of the LocalQueue that scheduling.queueName names."""

    name: str
    kueue_installed: bool
    local_queue: dict[str, Any] | None = None  # None: no LocalQueue of that name in the namespace


@dataclass
class Observed:
    now: datetime
    jobs: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    # node name -> Node; None for a node that no longer exists; a node that could not be read is absent
    nodes: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    # Job name -> the newest refusal of one of its pods at admission (its FailedCreate event's message);
    # read only for a Job short of pods
    refusals: dict[str, str] = field(default_factory=dict)
    # the LocalQueue of scheduling.queueName; None without one, or when it could not be read
    queue: QueueSeen | None = None
    # claim name -> PersistentVolumeClaim (None: it does not exist), for the claims of the worker pods the
    # scheduler cannot place; read only then
    claims: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    # the training's ForgeEval (spec.evaluation), read only for a training that has one
    evaluation: dict[str, Any] | None = None
    # what the NetworkPolicy of network.egress Restricted allows besides the spec (read only then)
    network: NetworkSeen = field(default_factory=NetworkSeen)
    # the training's NetworkPolicy, read only with network.egress Unrestricted (to delete it)
    network_policy: dict[str, Any] | None = None
    # every Node, read (from the node cache) only for a training with spec.residency whose workers the
    # scheduler cannot place; None: not read, or not readable
    all_nodes: list[dict[str, Any]] | None = None


def read(reader: Reader, obj: dict[str, Any], now: datetime) -> Observed:
    """The training's Jobs and worker Pods (by label), the Nodes its pods run on, and why the API server
    refused the pods of a Job that lacks some (its events, read only then)."""
    meta = obj["metadata"]
    selector = f"{CHILD_SELECTOR},{LABEL_TRAINING}={meta['name']}"
    jobs = reader.list("batch/v1", "Job", meta["namespace"], selector)
    pods = reader.list("v1", "Pod", meta["namespace"], selector)
    nodes: dict[str, dict[str, Any] | None] = {}
    for node_name in {p["spec"].get("nodeName") for p in pods} - {None}:
        try:
            nodes[node_name] = reader.get("v1", "Node", node_name)  # None: deleted, its pods are lost
        except NotAllowed:
            pass  # without RBAC on nodes, node health is simply not watched
    refusals: dict[str, str] = {}
    for job in jobs:
        if short_of_pods(job, pods) and (message := newest_refusal(reader, job)):
            refusals[job["metadata"]["name"]] = message
    queue_name = ((obj.get("spec") or {}).get("scheduling") or {}).get("queueName")
    evaluation = None
    if (obj.get("spec") or {}).get("evaluation"):
        evaluation = reader.get(API_VERSION, "ForgeEval", meta["name"], meta["namespace"])
    restricted = ((obj.get("spec") or {}).get("network") or {}).get("egress", defaults.EGRESS) == "Restricted"
    return Observed(now=now, jobs=jobs, pods=pods, nodes=nodes, refusals=refusals,
                    queue=read_queue(reader, meta["namespace"], queue_name) if queue_name else None,
                    claims=read_claims(reader, meta["namespace"], pods), evaluation=evaluation,
                    network=read_network(reader, egress_urls(obj.get("spec") or {}), meta["namespace"])
                    if restricted else NetworkSeen(),
                    network_policy=None if restricted else read_network_policy(reader, obj, meta["name"]),
                    all_nodes=read_all_nodes(reader, pods) if (obj.get("spec") or {}).get("residency") else None)


def read_all_nodes(reader: Reader, pods: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Every Node, when a worker pod cannot be scheduled (to tell a residency no node satisfies from a full
    cluster); None otherwise, or without RBAC on nodes."""
    if not any(unschedulable(p) for p in pods):
        return None
    try:
        return reader.list("v1", "Node", "")
    except NotAllowed:
        return None


def read_queue(reader: Reader, namespace: str, name: str) -> QueueSeen | None:
    """The LocalQueue named ``name``, or that there is none, or that Kueue is not installed at all (the
    API serves no LocalQueue kind); None when the operator may not read LocalQueues."""
    for api_version in KUEUE_VERSIONS:
        try:
            return QueueSeen(name, True, reader.get(api_version, "LocalQueue", name, namespace))
        except NotServed:
            continue
        except NotAllowed:
            return None
    return QueueSeen(name, False)


def read_claims(reader: Reader, namespace: str, pods: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """The PersistentVolumeClaims of the worker pods that the scheduler cannot place (a claim that is
    missing or unbound holds them up; the scheduler's message does not always name it)."""
    claims: dict[str, dict[str, Any] | None] = {}
    for pod in pods:
        if not unschedulable(pod):
            continue
        for v in (pod.get("spec") or {}).get("volumes") or []:
            name = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if name and name not in claims:
                try:
                    claims[name] = reader.get("v1", "PersistentVolumeClaim", name, namespace)
                except NotAllowed:
                    return {}
    return claims


def unschedulable(pod: dict[str, Any]) -> bool:
    c = C.find((pod.get("status") or {}).get("conditions"), "PodScheduled")
    return c is not None and c.get("status") == "False" and c.get("reason") == "Unschedulable"


def short_of_pods(job: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
    """The Job controller should have created pods that are not there: the Job runs (started, not
    suspended, not finished) and has fewer pods than completions, by its own status and by the pods
    seen. Its pods refused at admission leave it so; Job status (v1.36) has no condition that says it,
    only the controller's FailedCreate events do."""
    spec, st = job.get("spec") or {}, job.get("status") or {}
    if not active(job) or spec.get("suspend") or not st.get("startTime"):
        return False
    want = int(spec.get("completions") or spec.get("parallelism") or 1)
    counted = sum(int(st.get(k) or 0) for k in ("active", "succeeded", "failed"))
    return counted < want and sum(1 for p in pods if owned_by(p, job)) < want


def newest_refusal(reader: Reader, job: dict[str, Any]) -> str | None:
    """The message of the Job controller's newest FailedCreate event on this Job ("Error creating: pods
    ... is forbidden: ..."); None without one, or without RBAC to list events."""
    meta = job["metadata"]
    try:
        events = reader.list("v1", "Event", meta["namespace"],
                             field_selector=f"involvedObject.uid={meta['uid']},reason={FAILED_CREATE}")
    except NotAllowed:
        return None
    if not events:
        return None
    newest = max(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or
                 e["metadata"].get("creationTimestamp") or "")
    return newest.get("message") or None


@dataclass
class Attempt:
    """The attempt the status is at (``restartCount``) and its children: one Job per attempt."""

    number: int
    failures: int
    job_name: str
    job: dict[str, Any] | None  # this attempt's Job, unless it is being deleted
    all_pods: list[dict[str, Any]]  # pods labelled with this attempt
    pods: list[dict[str, Any]]  # ... of which this attempt's Job's workers (a deleted Job's are only stopping)

    @property
    def running(self) -> list[dict[str, Any]]:
        return [p for p in self.pods if phase(p) == "Running" and not deleting(p)]

    @property
    def suspended(self) -> bool:
        return bool(self.job and self.job.get("spec", {}).get("suspend"))

    def without_job(self) -> Attempt:
        return Attempt(self.number, self.failures, self.job_name, None, self.all_pods, [])


def attempt_of(status: dict[str, Any], job_name: str, obs: Observed) -> Attempt:
    number = int(status.get("restartCount") or 0)
    job = next((j for j in obs.jobs if j["metadata"]["name"] == job_name and not deleting(j)), None)
    all_pods = [p for p in obs.pods if attempt_label(p) == number]
    pods = [p for p in all_pods if job is not None and owned_by(p, job)]
    return Attempt(number, int(status.get("failureCount") or 0), job_name, job, all_pods, pods)


def earlier_jobs(obs: Observed, attempt: int) -> list[str]:
    """Jobs of earlier attempts (to delete); a Job of a later attempt than the status knows is never touched."""
    return [j["metadata"]["name"] for j in obs.jobs
            if (a := attempt_label(j)) is not None and a < attempt and not deleting(j)]


# --------------------------------------------------------------------------- readers of Jobs, Pods, Nodes
def attempt_label(obj: dict[str, Any]) -> int | None:
    """The attempt a Job or worker pod belongs to (its label)."""
    value = labels_of(obj).get(LABEL_ATTEMPT, "")
    return int(value) if value.isdigit() else None


def phase(pod: dict[str, Any]) -> str | None:
    return pod.get("status", {}).get("phase")


def pod_index(pod: dict[str, Any]) -> str | None:
    return annotations_of(pod).get(JOB_INDEX_ANNOTATION)


def job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    c = C.find(job.get("status", {}).get("conditions"), type_)
    return c if c and c.get("status") == "True" else None


def active(job: dict[str, Any] | None) -> bool:
    """A Job that is neither finished nor being deleted."""
    if job is None or deleting(job):
        return False
    return not (job_condition(job, "Complete") or job_condition(job, "Failed"))


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term
    return None


def started(pod: dict[str, Any]) -> bool:
    """Whether the worker's container has started (it runs, or ran and ended)."""
    return any({"running", "terminated"} & set(cs.get("state") or {})
               for cs in pod.get("status", {}).get("containerStatuses") or [])


def waiting_reason(pod: dict[str, Any]) -> str:
    """Why a pod's container has not started: the container's waiting reason (ImagePullBackOff,
    ContainerCreating), else the scheduler's (Unschedulable), else the phase."""
    st = pod.get("status", {})
    for cs in st.get("containerStatuses") or []:
        if reason := ((cs.get("state") or {}).get("waiting") or {}).get("reason"):
            return reason
    scheduled = C.find(st.get("conditions"), "PodScheduled")
    if scheduled and scheduled.get("status") == "False":
        return scheduled.get("reason") or "not scheduled"
    return st.get("phase") or "Pending"


def last_line(text: str | None) -> str:
    """The last line of a message (a crash's stderr tail ends with its cause); "" when empty."""
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


M = TypeVar("M", bound=BaseModel)


def read_last_line(model: type[M], text: str | None) -> M | None:
    """The last line of a message the trainer wrote, as one of the contract's models; None when it is
    not one (empty, not JSON, a crash's stderr tail, the wrong shape)."""
    line = last_line(text)
    if not line:
        return None
    try:
        return model.model_validate_json(line)
    except ValidationError:
        return None


def node_ready(node: dict[str, Any] | None) -> tuple[bool, datetime | None]:
    if node is None:
        return False, None
    c = C.find(node.get("status", {}).get("conditions"), "Ready")
    if c is None:
        return False, None
    return c.get("status") == "True", parse_ts(c.get("lastTransitionTime"))
