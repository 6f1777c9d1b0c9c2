"""The trainer's own egress lock: while a run (a training, an evaluation) lasts, every outbound connection
made through Python's ``socket`` module is refused unless it goes to loopback, a Unix socket, the
Kubernetes API server (``KUBERNETES_SERVICE_HOST``, where a training's rank 0 reports progress; not for
an evaluation), an HTTP reward service of the config, the S3 endpoint of its s3:// locations, or an
address in ``egress.allow``.

It is the second line behind the cluster's NetworkPolicy, for clusters whose network plugin does
not enforce one: a library that tries to download a model or a tokenizer, a telemetry client, or a
reward function that posts the completions elsewhere fails at once with a message naming the
address, instead of sending data out. It sees what Python code connects to (``socket.connect``
audit events: urllib, requests, httpx, boto3, the kubernetes client, a user's reward function);
torch's collectives (gloo, NCCL, the TCPStore) connect from C++ to the group's own peers and are
not affected.

Audit hooks cannot be removed, so one hook is installed per process and consults the policy of the
run in progress; between runs it lets everything through.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator
from urllib.parse import urlsplit


class EgressRefused(PermissionError):
    """An outbound connection the run's egress policy does not allow."""


@dataclass
class Policy:
    """Where a run may connect: addresses (any port) and (address, port) pairs, resolved once."""

    hosts: set[str] = field(default_factory=set)
    endpoints: set[tuple[str, int]] = field(default_factory=set)
    names: list[str] = field(default_factory=list)  # as configured, for the message
    subject: str = "the training"  # who is locked in, for the message

    def allows(self, host: str, port: int) -> bool:
        try:
            if ipaddress.ip_address(host.split("%")[0]).is_loopback:
                return True
        except ValueError:
            pass
        return host in self.hosts or (host, port) in self.endpoints


_policy: Policy | None = None
_installed = False
_lock = threading.Lock()


def _audit(event: str, args: tuple) -> None:
    if event != "socket.connect" or _policy is None:
        return
    sock, address = args
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return
    host, port = str(address[0]), int(address[1])
    if not _policy.allows(host, port):
        allowed = ", ".join(_policy.names) or "nothing but loopback"
        raise EgressRefused(f"egress to {host}:{port} refused: {_policy.subject} may connect to {allowed} "
                            "(spec.network.egress: Restricted)")


def _resolve(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


def policy_for(allow: Iterable[str], reward_urls: Iterable[str], subject: str = "the training",
               api_server: bool = True) -> Policy:
    """``allow``: ``host`` or ``host:port`` (names are resolved now); ``reward_urls``: HTTP reward services;
    ``api_server``: the Kubernetes API server of the pod's environment too (a training's rank 0 reports there)."""
    p = Policy(subject=subject)
    entries = list(allow)
    if api_server and os.environ.get("KUBERNETES_SERVICE_HOST"):
        entries.append(f"{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}")
    for url in reward_urls:
        u = urlsplit(url)
        entries.append(f"{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}")
    for entry in entries:
        host, sep, port = entry.rpartition(":") if entry.count(":") == 1 else ("", "", "")
        host = host if sep else entry.strip("[]")
        addresses = _resolve(host) | ({host} if _is_ip(host) else set())
        if sep:
            p.endpoints |= {(a, int(port)) for a in addresses}
        else:
            p.hosts |= addresses
        p.names.append(entry)
    return p


def policy_of(config) -> Policy | None:
    """The run's policy from its TrainerConfig (``egress``, the method's HTTP reward services, the S3 endpoint)."""
    if not config.egress.lock:
        return None
    from .storage import s3_endpoints

    rewards = getattr(config.method, "rewards", None) or []
    return policy_for([*config.egress.allow, *s3_endpoints(config)], [r.http.url for r in rewards if r.http is not None])


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def egress_locked(policy: Policy | None) -> Iterator[None]:
    """Refuse connections outside ``policy`` while the block runs (None: no lock)."""
    global _policy, _installed
    if policy is None:
        yield
        return
    with _lock:
        if not _installed:
            sys.addaudithook(_audit)
            _installed = True
        previous, _policy = _policy, policy
    try:
        yield
    finally:
        _policy = previous


__all__ = ["EgressRefused", "Policy", "egress_locked", "policy_for", "policy_of"]
