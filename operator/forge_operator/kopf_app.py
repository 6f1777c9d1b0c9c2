"""kopf registrations, and nothing else: each event of each kind goes to the reconciler runtime.

Only raw-event handlers are used, so kopf writes nothing onto the user's object: no annotations,
no finalizers (GitOps tools see no drift, and deleting a resource never waits for the operator).
The runtime (``k8s/runtime.py``) does the rest: locks, requeue timers, retries, status, events.

Pods and Jobs are watched only as far as they are ours: the API server filters the watches by our
managed-by label, and kopf keeps what they deliver in two indices (filled before any handler runs) that
the planners read instead of listing (``k8s/cache.py``). Nodes are kept by one watch of their own.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import kopf

from .api.base import GROUP, VERSION
from .api.defaults import RECONCILE_WORKERS, RESYNC_SECONDS
from .api.names import FIELD_MANAGER, LABEL_EVAL, LABEL_MANAGED_BY, LABEL_TRAINING, MANAGED_BY
from .evaluation.reconciler import KIND as EVAL, PLURAL as EVALS, EvalReconciler
from .k8s.cache import CachedReader, IndexedKind, Informer, PerNamespace, Watched, slim, slim_node_body
from .k8s.clients import Clients
from .k8s.network import API_SERVER_NAMESPACE, API_SERVER_SLICES
from .k8s.objects import Key
from .k8s.peering import Peering
from .k8s.runtime import Runtime
from .training.metrics import serve
from .training.reconciler import KIND as TRAINING, PLURAL as TRAININGS, Settings, TrainingReconciler

# Environment of the operator process (the Helm chart sets them).
ENV_TRAINER_IMAGE = "FORGE_TRAINER_IMAGE"
ENV_RESYNC_SECONDS = "FORGE_RESYNC_SECONDS"
ENV_PEERING = "FORGE_PEERING"          # name of the KopfPeering object; empty = standalone
ENV_METRICS_PORT = "FORGE_METRICS_PORT"
ENV_RECONCILE_WORKERS = "FORGE_RECONCILE_WORKERS"

_runtime: Runtime | None = None
# the training's children, kept in kopf's indices keyed by (namespace, training name)
PODS, JOBS = IndexedKind(LABEL_TRAINING), IndexedKind(LABEL_TRAINING)
# the server-side selector of the Pod and Job watches: only what this operator made (a training's workers
# and Jobs, an evaluation's pod and Job)
CHILD_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"


def runtime() -> Runtime:
    """The process's runtime, made at startup (kopf calls no handler before)."""
    assert _runtime is not None, "the operator has not started"
    return _runtime


@kopf.on.startup()
def operator_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _runtime
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    # kopf's dynamic scanning watches every CRD (and, in namespaced mode, every Namespace) cluster-wide,
    # which the chart's RBAC does not grant: the operator serves its own CRDs, installed before it,
    # in the namespaces it is given by name
    settings.scanning.disabled = True
    for resource in (("", "v1", "pods"), ("batch", "v1", "jobs")):
        settings.watching.label_selectors[resource] = CHILD_SELECTOR
    peering = None
    if name := os.environ.get(ENV_PEERING, ""):
        settings.peering.name = name
        settings.peering.mandatory = True
        # replicas of equal priority would all freeze; a random one makes one active, the rest standby
        settings.peering.priority = random.randint(1, 2**31 - 1)
        peering = Peering(name, settings.peering.priority, settings.peering.clusterwide)
    else:
        settings.peering.standalone = True
    if port := int(os.environ.get(ENV_METRICS_PORT, "0") or 0):
        serve(port)
    resync = float(os.environ.get(ENV_RESYNC_SECONDS, str(RESYNC_SECONDS)))
    trainings = TrainingReconciler(Settings(trainer_image=os.environ.get(ENV_TRAINER_IMAGE) or None,
                                            resync_seconds=resync))
    clients = Clients()
    reader = CachedReader(clients, {("v1", "Pod"): PODS, ("batch/v1", "Job"): JOBS}, informers(clients))
    evals = EvalReconciler(image=os.environ.get(ENV_TRAINER_IMAGE) or None)
    _runtime = Runtime(clients, [trainings, evals], field_manager=FIELD_MANAGER,
                       resync_seconds=resync, peering=peering, reader=reader)
    _runtime.start(int(os.environ.get(ENV_RECONCILE_WORKERS, "") or RECONCILE_WORKERS))


