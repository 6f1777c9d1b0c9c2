"""The reconciler runtime: the same loop for every kind, keyed by (kind, namespace, name).

Every trigger (the object changed, one of its children changed, or a requeue timer fired) runs
``reconcile(key)``: read the object, let its kind's :class:`Reconciler`
observe and plan, write the status if it changed (the plan's decisions are recorded before
anything acts on them), server-side apply the children under one field manager, patch and delete
what the plan says, then post the events that the stored status explains.

Triggers go through a work queue (``workqueue.py``) read by a few worker threads, once ``start`` has
made them (before that, by the thread that adds the key): a key waits in the queue once however many
events arrive for it meanwhile, and no two threads reconcile one object at a time. A reconcile that
raises is logged and tried again after the resync interval. Requeue timers run outside kopf: with
peering, a timer first checks that no live peer outranks this replica.
"""

from __future__ import annotations

import copy
import json
import logging
import socket
import threading
import time
from datetime import datetime
from typing import Any

from kubernetes.client.rest import ApiException

from . import metrics
from .clients import Clients
from .objects import (
    ApplyOutcome, ChildConflict, ChildRef, ChildRejected, Key, Plan, Reader, Reconciler, event_body, not_ours, unchanged,
    utcnow, with_digest,
)
from .peering import Peering, standing_by
from .workqueue import WorkQueue, start_workers

log = logging.getLogger("forge.operator")

REPLAN_SECONDS = 0.2  # after a 409 on the status: plan again from a fresh read


