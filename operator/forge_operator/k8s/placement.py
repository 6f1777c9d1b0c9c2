"""Whether a pod could ever run on a node, by the scheduler's static filters: the node takes pods (not
cordoned), the pod tolerates its NoSchedule and NoExecute taints, the node has the pod's nodeSelector
labels, and its allocatable resources cover the pod's requests (what other pods use is not counted: a
full node frees up, a node too small never does). Node affinity is the caller's to check with
:func:`matches_requirements`.

Pure: Nodes and pod specs as the API serves them.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from .objects import labels_of

BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")
_QUANTITY = re.compile(r"^\+?([0-9.]+)([eE][-+]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")
_SUFFIXES = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
             "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12),
             "P": Decimal(10**15), "E": Decimal(10**18),
             **{s: Decimal(1024**(i + 1)) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}


def quantity(value: Any) -> Decimal:
    """A resource.Quantity ("8", "500m", "64Gi", "1e3") as a number; ValueError for anything else."""
    m = _QUANTITY.match(str(value).strip())
    if m is None:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = m.group(1), m.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(number + suffix)
    return Decimal(number) * _SUFFIXES[suffix]


def tolerates(tolerations: list[dict[str, Any]], taint: dict[str, Any]) -> bool:
    """Whether one of ``tolerations`` tolerates ``taint`` (core/v1 Toleration semantics)."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if not t.get("key"):  # an empty key with Exists tolerates every taint
            if t.get("operator") == "Exists":
                return True
            continue
        if t["key"] != taint.get("key"):
            continue
        if t.get("operator") == "Exists" or (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def matches_requirements(labels: dict[str, str], requirements: list[dict[str, Any]]) -> bool:
    """Whether node labels satisfy node selector requirements (In, NotIn, Exists, DoesNotExist; all of them)."""
    for r in requirements:
        key, op, values = r["key"], r["operator"], r.get("values") or []
        present = key in labels
        ok = {"In": present and labels.get(key) in values, "NotIn": not present or labels.get(key) not in values,
              "Exists": present, "DoesNotExist": not present}.get(op, False)
        if not ok:
            return False
    return True


def requests(pod_spec: dict[str, Any]) -> dict[str, Decimal]:
    """The pod's requests, summed over its containers (a limit alone counts as the request)."""
    total: dict[str, Decimal] = {}
    for c in pod_spec.get("containers") or []:
        r = c.get("resources") or {}
        for name, amount in ((r.get("limits") or {}) | (r.get("requests") or {})).items():
            total[name] = total.get(name, Decimal(0)) + quantity(amount)
    return total


def why_not_on(pod_spec: dict[str, Any], node: dict[str, Any]) -> str | None:
    """Why the pod can never run on the node (a short phrase naming the filter); None: it could."""
    spec = node.get("spec") or {}
    if spec.get("unschedulable"):
        return "cordoned"
    for taint in spec.get("taints") or []:
        if taint.get("effect") in BLOCKING_EFFECTS and not tolerates(pod_spec.get("tolerations") or [], taint):
            return f"taint {taint.get('key')}={taint.get('value', '')}:{taint.get('effect')} not tolerated"
    labels = labels_of(node)
    for key, value in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return f"no nodeSelector label {key}={value}"
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    for name, amount in sorted(requests(pod_spec).items()):
        has = quantity(allocatable.get(name, 0))
        if has < amount:
            return f"{name}: {amount.normalize():f} requested, {has.normalize():f} allocatable"
    return None
