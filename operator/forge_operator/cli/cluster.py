"""How the `forge` commands find a cluster and a namespace, and say what went wrong: kubectl's rules.

The cluster comes from ``--kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``, else the pod's
service account; the namespace from ``-n``, else the current context's, else ``default``. Every
failure is a :class:`CliError`: one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class CliError(Exception):
    """What a `forge` command tells the user instead of a traceback."""


def connect(kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    """An ApiClient and the namespace kubectl would use by default."""
    import kubernetes

    try:
        contexts, current = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            current = next((c for c in contexts if c["name"] == context), None)
            if current is None:
                raise kubernetes.config.ConfigException(f"no context named {context!r}")
        api = kubernetes.config.new_client_from_config(config_file=kubeconfig, context=context)
        return api, (current.get("context") or {}).get("namespace") or "default"
    except (kubernetes.config.ConfigException, OSError) as e:
        if kubeconfig or context or not IN_CLUSTER_NAMESPACE.exists():
            where = kubeconfig or "$KUBECONFIG or ~/.kube/config"
            raise CliError(f"no cluster to ask: {where}: {e}") from e
    kubernetes.config.load_incluster_config()
    return kubernetes.client.ApiClient(), IN_CLUSTER_NAMESPACE.read_text().strip()


def refused(e: Exception) -> CliError:
    """An API error or a connection failure, as one line."""
    body = getattr(e, "body", None) or ""
    message = None
    if isinstance(body, str) and body.startswith("{"):
        message = json.loads(body).get("message")
    if getattr(e, "status", None) is not None:
        return CliError(f"the API server refused: {message or e.reason}")
    return CliError(f"cannot reach the API server: {e}")


def api_errors() -> tuple[type[Exception], ...]:
    """The exceptions :func:`refused` turns into one line."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    return ApiException, HTTPError
