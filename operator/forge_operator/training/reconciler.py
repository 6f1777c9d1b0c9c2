"""ForgeTraining as the runtime drives it: read, plan, learn what became of the children, report."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..api.base import API_VERSION
from ..k8s.objects import ApplyOutcome, Key, Plan, Reader
from .draft import Settings
from .lifecycle import record_apply_outcome
from .metrics import observe_budget, observe_training
from .observe import read
from .planner import plan_training

__all__ = ["KIND", "PLURAL", "Settings", "TrainingReconciler"]

KIND = "ForgeTraining"
PLURAL = "forgetrainings"


class TrainingReconciler:
    api_version = API_VERSION
    kind = KIND
    plural = PLURAL

    def __init__(self, settings: Settings = Settings()) -> None:
        self.settings = settings

    def plan(self, obj: dict[str, Any], reader: Reader, now: datetime) -> Plan:
        meta = obj["metadata"]
        observe_budget(meta["namespace"], meta["name"], obj.get("spec") or {})
        return plan_training(obj, read(reader, obj, now), self.settings)

    def after_apply(self, plan: Plan, old_status: dict[str, Any], outcome: ApplyOutcome, now: datetime) -> None:
        record_apply_outcome(plan, old_status, outcome, now)

    def after_write(self, key: Key, status: dict[str, Any]) -> None:
        observe_training(key.namespace, key.name, status)
