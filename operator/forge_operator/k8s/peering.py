"""kopf peering, as the runtime's requeue timers see it: with several replicas, kopf pauses the
handlers of every replica but the one of the highest priority, and the paused replicas' timers
must stand down with them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kubernetes.client.rest import ApiException

log = logging.getLogger("forge.operator")

PEERING_API_VERSION = "kopf.dev/v1"


@dataclass(frozen=True)
class Peering:
    name: str
    priority: int
    clusterwide: bool


def outranked(peers: dict[str, Any], priority: int, now: datetime) -> bool:
    """Whether a live peer of a kopf peering object's status has a higher priority than ours:
    kopf then pauses this replica's handlers, and its timers must stand down too."""
    for info in peers.values():
        if not isinstance(info, dict) or int(info.get("priority") or 0) <= priority:
            continue
        lastseen = info.get("lastseen")
        try:
            seen = datetime.fromisoformat(lastseen) if lastseen else now
        except ValueError:
            seen = now
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=timezone.utc)
        if (now - seen).total_seconds() < int(info.get("lifetime") or 60):
            return True
    return False


def standing_by(clients, peering: Peering | None, namespace: str) -> bool:
    """Whether this replica is paused (a live peer outranks it). Unreadable peering: not paused."""
    if peering is None:
        return False
    group, version = PEERING_API_VERSION.split("/")
    try:
        if peering.clusterwide:
            obj = clients.custom.get_cluster_custom_object(group, version, "clusterkopfpeerings", peering.name)
        else:
            obj = clients.custom.get_namespaced_custom_object(group, version, namespace, "kopfpeerings", peering.name)
    except ApiException as e:
        log.warning("cannot read peering %s: %s", peering.name, e.reason)
        return False
    return outranked(obj.get("status") or {}, peering.priority, datetime.now(timezone.utc))
