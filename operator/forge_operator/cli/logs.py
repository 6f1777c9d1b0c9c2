"""`forge logs` and `forge events`: a training's worker logs and its story, found as kubectl finds them.

``forge logs NAME`` prints the log of the newest attempt's rank-0 worker (``--rank`` for another node,
``-f`` to follow, ``--tail``, ``--previous`` for the container's previous run), like ``kubectl logs``
on the right pod. ``forge events NAME`` lists the Events of the training and of its children (Jobs,
pods, Services), oldest first, like the Events section of ``kubectl describe``.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime, timezone
from typing import Any

from ..api.names import CONTAINER_NAME, LABEL_ATTEMPT, LABEL_MANAGED_BY, LABEL_TRAINING, MANAGED_BY
from .cluster import CliError, api_errors, connect, refused

JOB_INDEX = "batch.kubernetes.io/job-completion-index"
EVENT_COLUMNS = ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]


def _core(kubeconfig: str | None, context: str | None, namespace: str | None) -> tuple[Any, str]:
    import kubernetes

    client, default_namespace = connect(kubeconfig, context)
    return kubernetes.client.CoreV1Api(client), namespace or default_namespace


def _attempt(pod: Any) -> int:
    try:
        return int((pod.metadata.labels or {}).get(LABEL_ATTEMPT, "0"))
    except ValueError:
        return 0


def worker_pod(core: Any, name: str, namespace: str, rank: int) -> Any:
    """The pod of node rank ``rank`` in the training's newest attempt."""
    selector = f"{LABEL_TRAINING}={name},{LABEL_MANAGED_BY}={MANAGED_BY}"
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    except api_errors() as e:
        raise refused(e) from e
    if not pods:
        raise CliError(f'forgetraining "{name}" has no worker pods in namespace "{namespace}" '
                       "(not started, queued, or already cleaned up)")
    newest = max(_attempt(p) for p in pods)
    at_rank = [p for p in pods if _attempt(p) == newest
               and (p.metadata.annotations or {}).get(JOB_INDEX) == str(rank)]
    if not at_rank:
        raise CliError(f'forgetraining "{name}" has no worker of rank {rank} in its attempt {newest}')
    # a Job may have replaced a failed pod of the same index: the newest one
    return max(at_rank, key=lambda p: p.metadata.creation_timestamp)


def show_logs(name: str, namespace: str | None, *, rank: int = 0, follow: bool = False, tail: int | None = None,
              previous: bool = False, kubeconfig: str | None = None, context: str | None = None) -> int:
    try:
        core, namespace = _core(kubeconfig, context, namespace)
        pod = worker_pod(core, name, namespace, rank)
        args = {"container": CONTAINER_NAME, "previous": previous, "_preload_content": False}
        if tail is not None:
            args["tail_lines"] = tail
        try:
            if follow:
                args["follow"] = True
            response = core.read_namespaced_pod_log(pod.metadata.name, namespace, **args)
            for chunk in response.stream(4096):
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
        except api_errors() as e:
            raise CliError(f"no log from pod {pod.metadata.name}: {refused(e)}") from e
    except CliError as e:
        print(f"forge logs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _ago(t: datetime | None, now: datetime) -> str:
    if t is None:
        return "<unknown>"
    s = max(0, int((now - t).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _when(e: Any) -> datetime | None:
    return e.last_timestamp or e.event_time or e.first_timestamp or e.metadata.creation_timestamp


def training_events(core: Any, name: str, namespace: str) -> list[Any]:
    """Events of the training and of the children named after it, oldest first."""
    try:
        events = core.list_namespaced_event(namespace).items
    except api_errors() as e:
        raise refused(e) from e
    # the children's names (training/children.py): the Service <name>, one Job <name>-r<attempt> per
    # attempt, its pods <name>-r<attempt>-<index>-<suffix>
    child = {"Service": re.compile(re.escape(name)), "Job": re.compile(rf"{re.escape(name)}-r\d+"),
             "Pod": re.compile(rf"{re.escape(name)}-r\d+-\d+-[a-z0-9]+")}
    ours = [e for e in events if (e.involved_object.kind == "ForgeTraining" and e.involved_object.name == name)
            or (e.involved_object.kind in child and child[e.involved_object.kind].fullmatch(e.involved_object.name or ""))]
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(ours, key=lambda e: _when(e) or epoch)


def show_events(name: str, namespace: str | None, *, kubeconfig: str | None = None,
                context: str | None = None) -> int:
    try:
        core, namespace = _core(kubeconfig, context, namespace)
        events = training_events(core, name, namespace)
    except CliError as e:
        print(f"forge events: {e}", file=sys.stderr)
        return 1
    if not events:
        print(f'No events found for forgetraining "{name}" in namespace {namespace}.', file=sys.stderr)
        return 0
    now = datetime.now(timezone.utc)
    rows = [EVENT_COLUMNS] + [[_ago(_when(e), now), e.type or "", e.reason or "",
                               f"{e.involved_object.kind.lower()}/{e.involved_object.name}",
                               " ".join((e.message or "").split())] for e in events]
    widths = [max(len(r[i]) for r in rows) for i in range(len(EVENT_COLUMNS) - 1)]
    for r in rows:
        print("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip())
    return 0
