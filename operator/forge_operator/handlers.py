"""kopf handlers: the thin I/O around :func:`forge_operator.reconcile.plan_training`.

Every trigger (a ForgeTraining, one of its Jobs or Pods changed, or a requeue
timer fired) runs the same ``reconcile_training``: read the training and its
children, plan, server-side apply the children under one field manager,
delete what must go, write the status once if it changed, then emit events.

Only raw-event handlers are used, so kopf writes nothing onto the user's object:
no annotations, no finalizers (GitOps tools see no drift, and deleting a
ForgeTraining never waits for the operator). Peering pauses these handlers on
standby replicas; requeue timers are armed only by the replica that acted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
from collections import defaultdict
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

    def __init__(self) -> None:
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


_clients: Clients | None = None
_settings = Settings()
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
        _execute(c, obj, plan)
        if plan.requeue_after is not None:
            _requeue(namespace, name, plan.requeue_after)
        return plan


def _rejected_child(plan: Plan, child: dict[str, Any], err: ApiException, now: datetime) -> None:
    """The API server refused a child built from the user's free-form fields (env, volumes, ...):
    report it on the training instead of failing the handler."""
    try:
        detail = json.loads(err.body or "{}").get("message") or err.reason
    except ValueError:
        detail = err.body or err.reason
    message = f"the API server refused {child['kind']} {child['metadata']['name']}: {detail}"[:2000]
    was = C.find(plan.status.get("conditions"), C.INVALID)
    plan.status["conditions"] = C.set_condition(plan.status.get("conditions"), C.INVALID, True,
                                                Reason.INVALID_SPEC, message, now,
                                                plan.status.get("observedGeneration"))
    if was is None or was.get("message") != message:
        plan.events.append(Event("Warning", Reason.INVALID_SPEC, message))


def _execute(c: Clients, obj: dict[str, Any], plan: Plan) -> None:
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    for child in plan.apply:
        try:
            c.resource(child["apiVersion"], child["kind"]).server_side_apply(
                body=child, namespace=namespace, field_manager=FIELD_MANAGER, force_conflicts=True)
        except ApiException as e:
            if e.status not in (400, 422):
                raise
            _rejected_child(plan, child, e, utcnow())
            break
    if plan.suspend_job is not None:
        job, suspend = plan.suspend_job
        try:
            c.batch.patch_namespaced_job(job, namespace, {"spec": {"suspend": suspend}}, field_manager=FIELD_MANAGER)
        except ApiException as e:
            if e.status != 404:
                raise
    for job in plan.delete_jobs:
        try:
            c.batch.delete_namespaced_job(job, namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise
    for pod in plan.force_delete_pods:
        try:
            c.core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)
        except ApiException as e:
            if e.status != 404:
                raise
    if plan.status != (obj.get("status") or {}):
        body = {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                "metadata": {"name": name, "namespace": namespace,
                             "resourceVersion": obj["metadata"]["resourceVersion"]},
                "spec": obj["spec"], "status": plan.status}
        try:
            # a PUT with the resourceVersion we planned from: a concurrent writer makes it 409, never lost
            c.custom.replace_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)
        except ApiException as e:
            if e.status == 409:
                _requeue(namespace, name, 0.2)
                return
            raise
        for event in plan.events:  # only once the new status is stored
            kopf.event(obj, type=event.type, reason=event.reason, message=event.message[:1024])
    observe_training(namespace, name, plan.status)


def _requeue(namespace: str, name: str, delay: float) -> None:
    key = (namespace, name)

    def fire() -> None:
        with _timers_lock:
            if _timers.get(key) is timer:
                del _timers[key]
        try:
            reconcile_training(namespace, name)
        except Exception:  # a failed tick is retried by the next event or tick
            log.exception("reconcile of %s/%s failed", namespace, name)
            _requeue(namespace, name, max(1.0, _settings.resync_seconds))

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
    global _settings
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
    reconcile_training(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_TRAINING: kopf.PRESENT})
def job_event(labels: dict[str, str], namespace: str, **_: Any) -> None:
    reconcile_training(namespace, labels[LABEL_TRAINING])


@kopf.on.event("", "v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_TRAINING: kopf.PRESENT})
def pod_event(labels: dict[str, str], namespace: str, **_: Any) -> None:
    reconcile_training(namespace, labels[LABEL_TRAINING])
