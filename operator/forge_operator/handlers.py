"""kopf handlers: the thin I/O around :func:`forge_operator.reconcile.plan_training`.

Every trigger (a ForgeTraining, one of its Jobs or Pods changed, or a requeue
timer fired) runs the same ``reconcile_training``: read the training and its
children, plan, write the status if it changed (the plan's decisions are
recorded before anything acts on them), server-side apply the children under
one field manager, delete what must go, then post events.

Only raw-event handlers are used, so kopf writes nothing onto the user's object:
no annotations, no finalizers (GitOps tools see no drift, and deleting a
ForgeTraining never waits for the operator). Requeue timers run outside kopf:
they post events with the API client, and with peering a timer first checks
that no live peer outranks this replica (kopf pauses the handlers of an
outranked replica, and its timers stand down with them).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import kopf
import kubernetes
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

from . import conditions as C
from .api.base import GROUP, VERSION
from .conditions import Reason
from .constants import FIELD_MANAGER, LABEL_MANAGED_BY, LABEL_TRAINING, MANAGED_BY
from .metrics import observe_training
from .reconcile import Event, Observed, Plan, Settings, plan_training

log = logging.getLogger("forge.operator")
PLURAL = "forgetrainings"
CHILD_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"

# Environment of the operator process (the Helm chart sets them).
ENV_TRAINER_IMAGE = "FORGE_TRAINER_IMAGE"
ENV_RESYNC_SECONDS = "FORGE_RESYNC_SECONDS"
ENV_PEERING = "FORGE_PEERING"          # name of the KopfPeering object; empty = standalone
ENV_METRICS_PORT = "FORGE_METRICS_PORT"


class Clients:
    """Kubernetes API clients, created once per process."""

    def __init__(self, kubeconfig: str | None = None) -> None:
        if kubeconfig:
            self.api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        else:
            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()
            self.api = kubernetes.client.ApiClient()
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.batch = kubernetes.client.BatchV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.dynamic = DynamicClient(self.api)
        self._resources: dict[tuple[str, str], Any] = {}

    def resource(self, api_version: str, kind: str):
        key = (api_version, kind)
        if key not in self._resources:
            self._resources[key] = self.dynamic.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    def plain(self, obj: Any) -> Any:
        return self.api.sanitize_for_serialization(obj)


@dataclass(frozen=True)
class Peering:
    name: str
    priority: int
    clusterwide: bool


PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
_INSTANCE = socket.gethostname()
_clients: Clients | None = None
_settings = Settings()
_peering: Peering | None = None
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_timers: dict[tuple[str, str], threading.Timer] = {}
_timers_lock = threading.Lock()


def clients() -> Clients:
    global _clients
    if _clients is None:
        _clients = Clients()
    return _clients


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


# --------------------------------------------------------------------------- reconcile
def reconcile_training(namespace: str, name: str) -> Plan | None:
    """Converge one ForgeTraining; safe to call any number of times, from any trigger."""
    with _locks[(namespace, name)]:
        c = clients()
        try:
            obj = c.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                _cancel_requeue(namespace, name)
                return None
            raise
        if obj["metadata"].get("deletionTimestamp"):
            return None
        selector = f"{CHILD_SELECTOR},{LABEL_TRAINING}={name}"
        jobs = c.plain(c.batch.list_namespaced_job(namespace, label_selector=selector).items)
        pods = c.plain(c.core.list_namespaced_pod(namespace, label_selector=selector).items)
        nodes: dict[str, Any] = {}
        for node_name in {p["spec"].get("nodeName") for p in pods} - {None}:
            try:
                nodes[node_name] = c.plain(c.core.read_node(node_name))
            except ApiException as e:
                if e.status == 404:
                    nodes[node_name] = None  # deleted: its pods are lost
                elif e.status != 403:  # without RBAC on nodes, node health is simply not watched
                    raise
        plan = plan_training(obj, Observed(now=utcnow(), jobs=jobs, pods=pods, nodes=nodes), _settings)
        if _execute(c, obj, plan) and plan.requeue_after is not None:
            _requeue(namespace, name, plan.requeue_after)
        return plan


def reconcile_or_retry(namespace: str, name: str) -> None:
    """Every trigger goes through here: a reconcile that raises (API server unavailable, a conflict, a
    bug) is logged and tried again after the resync interval, so no training is ever left behind."""
    try:
        reconcile_training(namespace, name)
    except Exception:
        log.exception("reconcile of %s/%s failed; retrying in %.0fs", namespace, name, _settings.resync_seconds)
        _requeue(namespace, name, max(1.0, _settings.resync_seconds))


def _rejected_child(plan: Plan, child: dict[str, Any], err: ApiException, old_status: dict[str, Any],
                    now: datetime) -> None:
    """The API server refused a child built from the user's free-form fields (env, volumes, ...):
    report it on the training instead of failing the handler. The condition stays until an apply
    succeeds (plan_training keeps it), so a refused child costs no status write per reconcile."""
    try:
        detail = json.loads(err.body or "{}").get("message") or err.reason
    except ValueError:
        detail = err.body or err.reason
    message = f"{REFUSED_PREFIX}{child['kind']} {child['metadata']['name']}: {detail}"[:2000]
    plan.status["conditions"] = C.set_condition(plan.status.get("conditions"), C.INVALID, True,
                                                Reason.CHILD_REJECTED, message, now,
                                                plan.status.get("observedGeneration"))
    was = C.find(old_status.get("conditions"), C.INVALID)
    if was is None or was.get("message") != message:
        plan.events.append(Event("Warning", Reason.CHILD_REJECTED, message))


def _ignore_404(call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except ApiException as e:
        if e.status != 404:
            raise


def _write_status(c: Clients, obj: dict[str, Any], status: dict[str, Any], resource_version: str) -> str | None:
    """PUT the status with the resourceVersion it was planned from; None when someone wrote in between
    (the write is then refused with 409, never lost: the caller plans again from a fresh read)."""
    meta = obj["metadata"]
    body = {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "resourceVersion": resource_version},
            "spec": obj["spec"], "status": status}
    try:
        stored = c.custom.replace_namespaced_custom_object_status(GROUP, VERSION, meta["namespace"], PLURAL,
                                                                  meta["name"], body)
    except ApiException as e:
        if e.status == 409:
            return None
        raise
    return stored["metadata"]["resourceVersion"]


def _execute(c: Clients, obj: dict[str, Any], plan: Plan) -> bool:
    """Carry out a plan. The status is written first: it records the decisions (a restart, its count)
    before anything acts on them, so an operator killed half-way resumes the same attempt and never
    repeats or forgets one. Returns False when the plan was dropped for a newer read."""
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    old_status = obj.get("status") or {}
    rv: str | None = obj["metadata"]["resourceVersion"]
    written = old_status
    if plan.status != old_status:
        rv = _write_status(c, obj, plan.status, rv)
        if rv is None:
            _requeue(namespace, name, 0.2)
            return False
        written = json.loads(json.dumps(plan.status))
    stored_events = list(plan.events)  # these describe the status just written
    refused = _refused_kind(plan.status)
    rejected = False
    for child in plan.apply:
        try:
            c.resource(child["apiVersion"], child["kind"]).server_side_apply(
                body=child, namespace=namespace, field_manager=FIELD_MANAGER, force_conflicts=True)
        except ApiException as e:
            if e.status not in (400, 422):
                raise
            _rejected_child(plan, child, e, old_status, utcnow())
            rejected = True
            break
    # a refused child is reported until a child of its kind is accepted (not merely until an apply
    # that did not include one)
    if not rejected and refused is not None and any(ch["kind"] == refused for ch in plan.apply):
        plan.status["conditions"] = [x for x in plan.status["conditions"] if x["type"] != C.INVALID]
    if plan.suspend_job is not None:
        job, suspend = plan.suspend_job
        _ignore_404(c.batch.patch_namespaced_job, job, namespace, {"spec": {"suspend": suspend}},
                    field_manager=FIELD_MANAGER)
    for job in plan.delete_jobs:
        _ignore_404(c.batch.delete_namespaced_job, job, namespace, propagation_policy="Background")
    for pod in plan.delete_pods:
        _ignore_404(c.core.delete_namespaced_pod, pod, namespace)
    for pod in plan.force_delete_pods:
        _ignore_404(c.core.delete_namespaced_pod, pod, namespace, grace_period_seconds=0)
    stored = True
    if plan.status != written:
        stored = _write_status(c, obj, plan.status, rv) is not None
    for event in plan.events if stored else stored_events:  # only what a stored status says
        post_event(c, obj, event)
    if not stored:  # the refusal or its end is planned again from a fresh read
        _requeue(namespace, name, 0.2)
        return False
    observe_training(namespace, name, plan.status)
    return True


REFUSED_PREFIX = "the API server refused "


def _refused_kind(status: dict[str, Any]) -> str | None:
    """The kind of child whose refusal the Invalid condition reports, if it reports one."""
    invalid = C.find(status.get("conditions"), C.INVALID) or {}
    if invalid.get("reason") != Reason.CHILD_REJECTED:
        return None
    return invalid.get("message", "").removeprefix(REFUSED_PREFIX).split(" ", 1)[0]


def post_event(c: Clients, obj: dict[str, Any], event: Event) -> None:
    """A core/v1 Event on the training, as `kubectl describe` and `kubectl get events` show them.

    Posted with the API client (not kopf.event) so reconciles started by a requeue timer, outside
    any kopf handler, report too. An event that cannot be posted is logged, never fatal."""
    meta = obj["metadata"]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid")},
        "type": event.type, "reason": event.reason, "message": event.message[:1024],
        "source": {"component": FIELD_MANAGER}, "reportingComponent": FIELD_MANAGER,
        "reportingInstance": _INSTANCE, "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }
    try:
        c.core.create_namespaced_event(meta["namespace"], body)
    except ApiException as e:
        log.warning("event %s on %s/%s not posted: %s", event.reason, meta["namespace"], meta["name"], e.reason)


# --------------------------------------------------------------------------- requeue timers
def outranked(peers: dict[str, Any], priority: int, now: datetime) -> bool:
    """Whether a live peer of a kopf peering object's status has a higher priority than ours:
    kopf then pauses this replica's handlers, and its timers must stand down too."""
    for info in peers.values():
        if not isinstance(info, dict) or int(info.get("priority") or 0) <= priority:
            continue
        lastseen = info.get("lastseen")
        try:
            seen = datetime.fromisoformat(lastseen) if lastseen else now
        except ValueError:
            seen = now
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=timezone.utc)
        if (now - seen).total_seconds() < int(info.get("lifetime") or 60):
            return True
    return False


