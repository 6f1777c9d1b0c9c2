"""ForgeEval as the runtime drives it. It has no children yet, so no apply outcome to record."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..api.base import API_VERSION
from ..k8s.objects import ApplyOutcome, Key, Plan, Reader
from .planner import plan_eval

KIND = "ForgeEval"
PLURAL = "forgeevals"


class EvalReconciler:
    api_version = API_VERSION
    kind = KIND
    plural = PLURAL

    def plan(self, obj: dict[str, Any], reader: Reader, now: datetime) -> Plan:
        return plan_eval(obj, now)

    def after_apply(self, plan: Plan, old_status: dict[str, Any], outcome: ApplyOutcome, now: datetime) -> None:
        pass

    def after_write(self, key: Key, status: dict[str, Any]) -> None:
        pass
