"""The plan being drafted for one ForgeTraining: a copy of its status, the Plan, and the one way
to change the phase (which keeps the phase's conditions in step and emits one event per change)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..api import defaults
from ..api.enums import PHASE_CONDITION, TERMINAL_PHASES, ConditionType as T, Phase, Reason
from ..k8s import conditions as C
from ..k8s.objects import Delete, Event, EventType, Patch, Plan, ts
from ..k8s.network import NetworkSeen


@dataclass(frozen=True)
class Settings:
    """What the operator was started with."""

    trainer_image: str | None = None
    # how often an unfinished training is looked at again without any event (timeouts, backoff, accounting)
    resync_seconds: float = defaults.RESYNC_SECONDS


class Draft:
    def __init__(self, obj: dict[str, Any], now: datetime, network: NetworkSeen = NetworkSeen()) -> None:
        self.network = network  # what the training's NetworkPolicy allows besides the spec
        self.old_status: dict[str, Any] = obj.get("status") or {}
        self.status: dict[str, Any] = copy.deepcopy(self.old_status)
        self.generation: int | None = obj.get("metadata", {}).get("generation")
        self.status["observedGeneration"] = self.generation
        self.now = now
        self.old_phase: str | None = self.old_status.get("phase")
        self.plan = Plan(status=self.status)

    # ------------------------------------------------------------------ conditions and phase
    @property
    def conditions(self) -> list[dict[str, Any]]:
        return self.status.get("conditions") or []

    def set_condition(self, type_: T, status: bool, reason: str, message: str) -> None:
        self.status["conditions"] = C.set_condition(self.status.get("conditions"), type_, status, reason, message,
                                                    self.now, self.generation)

    def set_phase(self, phase: Phase, reason: str, message: str) -> None:
        """The phase, its condition True, the other phases' conditions False (Restarting stays True until
        the group runs again), and Stalled False outside Running."""
        self.status["phase"] = str(phase)
        if phase != Phase.RUNNING and C.is_true(self.conditions, T.STALLED):  # stalled describes a running group
            self.set_condition(T.STALLED, False, Reason.NOT_RUNNING, f"phase {phase}")
        if phase not in (Phase.PENDING, Phase.INITIALIZING, Phase.RUNNING):
            self.pods_not_running(phase)
        for p, type_ in PHASE_CONDITION.items():
            if p == phase:
                self.set_condition(type_, True, reason, message)
            elif type_ == T.RESTARTING and phase not in (Phase.RUNNING, *TERMINAL_PHASES):
                continue  # a restart is "in progress" until the group runs again
            elif C.find(self.conditions, type_) is not None:
                self.set_condition(type_, False, reason, message)

    def pods_not_running(self, phase: str | None) -> None:
        """PodsReady (once it exists) False, reason NotRunning: no worker of the attempt should run now, and
        whatever held the last ones up went with them."""
        if C.find(self.conditions, T.PODS_READY) is not None:
            self.set_condition(T.PODS_READY, False, Reason.NOT_RUNNING, f"no workers should run now (phase {phase})")

    def transition(self, phase: Phase, reason: str, message: str, warning: bool = False) -> Plan:
        """Set the phase; a change of phase is also an event."""
        self.set_phase(phase, reason, message)
        if phase != self.old_phase:
            self.event(reason, message, warning)
        return self.plan

    def finish(self, phase: Phase, reason: str, message: str, warning: bool = False) -> Plan:
        self.status["completionTime"] = ts(self.now)
        return self.transition(phase, reason, message, warning)

    def fail(self, reason: str, message: str) -> Plan:
        return self.finish(Phase.FAILED, reason, message, warning=True)

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.plan.events.append(Event(EventType.WARNING if warning else EventType.NORMAL, str(reason), message))

    # ------------------------------------------------------------------ children
    def delete_job(self, name: str) -> None:
        if name not in self.plan.deleted("Job"):
            self.plan.delete.append(Delete("batch/v1", "Job", name, propagation_policy="Background"))

    def delete_network_policy(self, name: str) -> None:
        self.plan.delete.append(Delete("networking.k8s.io/v1", "NetworkPolicy", name))

    def delete_pod(self, name: str, force: bool = False) -> None:
        if name not in self.plan.deleted("Pod", force=force):
            self.plan.delete.append(Delete("v1", "Pod", name, grace_period_seconds=0 if force else None))

    def suspend_job(self, name: str, suspend: bool) -> None:
        self.plan.patch.append(Patch("batch/v1", "Job", name, {"spec": {"suspend": suspend}}))
