"""ForgeEval as the runtime drives it: read, plan; an evaluation's Job is applied once."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..api.base import API_VERSION
from ..api.defaults import TRAINER_IMAGE
from ..k8s.objects import ApplyOutcome, Key, Plan, Reader
from .observe import read
from .planner import plan_eval
from .status import record_apply_outcome

KIND = "ForgeEval"
PLURAL = "forgeevals"


class EvalReconciler:
    api_version = API_VERSION
    kind = KIND
    plural = PLURAL

    def __init__(self, image: str | None = None) -> None:
        self.image = image or TRAINER_IMAGE

    def plan(self, obj: dict[str, Any], reader: Reader, now: datetime) -> Plan:
        return plan_eval(obj, read(reader, obj, now, f"{obj['metadata']['name']}-eval"), self.image)

    def after_apply(self, plan: Plan, old_status: dict[str, Any], outcome: ApplyOutcome, now: datetime) -> None:
        record_apply_outcome(plan, old_status, outcome, now)

    def after_write(self, key: Key, status: dict[str, Any]) -> None:
        pass
