"""The runtime's vocabulary, pure (no kubernetes client): keys, plans, apply outcomes, events,
builders of generic object parts, and the API's time format.

A planner returns a :class:`Plan` made of these values; the runtime carries it out and reports
what the API server made of the children as an :class:`ApplyOutcome`, a value (never a message
to parse back).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, Protocol

from ..api.names import ANNOTATION_APPLIED_DIGEST, LABEL_MANAGED_BY, TRAINER_GID, TRAINER_UID


# The longest message the operator writes into a status (a condition, a restart record) or an event; the
# API server's own words (a refusal, an eviction) can be far longer.
MESSAGE_LIMIT = 1024
TRUNCATED = " ... (truncated)"


def truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text``, cut to ``limit`` characters (its start, which names what happened) with a mark saying so."""
    return text if len(text) <= limit else text[:limit - len(TRUNCATED)] + TRUNCATED


@dataclass(frozen=True, order=True)
class Key:
    """What the runtime serialises on, requeues and forgets: one object of one kind. Two kinds may
    hold objects of the same name in the same namespace; they never share a lock or a timer."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True)
class Event:
    """A core/v1 Event on the reconciled object, posted once the status that explains it is stored."""

    type: str  # EventType
    reason: str
    message: str


@dataclass(frozen=True)
class Patch:
    """A JSON merge patch on an existing child (e.g. ``{"spec": {"suspend": true}}`` on a Job)."""

    api_version: str
    kind: str
    name: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Delete:
    """Delete a child; gone already is fine. ``grace_period_seconds=0`` deletes at once (force)."""

    api_version: str
    kind: str
    name: str
    grace_period_seconds: int | None = None
    propagation_policy: str | None = None  # Background: the garbage collector takes the dependents


@dataclass
class Plan:
    """Everything one reconcile decided: the new status, the children to server-side apply (in
    order), patches and deletions of existing children, events, and when to look again."""

    status: dict[str, Any]
    apply: list[dict[str, Any]] = field(default_factory=list)
    patch: list[Patch] = field(default_factory=list)
    delete: list[Delete] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # reconcile again after this many seconds even if nothing changes (controller-runtime's RequeueAfter)
    requeue_after: float | None = None

    def deleted(self, kind: str, *, force: bool | None = None) -> list[str]:
        """Names of the children of ``kind`` this plan deletes (``force``: only those deleted at once,
        or only those given their grace period)."""
        return [d.name for d in self.delete if d.kind == kind
                and (force is None or force == (d.grace_period_seconds == 0))]

    def applies(self, kind: str) -> list[dict[str, Any]]:
        return [c for c in self.apply if c["kind"] == kind]


@dataclass(frozen=True)
class ChildRef:
    kind: str
    name: str


@dataclass(frozen=True)
class ChildRejected:
    """The API server refused a child (400/422): the child, and the API server's own words."""

    kind: str
    name: str
    message: str

    def describe(self) -> str:
        return f"the API server refused {self.kind} {self.name}: {self.message}"


@dataclass(frozen=True)
class ChildConflict:
    """An object of a child's name exists and is not ours (``why``): it was left untouched."""

    kind: str
    name: str
    why: str


@dataclass(frozen=True)
class ApplyOutcome:
    """What became of a plan's children: those accepted, in order, and the first one refused or found
    to be someone else's object (children after it are not applied)."""

    accepted: tuple[ChildRef, ...] = ()
    rejected: ChildRejected | None = None
    conflict: ChildConflict | None = None

    def accepted_a(self, kind: str) -> bool:
        return any(c.kind == kind for c in self.accepted)


class NotServed(Exception):
    """The API server does not serve this kind (its CRD is not installed, e.g. Kueue's)."""


class NotAllowed(Exception):
    """The operator may not read this object (RBAC answered 403)."""


class Reader(Protocol):
    """Reading objects of any kind, as plain dicts (what ``kubectl get -o json`` shows)."""

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The object, or None if it does not exist; raises NotAllowed without RBAC to read it and
        NotServed when the API server does not serve the kind."""
        ...

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str = "",
             field_selector: str = "") -> list[dict[str, Any]]:
        """The objects that match both selectors; raises NotAllowed without RBAC to list them."""
        ...


class Reconciler(Protocol):
    """One kind, as the runtime drives it: observe and plan (pure but for ``reader``), then learn
    what became of the plan's children, then see the stored status."""

    api_version: str
    kind: str
    plural: str

    def plan(self, obj: dict[str, Any], reader: Reader, now: datetime) -> Plan: ...

    def after_apply(self, plan: Plan, old_status: dict[str, Any], outcome: ApplyOutcome, now: datetime) -> None:
        """Record the outcome (e.g. a refused child) in ``plan.status`` and ``plan.events``."""
        ...

    def after_write(self, key: Key, status: dict[str, Any]) -> None:
        """The status is stored (e.g. mirror it into metrics)."""
        ...