def _standby(namespace: str) -> bool:
    if _peering is None:
        return False
    c = clients()
    try:
        if _peering.clusterwide:
            obj = c.custom.get_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings",
                                                     _peering.name)
        else:
            obj = c.custom.get_namespaced_custom_object(PEERING_GROUP, PEERING_VERSION, namespace, "kopfpeerings",
                                                        _peering.name)
    except ApiException as e:
        log.warning("cannot read peering %s: %s", _peering.name, e.reason)
        return False
    return outranked(obj.get("status") or {}, _peering.priority, datetime.now(timezone.utc))


def _requeue(namespace: str, name: str, delay: float) -> None:
    key = (namespace, name)

    def fire() -> None:
        with _timers_lock:
            if _timers.get(key) is timer:
                del _timers[key]
        try:
            if _standby(namespace):
                # a paused replica stands down; the active one has its own timers, and kopf replays
                # every object through the handlers if this replica becomes active again
                return
        except Exception:
            log.exception("peering check for %s/%s failed", namespace, name)
        reconcile_or_retry(namespace, name)

    with _timers_lock:
        old = _timers.get(key)
        timer = threading.Timer(max(0.0, delay), fire)
        timer.daemon = True
        if old is not None:
            old.cancel()
        _timers[key] = timer
        timer.start()


