"""metav1.Condition lists, kept stable: pure helpers, whatever the kind.

``set_condition`` moves ``lastTransitionTime`` only when the status changes (JobSet's
``updateCondition``), so a reconcile that finds nothing new writes nothing new.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .objects import truncate, ts

Conditions = list[dict[str, Any]]


def find(conditions: Conditions | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: Conditions | None, type_: str) -> bool:
    c = find(conditions, type_)
    return c is not None and c.get("status") == "True"


def set_condition(conditions: Conditions | None, type_: str, status: bool | str, reason: str,
                  message: str, now: datetime, generation: int | None = None) -> Conditions:
    """Return a new list with the condition set; lastTransitionTime moves only when the status changes.
    The message is cut to MESSAGE_LIMIT characters."""
    status_s = status if isinstance(status, str) else ("True" if status else "False")
    out = [dict(c) for c in conditions or []]
    current = find(out, type_)
    # plain strings (not enum members): the list goes into JSON and YAML as it is
    new = {"type": str(type_), "status": status_s, "reason": str(reason), "message": truncate(message),
           "lastTransitionTime": ts(now)}
    if generation is not None:
        new["observedGeneration"] = generation
    if current is None:
        out.append(new)
        return out
    if current.get("status") == status_s:
        new["lastTransitionTime"] = current.get("lastTransitionTime", new["lastTransitionTime"])
    current.clear()
    current.update(new)
    return out


def remove(conditions: Conditions | None, type_: str) -> Conditions:
    return [dict(c) for c in conditions or [] if c.get("type") != type_]