# --------------------------------------------------------------------------- builders
# Forge's pods (training workers, evaluators) pass the Pod Security Standard `restricted` (docs/install.md,
# "Pod Security"). They run as the trainer image's user (uid/gid 10001) whatever image the spec names; volumes are group-writable
# by it, their ownership changed only when a volume's root does not match, not file by file on every
# mount. The root filesystem stays writable: torchrun and torch.compile write under /tmp and $HOME.
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_GID,
    "fsGroup": TRAINER_GID, "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
}


def owner_reference(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    """The controller reference of a child: the garbage collector removes it with its owner."""
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True,
            "blockOwnerDeletion": True}


def object_meta(name: str, namespace: str, labels: dict[str, str],
                owner: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return meta


def event_body(obj: dict[str, Any], event: Event, component: str, instance: str, now: datetime) -> dict[str, Any]:
    """A core/v1 Event about ``obj``, as ``kubectl describe`` and ``kubectl get events`` show them."""
    meta = obj["metadata"]
    when = ts(now)
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid")},
        "type": str(event.type), "reason": str(event.reason), "message": truncate(event.message),
        "source": {"component": component}, "reportingComponent": component,
        "reportingInstance": instance, "firstTimestamp": when, "lastTimestamp": when, "count": 1,
    }


# --------------------------------------------------------------------------- readers of any object
def ts(t: datetime) -> str:
    """metav1.Time: RFC 3339 in UTC, to the second."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t.tzinfo else t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def labels_of(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"].get("labels") or {}


def annotations_of(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"].get("annotations") or {}


def deleting(obj: dict[str, Any]) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def not_ours(existing: dict[str, Any], child: dict[str, Any]) -> str | None:
    """Why an existing object of a child's name is not that child, or None when it is: ours names every
    owner the child names (by uid) and carries the child's managed-by label."""
    owners = {r.get("uid") for r in existing["metadata"].get("ownerReferences") or []}
    why = [f"no owner reference to {r['kind']} {r['name']}"
           for r in child["metadata"].get("ownerReferences") or [] if r.get("uid") not in owners]
    label = labels_of(child).get(LABEL_MANAGED_BY)
    if label is not None and labels_of(existing).get(LABEL_MANAGED_BY) != label:
        why.append(f"not labelled {LABEL_MANAGED_BY}={label}")
    return ", ".join(why) or None


def with_digest(child: dict[str, Any]) -> dict[str, Any]:
    """The child with a digest of its content in an annotation: the object applied from it says what it was
    applied from."""
    body = json.dumps(child, sort_keys=True, default=str).encode()
    meta = child["metadata"]
    annotations = (meta.get("annotations") or {}) | {ANNOTATION_APPLIED_DIGEST: hashlib.sha256(body).hexdigest()[:16]}
    return {**child, "metadata": {**meta, "annotations": annotations}}


def unchanged(live: dict[str, Any], child: dict[str, Any]) -> bool:
    """Whether applying ``child`` (with its digest) onto ``live`` would change nothing: ``live`` was applied from
    the same content (the digests agree) and still holds every value the child sets (no one changed them
    since; the API server's defaults and other managers' fields aside)."""
    digest = annotations_of(child).get(ANNOTATION_APPLIED_DIGEST)
    content = {k: v for k, v in child.items() if k not in ("apiVersion", "kind")}  # a LIST's items lack them
    return digest is not None and annotations_of(live).get(ANNOTATION_APPLIED_DIGEST) == digest and holds(live, content)


def holds(live: Any, wanted: Any) -> bool:
    """``wanted`` is part of ``live``: every key of a mapping with a value ``live`` holds, lists item by item."""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(k in live and holds(live[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(live, list) and len(live) == len(wanted) and all(map(holds, live, wanted))
    return live == wanted


def owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    """Whether ``obj`` names ``owner`` (by uid) among its owners; an owner without a uid owns all."""
    uid = owner["metadata"].get("uid")
    return uid is None or any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])