def _cancel_requeue(namespace: str, name: str) -> None:
    with _timers_lock:
        timer = _timers.pop((namespace, name), None)
    if timer is not None:
        timer.cancel()


# --------------------------------------------------------------------------- kopf wiring
@kopf.on.startup()
def operator_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _settings, _peering
    _settings = Settings(trainer_image=os.environ.get(ENV_TRAINER_IMAGE) or None,
                         resync_seconds=float(os.environ.get(ENV_RESYNC_SECONDS, "15")))
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    peering = os.environ.get(ENV_PEERING, "")
    if peering:
        settings.peering.name = peering
        settings.peering.mandatory = True
        # replicas of equal priority would all freeze; a random one makes one active, the rest standby
        settings.peering.priority = random.randint(1, 2**31 - 1)
        _peering = Peering(peering, settings.peering.priority, settings.peering.clusterwide)
    else:
        settings.peering.standalone = True
    port = int(os.environ.get(ENV_METRICS_PORT, "0") or 0)
    if port:
        from .metrics import serve
        serve(port)
    clients()


@kopf.on.event(GROUP, VERSION, PLURAL)
def forgetraining_event(event: dict[str, Any], name: str, namespace: str, **_: Any) -> None:
    if event.get("type") == "DELETED":
        _cancel_requeue(namespace, name)
        return
    reconcile_or_retry(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_TRAINING: kopf.PRESENT})
def job_event(labels: dict[str, str], namespace: str, **_: Any) -> None:
    reconcile_or_retry(namespace, labels[LABEL_TRAINING])


@kopf.on.event("", "v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_TRAINING: kopf.PRESENT})
def pod_event(labels: dict[str, str], namespace: str, **_: Any) -> None:
    reconcile_or_retry(namespace, labels[LABEL_TRAINING])
