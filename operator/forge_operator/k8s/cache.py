"""Reads served from memory: the children kopf's watches keep in its indices, and what the operator's own
informers keep (Nodes; the API server's EndpointSlices; the Services of the namespaces trainings name).

The operator's watches of Pods and Jobs are limited on the API server by a label selector to the objects
it made (``settings.watching.label_selectors``), and kopf keeps them in indices keyed by (namespace, owner
name), filled before any handler runs. :class:`CachedReader` answers the planners' ``list`` of those kinds
from the index (no request), reads of a kind an :class:`Informer` keeps from it (one watch each, no request
per read), and passes every other read to the API (e.g. a Job's FailedCreate events, read only while it
lacks pods).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubernetes.client.rest import ApiException

from .objects import NotAllowed, Reader, labels_of

log = logging.getLogger("forge.operator")

# A store of kopf's index: an iterable of the objects of one key.
Store = Iterable[dict[str, Any]]


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of a watched object without its managedFields (the largest part nobody reads)."""
    obj = {k: v for k, v in body.items() if k != "metadata"}
    obj["metadata"] = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    return obj


def snapshot(store: Store) -> list[dict[str, Any]]:
    """The objects of a store, copied while kopf's event loop may be replacing them."""
    for _ in range(5):
        try:
            return list(store)
        except RuntimeError:  # changed size during iteration: try again
            time.sleep(0)
    return list(store)


