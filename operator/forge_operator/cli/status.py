"""`forge status`: trainings and their progress, the way `kubectl get` finds and shows them.

The cluster and namespace follow kubectl's rules (``cli/cluster.py``); ``-A`` lists every namespace
and ``-w`` goes on printing each change, as ``kubectl get -w`` does. Errors are one line on stderr
and exit status 1.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterator

import yaml

from ..api.base import GROUP, VERSION
from .cluster import CliError, api_errors, connect, refused

PLURAL = "forgetrainings"
COLUMNS = ["NAMESPACE", "NAME", "PHASE", "%", "STEP", "LOSS", "TOKENS/S", "ETA", "RESTARTS"]


def _row(o: dict) -> list[str]:
    st = o.get("status") or {}
    p = st.get("progress") or {}
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    return [o["metadata"]["namespace"], o["metadata"]["name"], st.get("phase", ""), fmt(p.get("percent"), ".1f"),
            fmt(p.get("step"), "d"), fmt(p.get("loss"), ".3f"), fmt(p.get("tokensPerSecond"), ",.0f"),
            p.get("eta", ""), str(st.get("restartCount", 0))]


def _list(api, name: str | None, namespace: str, all_namespaces: bool) -> tuple[list[dict], str]:
    """The trainings asked for, and the resourceVersion to watch from."""
    from kubernetes.client.rest import ApiException

    try:
        if name:
            found = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                      field_selector=f"metadata.name={name}")
        elif all_namespaces:
            found = api.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        else:
            found = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    except ApiException as e:
        if e.status == 404:
            raise CliError(f"the cluster has no ForgeTraining API ({GROUP}/{VERSION}): is Forge installed?") from e
        raise refused(e) from e
    except api_errors() as e:
        raise refused(e) from e
    if name and not found["items"]:
        raise CliError(f'forgetraining "{name}" not found in namespace "{namespace}"')
    return found["items"], found["metadata"]["resourceVersion"]


def _changes(api, name: str | None, namespace: str, all_namespaces: bool, since: str) -> Iterator[dict]:
    """Each training as it changes from resourceVersion ``since`` on (until interrupted)."""
    import kubernetes

    w = kubernetes.watch.Watch()
    if all_namespaces:
        stream = w.stream(api.list_cluster_custom_object, GROUP, VERSION, PLURAL, resource_version=since)
    else:
        selector = {"field_selector": f"metadata.name={name}"} if name else {}
        stream = w.stream(api.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                          resource_version=since, **selector)
    try:
        for event in stream:
            yield event["object"]
    except api_errors() as e:
        raise refused(e) from e


def _print_rows(items: list[dict], header: bool) -> None:
    rows = [COLUMNS, *(_row(o) for o in items)] if header else [_row(o) for o in items]
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _print_detail(o: dict) -> None:
    st = o.get("status") or {}
    for c in st.get("conditions") or []:
        print(f"  {c['type']}={c['status']} {c['reason']}: {c.get('message', '')}")
    for r in (st.get("restarts") or [])[-5:]:
        print(f"  restart at {r['time']}: {r['reason']}: {r.get('message', '')}")
    if st.get("lastCheckpoint"):
        ck = st["lastCheckpoint"]
        print(f"  last checkpoint: step {ck['step']} at {ck.get('path', '')}")


def _print_doc(doc: dict, output: str, stream: bool = False) -> None:
    """One object; in a stream (``-w``), YAML documents are separated by ``---``."""
    text = json.dumps(doc, indent=2) if output == "json" else yaml.safe_dump(doc, sort_keys=False)
    print(text + ("---" if stream and output == "yaml" else ""))


def show_status(name: str | None, namespace: str | None, *, all_namespaces: bool = False, output: str = "table",
                kubeconfig: str | None = None, context: str | None = None, watch: bool = False) -> int:
    import kubernetes

    try:
        if name and all_namespaces:
            raise CliError("a NAME is looked up in one namespace: use -n, not -A")
        client, default_namespace = connect(kubeconfig, context)
        api = kubernetes.client.CustomObjectsApi(client)
        namespace = namespace or default_namespace
        items, version = _list(api, name, namespace, all_namespaces)
        if output == "table":
            if items:
                _print_rows(items, header=True)
                if name and not watch:
                    _print_detail(items[0])
            elif not watch:
                print("No ForgeTrainings found" + ("" if all_namespaces else f" in namespace {namespace}") + ".",
                      file=sys.stderr)
        elif watch:
            for o in items:
                _print_doc(o, output, stream=True)
        else:
            _print_doc(items[0] if name else {"apiVersion": "v1", "kind": "List", "items": items}, output)
        sys.stdout.flush()
        if watch:
            for o in _changes(api, name, namespace, all_namespaces, version):
                _print_rows([o], header=False) if output == "table" else _print_doc(o, output, stream=True)
                sys.stdout.flush()
    except CliError as e:
        print(f"forge status: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
