"""Kubernetes API clients, created once per process, and the generic reads and writes the runtime needs."""

from __future__ import annotations

import time
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from .objects import Delete, NotAllowed, NotServed, Patch

MERGE_PATCH = "application/merge-patch+json"
# A kind the API server did not serve is looked up again (a discovery refresh) after this long, so that
# installing a CRD (Kueue's) is noticed without rediscovering everything at each reconcile.
NOT_SERVED_RECHECK_SECONDS = 10.0


class Clients:
    """The typed clients, plus a dynamic client for objects of any kind (a :class:`~.objects.Reader`)."""

    def __init__(self, kubeconfig: str | None = None) -> None:
        if kubeconfig:
            self.api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        else:
            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()
            self.api = kubernetes.client.ApiClient()
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.discovery = kubernetes.client.DiscoveryV1Api(self.api)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(self.api)
        self.networking = kubernetes.client.NetworkingV1Api(self.api)
        self.dynamic = DynamicClient(self.api)
        self._resources: dict[tuple[str, str], Any] = {}
        self._not_served: dict[tuple[str, str], float] = {}  # kind -> when discovery last missed it

    def resource(self, api_version: str, kind: str):
        """The kind's API resource; raises NotServed when discovery does not list it."""
        key = (api_version, kind)
        if key not in self._resources:
            missed = self._not_served.get(key)
            if missed is not None and time.monotonic() - missed < NOT_SERVED_RECHECK_SECONDS:
                raise NotServed(f"the API server does not serve {kind} ({api_version})")
            try:
                self._resources[key] = self.dynamic.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError as e:
                self._not_served[key] = time.monotonic()
                raise NotServed(f"the API server does not serve {kind} ({api_version})") from e
            self._not_served.pop(key, None)
        return self._resources[key]

    # ------------------------------------------------------------------ reads (the Reader protocol)
    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except ApiException as e:
            if e.status == 404:
                return None
            if e.status == 403:
                raise NotAllowed(f"{kind} {name}: {e.reason}") from e
            raise

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str = "",
             field_selector: str = "") -> list[dict[str, Any]]:
        try:
            found = self.resource(api_version, kind).get(namespace=namespace, label_selector=label_selector or None,
                                                         field_selector=field_selector or None)
        except ApiException as e:
            if e.status == 403:
                raise NotAllowed(f"{kind}: {e.reason}") from e
            raise
        return found.to_dict()["items"]

    def get_custom(self, api_version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        group, version = api_version.split("/")
        try:
            return self.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # ------------------------------------------------------------------ writes
    def replace_status(self, plural: str, obj: dict[str, Any], status: dict[str, Any],
                       resource_version: str) -> str | None:
        """PUT the status with the resourceVersion it was planned from; the new resourceVersion, or None
        when someone wrote in between (409: the write is refused, never lost)."""
        meta = obj["metadata"]
        group, version = obj["apiVersion"].split("/")
        body = {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "resourceVersion": resource_version},
                "spec": obj.get("spec"), "status": status}
        try:
            stored = self.custom.replace_namespaced_custom_object_status(group, version, meta["namespace"], plural,
                                                                         meta["name"], body)
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        return stored["metadata"]["resourceVersion"]

    def apply(self, child: dict[str, Any], field_manager: str, force: bool = True) -> str:
        """Server-side apply under one field manager; the uid of the object applied. ``force``: take the
        fields of other managers (the child is ours). A ``metadata.uid`` in the child is a precondition:
        the API server refuses the apply unless the object is that one."""
        applied = self.resource(child["apiVersion"], child["kind"]).server_side_apply(
            body=child, namespace=child["metadata"].get("namespace"), field_manager=field_manager,
            force_conflicts=force)
        return applied.metadata.uid

    def patch(self, namespace: str, patch: Patch, field_manager: str) -> None:
        _ignore_404(self.resource(patch.api_version, patch.kind).patch, body=patch.body, name=patch.name,
                    namespace=namespace, content_type=MERGE_PATCH, field_manager=field_manager)

    def delete(self, namespace: str, delete: Delete) -> None:
        _ignore_404(self.resource(delete.api_version, delete.kind).delete, name=delete.name, namespace=namespace,
                    grace_period_seconds=delete.grace_period_seconds, propagation_policy=delete.propagation_policy)

    def create_event(self, namespace: str, body: dict[str, Any]) -> None:
        self.core.create_namespaced_event(namespace, body)


def _ignore_404(call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except ApiException as e:
        if e.status != 404:
            raise
