"""Reads served from memory: the children kopf's watches keep in its indices, and the Nodes one watch keeps.

The operator's watches of Pods and Jobs are limited on the API server by a label selector to the objects
it made (``settings.watching.label_selectors``), and kopf keeps them in indices keyed by (namespace, owner
name), filled before any handler runs. :class:`CachedReader` answers the planners' ``list`` of those kinds
from the index (no request), ``get`` and ``list`` of Nodes from :class:`NodeInformer` (one watch for the
whole process, no request per node), and passes every other read to the API (e.g. a Job's FailedCreate events,
read only while it lacks pods).
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


class NodeInformer:
    """Every Node, kept by one list and watch (a relist when the watch's resourceVersion expires). Without
    RBAC to list Nodes it gives up and says so: the planners then see no node, as before."""

    def __init__(self, list_nodes: Callable[..., Any], *, slim_node: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 watch_timeout: int = 300) -> None:
        self._list = list_nodes
        self._slim = slim_node or slim_node_body
        self._timeout = watch_timeout
        self._nodes: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.allowed = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> NodeInformer:
        self._thread = threading.Thread(target=self._run, name="forge-node-informer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def get(self, name: str) -> dict[str, Any] | None:
        if not self.allowed:
            raise NotAllowed("nodes: the operator may not list them")
        with self._lock:
            return self._nodes.get(name)

    def list(self, terms: dict[str, str | None]) -> list[dict[str, Any]]:
        """Every Node whose labels match ``terms``."""
        if not self.allowed:
            raise NotAllowed("nodes: the operator may not list them")
        with self._lock:
            nodes = list(self._nodes.values())
        return [n for n in nodes if matches(n, terms)]

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                rv = self._relist()
                w = watch.Watch()
                for ev in w.stream(self._list, resource_version=rv, timeout_seconds=self._timeout,
                                   allow_watch_bookmarks=True):
                    if self._stop.is_set():
                        w.stop()
                        return
                    self._on(ev["type"], ev["raw_object"])
            except ApiException as e:
                if e.status == 403:
                    self.allowed = False
                    self.ready.set()
                    log.warning("nodes are not readable (403): node failures are not watched")
                    return
                if e.status != 410:  # 410 Gone: the resourceVersion expired, relist
                    log.warning("node watch failed (%s); listing again", e.reason)
                    self._stop.wait(2.0)
            except Exception:
                log.exception("node watch failed; listing again")
                self._stop.wait(2.0)

    def _relist(self) -> str:
        found = self._list(_preload_content=False)
        body = json.loads(found.data)
        nodes = {n["metadata"]["name"]: self._slim(n) for n in body.get("items") or []}
        with self._lock:
            self._nodes = nodes
        self.ready.set()
        return body["metadata"]["resourceVersion"]

    def _on(self, kind: str, node: dict[str, Any]) -> None:
        if kind == "BOOKMARK":
            return
        if kind == "ERROR":
            raise ApiException(status=node.get("code") or 500, reason=node.get("message"))
        name = node["metadata"]["name"]
        with self._lock:
            if kind == "DELETED":
                self._nodes.pop(name, None)
            else:
                self._nodes[name] = self._slim(node)


def slim_node_body(node: dict[str, Any]) -> dict[str, Any]:
    """What the planners read of a Node: its name, labels, taints, conditions and allocatable resources (not
    its images or addresses)."""
    meta, status = node["metadata"], node.get("status") or {}
    return {"metadata": {"name": meta["name"], "labels": meta.get("labels") or {}},
            "spec": {k: v for k, v in (node.get("spec") or {}).items() if k in ("unschedulable", "taints")},
            "status": {"conditions": status.get("conditions") or [], "allocatable": status.get("allocatable") or {}}}


NODE = ("v1", "Node")


class CachedReader:
    """A :class:`~.objects.Reader` that answers from the caches what they hold, and asks ``api`` the rest."""

    def __init__(self, api: Reader, kinds: dict[tuple[str, str], IndexedKind],
                 nodes: NodeInformer | None = None, wait_for_nodes: float = 30.0) -> None:
        self.api, self.kinds, self.nodes, self.wait_for_nodes = api, kinds, nodes, wait_for_nodes

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        if (api_version, kind) == NODE and self._nodes_ready():
            return self.nodes.get(name)
        return self.api.get(api_version, kind, name, namespace)

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str = "",
             field_selector: str = "") -> list[dict[str, Any]]:
        if (api_version, kind) == NODE and not field_selector and self._nodes_ready() and \
                (terms := parse_selector(label_selector)) is not None:
            return self.nodes.list(terms)
        cached = self.kinds.get((api_version, kind))
        terms = parse_selector(label_selector) if cached is not None and not field_selector else None
        if cached is not None and terms is not None:
            found = cached.list(namespace, terms)
            if found is not None:
                return found
        return self.api.list(api_version, kind, namespace, label_selector, field_selector)

    def _nodes_ready(self) -> bool:
        return self.nodes is not None and self.nodes.ready.wait(self.wait_for_nodes)
