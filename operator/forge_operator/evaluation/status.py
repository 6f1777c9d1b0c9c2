"""A ForgeEval's status as the planner writes it: a draft of the new status, phases with their
condition, and the results read from the evaluation pod's termination message. Pure."""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from forge_trainer.contract import EvalTerminationMessage

from ..api.enums import ConditionType as T, Phase, Reason
from ..k8s import conditions as C
from ..k8s.objects import ApplyOutcome, Event, EventType, Plan, ts

PHASE_CONDITIONS = {Phase.RUNNING: T.RUNNING, Phase.SUCCEEDED: T.SUCCEEDED, Phase.FAILED: T.FAILED}


class EvalDraft:
    """The new status, being written: it starts as a copy of the stored one."""

    def __init__(self, obj: dict[str, Any], now: datetime) -> None:
        self.old: dict[str, Any] = obj.get("status") or {}
        self.status: dict[str, Any] = copy.deepcopy(self.old)
        self.generation = obj.get("metadata", {}).get("generation")
        self.status["observedGeneration"] = self.generation
        self.status.setdefault("phase", str(Phase.PENDING))
        self.now = now
        self.plan = Plan(status=self.status)

    def condition(self, type_: T, value: bool, reason: Reason, message: str, event: EventType | None = None) -> None:
        """Set a condition; with ``event``, a new message is also one event."""
        was = C.find(self.old.get("conditions"), type_)
        self.status["conditions"] = C.set_condition(self.status.get("conditions"), type_, value, reason, message,
                                                    self.now, self.generation)
        if event is not None and (was is None or was.get("message") != message or was.get("reason") != reason):
            self.plan.events.append(Event(event, str(reason), message))

    def phase(self, phase: Phase, reason: Reason, message: str, event: EventType | None = None) -> Plan:
        """Enter a phase: its condition True, the other phases' False (Pending: Running False)."""
        self.status["phase"] = str(phase)
        for p, type_ in PHASE_CONDITIONS.items():
            if p == phase:
                self.condition(type_, True, reason, message, event)
            elif type_ == T.RUNNING or C.find(self.status.get("conditions"), type_):
                self.condition(type_, False, reason, message, event if phase == Phase.PENDING else None)
        if phase == Phase.RUNNING and not self.status.get("startTime"):
            self.status["startTime"] = ts(self.now)
        if phase in (Phase.SUCCEEDED, Phase.FAILED):
            self.status.setdefault("startTime", ts(self.now))
            self.status["completionTime"] = ts(self.now)
        return self.plan


def read_message(text: str | None) -> EvalTerminationMessage | None:
    try:
        return EvalTerminationMessage.model_validate_json(text or "")
    except ValidationError:
        return None


def record_results(d: EvalDraft, message: EvalTerminationMessage) -> None:
    """Per-suite results, per-gate outcomes, the main metric and GatesPassed, from the pod's message."""
    suites, gates = message.suites or [], message.gates or []
    d.status["results"] = [s.model_dump(mode="json", by_alias=True, exclude_none=True) for s in suites]
    d.status["gates"] = [g.model_dump(mode="json", by_alias=True, exclude_none=True) for g in gates]
    if gates:
        g = gates[0]
        d.status["mainMetric"] = f"{g.metric}={g.value:.4g}" if g.value is not None else g.metric
    elif suites and suites[0].metrics:
        name, value = next(iter(suites[0].metrics.items()))
        d.status["mainMetric"] = f"{suites[0].suite}.{name}={value:.4g}"
    if not gates:
        return
    failed = [g for g in gates if not g.passed]
    if failed:
        d.condition(T.GATES_PASSED, False, Reason.GATE_FAILED,
                    f"{len(failed)} of {len(gates)} gates failed: " + "; ".join(g.message or g.metric for g in failed),
                    EventType.WARNING)
    else:
        d.condition(T.GATES_PASSED, True, Reason.ALL_GATES_PASSED, f"{len(gates)} of {len(gates)} gates passed",
                    EventType.NORMAL)


def record_apply_outcome(plan: Plan, old_status: dict[str, Any], outcome: ApplyOutcome, now: datetime) -> None:
    """A child the API server refused, or an object of a child's name that is not ours (left untouched), is
    reported as Invalid (reason ChildRejected or ChildConflict) instead of failing the reconcile."""
    if outcome.rejected is not None:
        reason, message = Reason.CHILD_REJECTED, outcome.rejected.describe()
    elif outcome.conflict is not None:
        c = outcome.conflict
        reason, message = Reason.CHILD_CONFLICT, (f"{c.kind} {c.name} exists and is not this evaluation's ({c.why}): "
                                                  "the operator leaves it untouched and evaluates nothing until it is gone")
    else:
        return
    status = plan.status
    status["conditions"] = C.set_condition(status.get("conditions"), T.INVALID, True, reason, message, now,
                                           status.get("observedGeneration"))
    was = C.find(old_status.get("conditions"), T.INVALID)
    if was is None or was.get("message") != C.find(status["conditions"], T.INVALID)["message"]:
        plan.events.append(Event(EventType.WARNING, str(reason), message))
