"""The ForgeEval planner: pure; the object and the time in, a Plan out.

Until the evaluator exists, a ForgeEval stays Pending with ``Supported=False`` (reason
``NotImplemented``) so that ``kubectl get``/``describe`` tell the user plainly that nothing will
evaluate it, and ``Invalid`` when its spec does not validate.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ..api.base import format_error
from ..api.enums import ConditionType as T, Phase, Reason
from ..api.eval import ForgeEval
from ..k8s import conditions as C
from ..k8s.objects import Event, EventType, Plan

NOT_EVALUATED = ("ForgeEval is stored but not evaluated yet: this operator version runs ForgeTrainings only, "
                 "so status.results, status.gates and the GatePassed condition stay empty")


def plan_eval(obj: dict[str, Any], now: datetime) -> Plan:
    old = obj.get("status") or {}
    status: dict[str, Any] = copy.deepcopy(old)
    generation = obj.get("metadata", {}).get("generation")
    status["observedGeneration"] = generation
    status.setdefault("phase", str(Phase.PENDING))
    plan = Plan(status=status)

    def warn(type_: T, value: bool, reason: Reason, message: str) -> None:
        """Set a condition the user must act on; a new message is also one Warning event."""
        was = C.find(old.get("conditions"), type_)
        status["conditions"] = C.set_condition(status.get("conditions"), type_, value, reason, message, now,
                                               generation)
        if was is None or was.get("message") != message:
            plan.events.append(Event(EventType.WARNING, str(reason), message))

    try:
        ForgeEval.model_validate({k: v for k, v in obj.items() if k != "status"})
    except ValidationError as err:
        warn(T.INVALID, True, Reason.INVALID_SPEC, format_error(err))
    else:
        status["conditions"] = C.remove(status.get("conditions"), T.INVALID)
    warn(T.SUPPORTED, False, Reason.NOT_IMPLEMENTED, NOT_EVALUATED)
    return plan