def parse_selector(selector: str) -> dict[str, str | None] | None:
    """``a=b,c`` as {a: b, c: None} (None: the label exists); None for anything else (``!=``, ``in``)."""
    terms: dict[str, str | None] = {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if any(op in term for op in ("!", " in ", " notin ", "(")):
            return None
        key, eq, value = term.partition("=")
        terms[key.strip()] = value.strip().lstrip("=") if eq else None
    return terms


def matches(obj: dict[str, Any], terms: dict[str, str | None]) -> bool:
    labels = labels_of(obj)
    return all(k in labels if v is None else labels.get(k) == v for k, v in terms.items())


class IndexedKind:
    """One kind kept in a kopf index keyed by (namespace, the value of ``label``)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.index: Mapping[tuple[str, str], Store] | None = None  # set when kopf hands it to a handler

    def list(self, namespace: str, terms: dict[str, str | None]) -> list[dict[str, Any]] | None:
        """The objects matching ``terms``; None when this index cannot answer (not attached yet, or the
        selector does not name one owner)."""
        value = terms.get(self.label)
        if self.index is None or value is None:
            return None
        key = (namespace, value)
        store = self.index[key] if key in self.index else ()
        return [o for o in snapshot(store) if matches(o, terms)]


class Informer:
    """The objects one list function returns (a kind, maybe limited to a namespace and a label selector), kept
    by one list and watch (a relist when the watch's resourceVersion expires), keyed by namespace and name.
    Without RBAC to list them it gives up and says so (``allowed`` False): reads then raise NotAllowed, as
    the API would."""

    def __init__(self, list_fn: Callable[..., Any], *args: Any, slim_body: Callable[[dict[str, Any]], dict[str, Any]] = slim,
                 label_selector: str = "", watch_timeout: int = 300, name: str = "objects") -> None:
        self._list, self._args, self._slim, self._timeout, self.name = list_fn, args, slim_body, watch_timeout, name
        self._kwargs = {"label_selector": label_selector} if label_selector else {}
        self.terms = parse_selector(label_selector) or {}
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.allowed = True
        self._stop = threading.Event()

    def start(self) -> Informer:
        threading.Thread(target=self._run, name=f"forge-informer-{self.name}", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def covers(self, terms: dict[str, str | None]) -> bool:
        """Whether a read with these label terms is answered in full by this cache (its own selector is
        part of them)."""
        return all(k in terms and terms[k] == v for k, v in self.terms.items())

    def get(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        self._check()
        with self._lock:
            return self._objects.get((namespace or "", name))

    def list(self, terms: dict[str, str | None], namespace: str = "") -> list[dict[str, Any]]:
        """The objects (of ``namespace``, if given) whose labels match ``terms``."""
        self._check()
        with self._lock:
            objects = [o for (ns, _), o in self._objects.items() if not namespace or ns == namespace]
        return [o for o in objects if matches(o, terms)]

    def _check(self) -> None:
        if not self.allowed:
            raise NotAllowed(f"{self.name}: the operator may not list them")

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                rv = self._relist()
                w = watch.Watch()
                for ev in w.stream(self._list, *self._args, resource_version=rv, timeout_seconds=self._timeout,
                                   allow_watch_bookmarks=True, **self._kwargs):
                    if self._stop.is_set():
                        w.stop()
                        return
                    self._on(ev["type"], ev["raw_object"])
            except ApiException as e:
                if e.status == 403:
                    self.allowed = False
                    self.ready.set()
                    log.warning("%s are not readable (403): the operator does without them", self.name)
                    return
                if e.status != 410:  # 410 Gone: the resourceVersion expired, relist
                    log.warning("%s watch failed (%s); listing again", self.name, e.reason)
                    self._stop.wait(2.0)
            except Exception:
                log.exception("%s watch failed; listing again", self.name)
                self._stop.wait(2.0)

    def _relist(self) -> str:
        found = self._list(*self._args, _preload_content=False, **self._kwargs)
        body = json.loads(found.data)
        objects = {_key(o): self._slim(o) for o in body.get("items") or []}
        with self._lock:
            self._objects = objects
        self.ready.set()
        return body["metadata"]["resourceVersion"]

    def _on(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "BOOKMARK":
            return
        if kind == "ERROR":
            raise ApiException(status=obj.get("code") or 500, reason=obj.get("message"))
        with self._lock:
            if kind == "DELETED":
                self._objects.pop(_key(obj), None)
            else:
                self._objects[_key(obj)] = self._slim(obj)


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["metadata"].get("namespace") or "", obj["metadata"]["name"]


class PerNamespace:
    """One :class:`Informer` per namespace, started on the first read there (e.g. the Services of the
    namespaces that trainings name in their reward URLs, not every Service of the cluster)."""

    def __init__(self, make: Callable[[str], Informer]) -> None:
        self._make = make
        self._informers: dict[str, Informer] = {}
        self._lock = threading.Lock()

    def __call__(self, namespace: str | None) -> Informer | None:
        if not namespace:
            return None
        with self._lock:
            if namespace not in self._informers:
                self._informers[namespace] = self._make(namespace).start()
            return self._informers[namespace]

    def stop(self) -> None:
        with self._lock:
            for informer in self._informers.values():
                informer.stop()


def slim_node_body(node: dict[str, Any]) -> dict[str, Any]:
    """What the planners read of a Node: its name, labels, taints, conditions and allocatable resources (not
    its images or addresses)."""
    meta, status = node["metadata"], node.get("status") or {}
    return {"metadata": {"name": meta["name"], "labels": meta.get("labels") or {}},
            "spec": {k: v for k, v in (node.get("spec") or {}).items() if k in ("unschedulable", "taints")},
            "status": {"conditions": status.get("conditions") or [], "allocatable": status.get("allocatable") or {}}}


# the caches that answer reads of a kind: the informer that holds a namespace's objects (or the cluster's,
# for namespace ""), or None where no cache does
Watched = Callable[[str | None], Informer | None]


class CachedReader:
    """A :class:`~.objects.Reader` that answers from the caches what they hold, and asks ``api`` the rest."""

    def __init__(self, api: Reader, kinds: dict[tuple[str, str], IndexedKind],
                 watched: dict[tuple[str, str], Watched] | None = None, wait_for_cache: float = 30.0) -> None:
        self.api, self.kinds, self.watched, self.wait_for_cache = api, kinds, watched or {}, wait_for_cache

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        informer = self._informer(api_version, kind, namespace, {})
        if informer is not None:
            return informer.get(name, namespace)
        return self.api.get(api_version, kind, name, namespace)

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str = "",
             field_selector: str = "") -> list[dict[str, Any]]:
        terms = parse_selector(label_selector) if not field_selector else None
        if terms is not None and (informer := self._informer(api_version, kind, namespace, terms)) is not None:
            return informer.list(terms, namespace)
        cached = self.kinds.get((api_version, kind))
        if cached is not None and terms is not None:
            found = cached.list(namespace, terms)
            if found is not None:
                return found
        return self.api.list(api_version, kind, namespace, label_selector, field_selector)

    def cached(self, api_version: str, kind: str, name: str, namespace: str | None = None,
               labels: dict[str, str] | None = None) -> dict[str, Any] | None:
        """The object as a cache holds it, without asking the API; None: no cache holds it (yet). A kind kept
        in a kopf index is found by the value of the index's label among ``labels`` (the object's own)."""
        indexed = self.kinds.get((api_version, kind))
        if indexed is not None:
            value = (labels or {}).get(indexed.label)
            found = indexed.list(namespace or "", {indexed.label: value}) if value is not None else None
            return next((o for o in found or () if o["metadata"]["name"] == name), None)
        watched = self.watched.get((api_version, kind))
        informer = watched(namespace) if watched is not None else None
        if informer is None or not informer.allowed or not informer.ready.is_set():
            return None
        return informer.get(name, namespace)

    def _informer(self, api_version: str, kind: str, namespace: str | None,
                  terms: dict[str, str | None]) -> Informer | None:
        """The informer that answers this read in full, once it has listed; None: ask the API."""
        watched = self.watched.get((api_version, kind))
        informer = watched(namespace) if watched is not None else None
        if informer is None or not informer.covers(terms) or not informer.ready.wait(self.wait_for_cache):
            return None
        return informer