class Runtime:
    """Drives the registered kinds. Thread-safe: kopf's handler threads and the timers share it."""

    def __init__(self, clients: Clients | None, reconcilers: list[Reconciler], *, field_manager: str,
                 resync_seconds: float = 15.0, peering: Peering | None = None,
                 instance: str | None = None, reader: Reader | None = None) -> None:
        self.clients = clients
        # what the planners read through: the API itself, or caches in front of it (``cache.CachedReader``)
        self.reader: Reader | None = reader or clients
        self.kinds: dict[str, Reconciler] = {r.kind: r for r in reconcilers}
        self.field_manager = field_manager
        self.resync_seconds = resync_seconds
        self.peering = peering
        self.instance = instance or socket.gethostname()
        self._timers: dict[Key, threading.Timer] = {}
        self._timers_lock = threading.Lock()
        # per object, the uids of the children last applied (known to be ours): applied again with the uid
        # as a precondition, without reading them first
        self._ours: dict[Key, dict[ChildRef, str]] = {}
        self._phases = metrics.PhaseCounts()
        self._queue = WorkQueue()
        self._started = False

    def start(self, workers: int) -> None:
        """Reconcile from now on in ``workers`` threads fed by the work queue (before, each trigger
        reconciles in the thread that adds it)."""
        self._started = True
        start_workers(self._queue, workers, self.reconcile_or_retry)

    # ------------------------------------------------------------------ triggers
    def on_event(self, key: Key, deleted: bool = False) -> None:
        """An event of the object itself: a deletion forgets the key, anything else reconciles."""
        if deleted:
            self.forget(key)
        else:
            self.enqueue(key)

    def enqueue(self, key: Key, urgent: bool = True) -> None:
        """A trigger: the key joins the work queue and the call returns at once. Events are urgent; a
        requeue timer's key waits behind them. Without worker threads the caller reconciles what is
        queued, except a key another thread is reconciling: that thread reconciles it once more."""
        self._queue.add(key, urgent)
        if not self._started:
            while (queued := self._queue.get(wait=False)) is not None:
                try:
                    self.reconcile_or_retry(queued)
                finally:
                    self._queue.done(queued)

    def reconcile_or_retry(self, key: Key) -> None:
        """A reconcile that raises (API server unavailable, a conflict, a bug) is logged and tried again
        after the resync interval, so no object is left behind."""
        started = time.monotonic()
        try:
            self.reconcile(key)
        except Exception as e:
            metrics.finished(key.kind, started, e)
            log.exception("reconcile failed; retrying in %.0fs", self.resync_seconds, extra=_ref(key))
            self.requeue(key, max(1.0, self.resync_seconds))
        else:
            metrics.finished(key.kind, started)

    def reconcile(self, key: Key) -> Plan | None:
        """Converge one object; safe to call any number of times, one call per object at a time (the work
        queue hands a key to one thread at a time)."""
        kind = self.kinds[key.kind]
        obj = self.clients.get_custom(kind.api_version, kind.plural, key.namespace, key.name)
        if obj is None:
            self.forget(key)
            return None
        if obj["metadata"].get("deletionTimestamp"):
            return None
        now = utcnow()
        plan = kind.plan(obj, self.reader, now)
        if self._execute(kind, key, obj, plan, now) and plan.requeue_after is not None:
            self.requeue(key, plan.requeue_after)
        return plan

    # ------------------------------------------------------------------ acting on a plan
    def _execute(self, kind: Reconciler, key: Key, obj: dict[str, Any], plan: Plan, now: datetime) -> bool:
        """Carry out a plan. The status is written first: it records the decisions (a restart, its count)
        before anything acts on them, so an operator killed half-way resumes the same attempt and never
        repeats or forgets one. Returns False when the plan was dropped for a newer read."""
        c = self.clients
        old_status = obj.get("status") or {}
        rv: str | None = obj["metadata"]["resourceVersion"]
        written = old_status
        if plan.status != old_status:
            rv = c.replace_status(kind.plural, obj, plan.status, rv)
            if rv is None:
                self.requeue(key, REPLAN_SECONDS)
                return False
            written = copy.deepcopy(plan.status)
        stored_events = list(plan.events)  # these describe the status just written
        outcome = self._apply(key, plan.apply)
        kind.after_apply(plan, old_status, outcome, now)
        for patch in plan.patch:
            c.patch(key.namespace, patch, self.field_manager)
        for delete in plan.delete:
            c.delete(key.namespace, delete)
        stored = True
        if plan.status != written:
            stored = c.replace_status(kind.plural, obj, plan.status, rv) is not None
        for event in plan.events if stored else stored_events:  # only what a stored status says
            self.post_event(obj, event)
        if not stored:  # what the outcome changed is planned again from a fresh read
            self.requeue(key, REPLAN_SECONDS)
            return False
        old_phase, phase = old_status.get("phase"), plan.status.get("phase")
        if phase != old_phase:
            log.info("phase %s -> %s", old_phase or "(none)", phase, extra=_ref(key, decision="phase", phase=phase))
        self._phases.set(key, key.kind, phase)
        kind.after_write(key, plan.status)
        return True

    def _apply(self, key: Key, children: list[dict[str, Any]]) -> ApplyOutcome:
        """Server-side apply in order, only onto objects that are ours. The first child the API server
        refuses (400, 422: built from the user's free-form fields), or whose name an object that is not
        ours holds (never modified), ends the apply and is returned as a value."""
        accepted: list[ChildRef] = []
        known, ours = self._ours.get(key, {}), {}
        try:
            for child in children:
                ref = ChildRef(child["kind"], child["metadata"]["name"])
                try:
                    applied = self._apply_ours(with_digest(child), known.get(ref))
                except ApiException as e:
                    if e.status not in (400, 422):
                        raise
                    return ApplyOutcome(tuple(accepted), ChildRejected(ref.kind, ref.name, _api_message(e)))
                if isinstance(applied, ChildConflict):
                    return ApplyOutcome(tuple(accepted), conflict=applied)
                ours[ref] = applied
                accepted.append(ref)
            return ApplyOutcome(tuple(accepted))
        finally:
            self._ours[key] = ours

    def _apply_ours(self, child: dict[str, Any], uid: str | None) -> str | ChildConflict:
        """Apply one child onto the object of its name if that is ours, or create it; its uid, or why the
        object of its name is not ours. A child applied before is applied with its uid as a
        precondition: one request while it stays the same object. Otherwise it is read first, and
        applied with the uid read (so an object replaced in between is refused, not taken over), or
        created without forcing (an object someone made in between conflicts instead)."""
        c, meta = self.clients, child["metadata"]
        if uid is not None and self._unchanged(child, uid):
            return uid
        if uid is not None:
            try:
                return c.apply(_with_uid(child, uid), self.field_manager)
            except ApiException as e:
                if not _uid_mismatch(e):
                    raise  # else: deleted, or replaced by another object; read it
        existing = c.get(child["apiVersion"], child["kind"], meta["name"], meta.get("namespace"))
        if existing is None:
            try:
                return c.apply(child, self.field_manager, force=False)
            except ApiException as e:
                if e.status != 409:
                    raise
                existing = c.get(child["apiVersion"], child["kind"], meta["name"], meta.get("namespace"))
                if existing is None:
                    raise
        why = not_ours(existing, child)
        if why is not None:
            return ChildConflict(child["kind"], meta["name"], why)
        return c.apply(_with_uid(child, existing["metadata"]["uid"]), self.field_manager)

    def _unchanged(self, child: dict[str, Any], uid: str) -> bool:
        """The child, as a cache in front of the API holds it, is the object applied before and would not
        change (no request: a cache that does not hold it answers no)."""
        cached = getattr(self.reader, "cached", None)
        meta = child["metadata"]
        live = cached(child["apiVersion"], child["kind"], meta["name"], meta.get("namespace"),
                      labels=meta.get("labels")) if cached else None
        return live is not None and live["metadata"].get("uid") == uid and unchanged(live, child)

    def post_event(self, obj: dict[str, Any], event) -> None:
        """Posted with the API client (not kopf.event) so reconciles started by a requeue timer, outside
        any kopf handler, report too. An event that cannot be posted is logged, never fatal."""
        meta = obj["metadata"]
        log.log(logging.WARNING if event.type == "Warning" else logging.INFO, "%s: %s", event.reason, event.message,
                extra=_ref(Key(obj["kind"], meta["namespace"], meta["name"]), decision="event", reason=event.reason))
        try:
            self.clients.create_event(meta["namespace"],
                                      event_body(obj, event, self.field_manager, self.instance, utcnow()))
        except ApiException as e:
            log.warning("event %s on %s/%s not posted: %s", event.reason, meta["namespace"], meta["name"], e.reason)

    # ------------------------------------------------------------------ requeue timers
    def requeue(self, key: Key, delay: float) -> None:
        """Reconcile ``key`` again after ``delay`` seconds; a later requeue of the same key replaces it."""

        def fire() -> None:
            with self._timers_lock:
                if self._timers.get(key) is timer:
                    del self._timers[key]
                metrics.REQUEUES_PENDING.set(len(self._timers))
            try:
                if standing_by(self.clients, self.peering, key.namespace):
                    # a paused replica stands down; the active one has its own timers, and kopf replays
                    # every object through the handlers if this replica becomes active again
                    return
            except Exception:
                log.exception("peering check for %s failed", key)
            self.enqueue(key, urgent=False)

        with self._timers_lock:
            old = self._timers.get(key)
            timer = threading.Timer(max(0.0, delay), fire)
            timer.daemon = True
            if old is not None:
                old.cancel()
            self._timers[key] = timer
            metrics.REQUEUES_PENDING.set(len(self._timers))
            timer.start()

    def forget(self, key: Key) -> None:
        """The object is gone: its timer and what is known of its children go."""
        self._ours.pop(key, None)
        self._phases.set(key, key.kind, None)
        with self._timers_lock:
            timer = self._timers.pop(key, None)
            metrics.REQUEUES_PENDING.set(len(self._timers))
        if timer is not None:
            timer.cancel()

    def pending(self) -> list[Key]:
        """The keys with a requeue timer set, sorted."""
        with self._timers_lock:
            return sorted(self._timers)

    def close(self) -> None:
        self._queue.close()
        for key in self.pending():
            self.forget(key)


def _ref(key: Key, **fields: Any) -> dict[str, Any]:
    """``extra`` of a log record about one object: kopf's JSON log format puts ``k8s_ref`` under
    ``object``, and every other field at the top level (the decision, its reason)."""
    return {"k8s_ref": {"kind": key.kind, "namespace": key.namespace, "name": key.name}, **fields}


def _with_uid(child: dict[str, Any], uid: str) -> dict[str, Any]:
    return {**child, "metadata": {**child["metadata"], "uid": uid}}


def _uid_mismatch(err: ApiException) -> bool:
    """The apply's uid precondition failed: the object is gone (409 "uid mismatch") or another object holds
    the name (422, metadata.uid is immutable)."""
    return err.status in (409, 422) and "uid" in _api_message(err)


def _api_message(err: ApiException) -> str:
    try:
        return json.loads(err.body or "{}").get("message") or err.reason
    except ValueError:
        return err.body or err.reason