def informers(clients: Clients) -> dict[tuple[str, str], Watched]:
    """The reads served by informers of the operator's own: every Node (node health, residency), the API
    server's EndpointSlices (the trainings' NetworkPolicies), the Services of each namespace a reward URL
    names or a training runs in, and the operator's ServiceAccounts, ConfigMaps, Roles, RoleBindings and
    NetworkPolicies of each namespace it applies them in, watched from the first read there."""
    nodes = Informer(clients.core.list_node, slim_body=slim_node_body, name="nodes").start()
    api_server = Informer(clients.discovery.list_namespaced_endpoint_slice, API_SERVER_NAMESPACE,
                          label_selector=API_SERVER_SLICES, name="EndpointSlices of the kubernetes Service").start()
    services = PerNamespace(lambda ns: Informer(clients.core.list_namespaced_service, ns, name=f"Services of {ns}"))
    return {("v1", "Node"): lambda _: nodes, ("v1", "Service"): services,
            ("discovery.k8s.io/v1", "EndpointSlice"): lambda ns: api_server if ns == API_SERVER_NAMESPACE else None,
            **{kind: children(list_fn, kind[1]) for kind, list_fn in (
                (("v1", "ServiceAccount"), clients.core.list_namespaced_service_account),
                (("v1", "ConfigMap"), clients.core.list_namespaced_config_map),
                (("rbac.authorization.k8s.io/v1", "Role"), clients.rbac.list_namespaced_role),
                (("rbac.authorization.k8s.io/v1", "RoleBinding"), clients.rbac.list_namespaced_role_binding),
                (("networking.k8s.io/v1", "NetworkPolicy"), clients.networking.list_namespaced_network_policy))}}


def children(list_fn: Any, kind: str) -> PerNamespace:
    """The operator's children of one kind, watched per namespace from the first read there: the runtime
    applies a child again only when the cached one differs from it (``Runtime._unchanged``)."""
    return PerNamespace(lambda ns: Informer(list_fn, ns, label_selector=CHILD_SELECTOR, name=f"{kind}s of {ns}"))


def attach(kwargs: dict[str, Any]) -> None:
    """kopf hands its indices to handlers only: the first handler call passes them on to the reader."""
    if PODS.index is None:
        PODS.index = kwargs.get("forge_pods")
    if JOBS.index is None:
        JOBS.index = kwargs.get("forge_jobs")


@kopf.on.event(GROUP, VERSION, TRAININGS)
def forgetraining_event(event: dict[str, Any], name: str, namespace: str, **kwargs: Any) -> None:
    attach(kwargs)
    runtime().on_event(Key(TRAINING, namespace, name), deleted=event.get("type") == "DELETED")


@kopf.on.event(GROUP, VERSION, EVALS)
def forgeeval_event(event: dict[str, Any], name: str, namespace: str, labels: dict[str, str], **kwargs: Any) -> None:
    attach(kwargs)
    runtime().on_event(Key(EVAL, namespace, name), deleted=event.get("type") == "DELETED")
    if training := labels.get(LABEL_TRAINING):  # a training's evaluation: the training mirrors its outcome
        runtime().enqueue(Key(TRAINING, namespace, training))


# A training's children carry its name in a label; their events reconcile the training.
CHILDREN = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_TRAINING: kopf.PRESENT}


@kopf.index("batch", "v1", "jobs", labels=CHILDREN)
def forge_jobs(body: kopf.Body, labels: dict[str, str], namespace: str, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_TRAINING]): slim(body)}


@kopf.index("", "v1", "pods", labels=CHILDREN)
def forge_pods(body: kopf.Body, labels: dict[str, str], namespace: str, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_TRAINING]): slim(body)}


@kopf.on.event("batch", "v1", "jobs", labels=CHILDREN)
def job_event(labels: dict[str, str], namespace: str, **kwargs: Any) -> None:
    attach(kwargs)
    runtime().enqueue(Key(TRAINING, namespace, labels[LABEL_TRAINING]))


@kopf.on.event("", "v1", "pods", labels=CHILDREN)
def pod_event(labels: dict[str, str], namespace: str, **kwargs: Any) -> None:
    attach(kwargs)
    runtime().enqueue(Key(TRAINING, namespace, labels[LABEL_TRAINING]))


# An evaluation's Job and pod carry its name in a label; their events reconcile the ForgeEval.
EVAL_CHILDREN = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_EVAL: kopf.PRESENT}


@kopf.on.event("batch", "v1", "jobs", labels=EVAL_CHILDREN)
def eval_job_event(labels: dict[str, str], namespace: str, **kwargs: Any) -> None:
    attach(kwargs)
    runtime().enqueue(Key(EVAL, namespace, labels[LABEL_EVAL]))


@kopf.on.event("", "v1", "pods", labels=EVAL_CHILDREN)
def eval_pod_event(labels: dict[str, str], namespace: str, **kwargs: Any) -> None:
    attach(kwargs)
    runtime().enqueue(Key(EVAL, namespace, labels[LABEL_EVAL]))
