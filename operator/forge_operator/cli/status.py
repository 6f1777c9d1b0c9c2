"""`forge status`: trainings and their progress, the way `kubectl get` finds and shows them.

The cluster and namespace come from kubectl's rules: ``--kubeconfig``, else ``$KUBECONFIG``, else
``~/.kube/config``, else the pod's service account; the namespace from ``-n``, else the current
context's, else ``default``; ``-A`` for all namespaces. Errors are one line on stderr and exit 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from ..api.base import GROUP, VERSION

PLURAL = "forgetrainings"
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
COLUMNS = ["NAMESPACE", "NAME", "PHASE", "%", "STEP", "LOSS", "TOKENS/S", "ETA", "RESTARTS"]


class StatusError(Exception):
    """What `forge status` tells the user instead of a traceback."""


def _row(o: dict) -> list[str]:
    st = o.get("status") or {}
    p = st.get("progress") or {}
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    return [o["metadata"]["namespace"], o["metadata"]["name"], st.get("phase", ""), fmt(p.get("percent"), ".1f"),
            fmt(p.get("step"), "d"), fmt(p.get("loss"), ".3f"), fmt(p.get("tokensPerSecond"), ",.0f"),
            p.get("eta", ""), str(st.get("restartCount", 0))]


def _client(kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    """A CustomObjectsApi and the namespace kubectl would use by default."""
    import kubernetes

    try:
        contexts, current = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            current = next((c for c in contexts if c["name"] == context), None)
            if current is None:
                raise kubernetes.config.ConfigException(f"no context named {context!r}")
        api = kubernetes.config.new_client_from_config(config_file=kubeconfig, context=context)
        namespace = (current.get("context") or {}).get("namespace") or "default"
        return kubernetes.client.CustomObjectsApi(api), namespace
    except (kubernetes.config.ConfigException, OSError) as e:
        if kubeconfig or context or not IN_CLUSTER_NAMESPACE.exists():
            where = kubeconfig or "$KUBECONFIG or ~/.kube/config"
            raise StatusError(f"no cluster to ask: {where}: {e}") from e
    kubernetes.config.load_incluster_config()
    return kubernetes.client.CustomObjectsApi(), IN_CLUSTER_NAMESPACE.read_text().strip()


def _fetch(api, name: str | None, namespace: str, all_namespaces: bool) -> list[dict]:
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    try:
        if name:
            return [api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)]
        if all_namespaces:
            return api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        return api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    except ApiException as e:
        if e.status == 404 and name:
            raise StatusError(f'forgetraining "{name}" not found in namespace "{namespace}"') from e
        if e.status == 404:
            raise StatusError(f"the cluster has no ForgeTraining API ({GROUP}/{VERSION}): is Forge installed?") from e
        reason = (json.loads(e.body or "{}").get("message") if (e.body or "").startswith("{") else None) or e.reason
        raise StatusError(f"the API server refused: {reason}") from e
    except HTTPError as e:
        raise StatusError(f"cannot reach the API server: {e}") from e


def _print_table(items: list[dict], detail: bool) -> None:
    rows = [COLUMNS, *(_row(o) for o in items)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if not detail:
        return
    st = items[0].get("status") or {}
    for c in st.get("conditions") or []:
        print(f"  {c['type']}={c['status']} {c['reason']}: {c.get('message', '')}")
    for r in (st.get("restarts") or [])[-5:]:
        print(f"  restart at {r['time']}: {r['reason']}: {r.get('message', '')}")
    if st.get("lastCheckpoint"):
        ck = st["lastCheckpoint"]
        print(f"  last checkpoint: step {ck['step']} at {ck.get('path', '')}")


def show_status(name: str | None, namespace: str | None, *, all_namespaces: bool = False, output: str = "table",
                kubeconfig: str | None = None, context: str | None = None) -> int:
    try:
        if name and all_namespaces:
            raise StatusError("a NAME is looked up in one namespace: use -n, not -A")
        api, default_namespace = _client(kubeconfig, context)
        namespace = namespace or default_namespace
        items = _fetch(api, name, namespace, all_namespaces)
    except StatusError as e:
        print(f"forge status: {e}", file=sys.stderr)
        return 1
    if output == "table":
        if not items:
            print("No ForgeTrainings found" + ("" if all_namespaces else f" in namespace {namespace}") + ".",
                  file=sys.stderr)
        else:
            _print_table(items, detail=bool(name))
    else:
        doc = items[0] if name else {"apiVersion": "v1", "kind": "List", "items": items}
        print(json.dumps(doc, indent=2) if output == "json" else yaml.safe_dump(doc, sort_keys=False), end="\n")
    sys.stdout.flush()
    return 0
