"""The NetworkPolicy of ``network.egress: Restricted``, for any kind's pods: DNS, the Kubernetes API server
(for pods that report to it), and the endpoints a spec names (HTTP reward services, S3 endpoints), each an
in-cluster Service's pods or an address. Pure builders, and the one read of what they need from the API
server (through the runtime's reader)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urlsplit

from .objects import NotAllowed, NotServed, Reader, owned_by

POLICY_API = ("networking.k8s.io/v1", "NetworkPolicy")
API_SERVER_NAMESPACE = "default"  # the namespace of the `kubernetes` Service
API_SERVER_SLICES = "kubernetes.io/service-name=kubernetes"  # the EndpointSlices of default/kubernetes
API_SERVER_FALLBACK_PORTS = (443, 6443)  # when the API server's EndpointSlices cannot be read
DNS_RULE = {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
# <service>.<namespace>.svc[.<cluster domain>], or <service> alone (the resource's namespace)
SERVICE_HOST = re.compile(r"^(?P<svc>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\.(?P<ns>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\.svc(\..*)?$")
SERVICE_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class NetworkSeen:
    """What a NetworkPolicy needs from outside the spec, as read from the API server."""

    # the EndpointSlices of the `kubernetes` Service in `default`; None: they could not be read (or not asked)
    api_server: tuple[dict[str, Any], ...] | None = None
    # (namespace, name) -> the Service of an in-cluster URL; None: absent or not readable
    services: dict[tuple[str, str], dict[str, Any] | None] = field(default_factory=dict)


def service_of(host: str, namespace: str) -> tuple[str, str] | None:
    """(namespace, name) of the in-cluster Service a URL's host names, or None (an address, another name)."""
    host = host.lower()
    if m := SERVICE_HOST.match(host):
        return m["ns"], m["svc"]
    return (namespace, host) if SERVICE_NAME.match(host) and host != "localhost" else None


def url_services(urls: Iterable[str], namespace: str) -> list[tuple[str, str]]:
    """(namespace, name) of the in-cluster Services that URLs name (HTTP rewards, S3 endpoints)."""
    out: list[tuple[str, str]] = []
    for url in urls:
        try:
            service = service_of(urlsplit(url).hostname or "", namespace)
        except ValueError:
            continue
        if service and service not in out:
            out.append(service)
    return out


def _url_port(url: str) -> int:
    u = urlsplit(url)
    return u.port or (443 if u.scheme == "https" else 80)


def _ip_block(address: str) -> dict[str, Any]:
    ip = ipaddress.ip_address(address)
    return {"ipBlock": {"cidr": f"{ip}/{ip.max_prefixlen}"}}


def api_server_rules(seen: NetworkSeen) -> list[dict[str, Any]]:
    """To the addresses and ports of the `kubernetes` Service's endpoints; unread: TCP 443 and 6443 anywhere."""
    if seen.api_server is None:
        return [{"ports": [{"protocol": "TCP", "port": p} for p in API_SERVER_FALLBACK_PORTS]}]
    rules: list[dict[str, Any]] = []
    for s in seen.api_server:
        addresses = sorted({a for e in s.get("endpoints") or [] for a in e.get("addresses") or []})
        ports = [{"protocol": p.get("protocol", "TCP"), "port": p["port"]} for p in s.get("ports") or [] if p.get("port")]
        if addresses and ports:
            rules.append({"to": [_ip_block(a) for a in addresses], "ports": ports})
    return rules


def _service_rule(namespace: str, name: str, port: int, service: dict[str, Any] | None) -> dict[str, Any]:
    """To a Service's pods (its selector, the target port of the URL's port); the Service unread (or without a
    selector): to the URL's port of any pod in its namespace."""
    peer: dict[str, Any] = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
    target: int | str = port
    spec = (service or {}).get("spec") or {}
    if spec.get("selector"):
        peer["podSelector"] = {"matchLabels": dict(spec["selector"])}
        for p in spec.get("ports") or []:
            if p.get("port") == port and p.get("protocol", "TCP") == "TCP":
                target = p.get("targetPort") or port
    return {"to": [peer], "ports": [{"protocol": "TCP", "port": target}]}


def url_rules(urls: Iterable[str], namespace: str, seen: NetworkSeen) -> list[dict[str, Any]]:
    """To the endpoints of ``urls``: an in-cluster Service's pods, or an address; a name outside the cluster
    cannot be expressed in a NetworkPolicy and is left out (docs/api.md#network)."""
    rules: list[dict[str, Any]] = []
    for url in urls:
        try:
            host, port = (urlsplit(url).hostname or "").lower(), _url_port(url)
        except ValueError:
            continue  # no port to allow; the in-process egress lock refuses it too
        if service := service_of(host, namespace):
            rule = _service_rule(*service, port, seen.services.get(service))
        else:
            try:
                rule = {"to": [_ip_block(host)], "ports": [{"protocol": "TCP", "port": port}]}
            except ValueError:
                continue
        if rule not in rules:
            rules.append(rule)
    return rules


def build_egress_policy(meta: dict[str, Any], pods: dict[str, str], ingress: list[dict[str, Any]],
                        egress: list[dict[str, Any]]) -> dict[str, Any]:
    """A NetworkPolicy of the pods labelled ``pods`` that allows only ``ingress`` (none: nothing comes in; the
    API server drops an empty list, so it is left out) and ``egress``."""
    return {"apiVersion": POLICY_API[0], "kind": POLICY_API[1], "metadata": meta,
            "spec": {"podSelector": {"matchLabels": dict(pods)}, "policyTypes": ["Ingress", "Egress"],
                     **({"ingress": ingress} if ingress else {}), "egress": egress}}


def read_network(reader: Reader, urls: Iterable[str], namespace: str, api_server: bool = True) -> NetworkSeen:
    """The API server's EndpointSlices (with ``api_server``) and the Services that ``urls`` name. An object the
    operator may not read (or a URL that names no Service) leaves the policy its fallback."""
    slices: tuple[dict[str, Any], ...] | None = None
    if api_server:
        try:
            slices = tuple(reader.list("discovery.k8s.io/v1", "EndpointSlice", API_SERVER_NAMESPACE, API_SERVER_SLICES))
        except NotAllowed:
            slices = None
    services: dict[tuple[str, str], dict[str, Any] | None] = {}
    for ns, name in url_services(urls, namespace):
        try:
            services[(ns, name)] = reader.get("v1", "Service", name, ns)
        except NotAllowed:
            services[(ns, name)] = None
    return NetworkSeen(api_server=slices or None, services=services)


def read_network_policy(reader: Reader, owner: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The NetworkPolicy ``name`` of ``owner``'s namespace, if ``owner`` owns it."""
    try:
        policy = reader.get(*POLICY_API, name, owner["metadata"]["namespace"])
    except (NotAllowed, NotServed):
        return None
    return policy if policy is not None and owned_by(policy, owner) else None
