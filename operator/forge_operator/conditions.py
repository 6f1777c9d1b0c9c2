"""Condition types, reasons and the pure helpers that keep conditions stable."""

from __future__ import annotations

from datetime import datetime
from typing import Any

# ForgeTraining condition types
QUEUED = "Queued"
INITIALIZING = "Initializing"
RUNNING = "Running"
RESTARTING = "Restarting"
SUSPENDED = "Suspended"
STALLED = "Stalled"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
INVALID = "Invalid"
# ForgeEval
GATE_PASSED = "GatePassed"


class Reason:
    """CamelCase reasons, one constant each (Kubeflow's TrainJob<Cond>Reason style)."""

    CREATED = "Created"
    QUEUED_BY_KUEUE = "WaitingForAdmission"
    SUSPENDED_BY_USER = "SuspendedByUser"
    RESUMED = "Resumed"
    PODS_STARTING = "PodsStarting"
    ALL_RANKS_RUNNING = "AllRanksRunning"
    TRAINING_COMPLETED = "TrainingCompleted"
    # restarts
    POD_FAILED = "PodFailed"
    OOM_KILLED = "OOMKilled"
    EVICTED = "Evicted"
    PREEMPTED = "Preempted"
    NODE_LOST = "NodeLost"
    STUCK_TERMINATING = "StuckTerminating"
    RESOURCES_CHANGED = "ResourcesChanged"
    BACKING_OFF = "BackingOff"
    WORKERS_STOPPING = "PreviousWorkersStopping"  # the next workers wait until the last ones have stopped
    # failures
    MAX_RESTARTS_EXCEEDED = "MaxRestartsExceeded"
    NON_RETRYABLE_EXIT_CODE = "NonRetryableExitCode"
    INVALID_SPEC = "InvalidSpec"
    CHILD_REJECTED = "ChildRejected"  # the API server refused a child built from the spec's free-form fields
    GPU_HOUR_BUDGET_EXHAUSTED = "GpuHourBudgetExhausted"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    # stall
    NO_PROGRESS = "NoProgress"
    PROGRESSING = "Progressing"
    NOT_RUNNING = "NotRunning"


def find(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    c = find(conditions, type_)
    return c is not None and c.get("status") == "True"


def set_condition(conditions: list[dict[str, Any]] | None, type_: str, status: bool | str, reason: str,
                  message: str, now: datetime, generation: int | None = None) -> list[dict[str, Any]]:
    """Return a new list with the condition set; lastTransitionTime moves only when the status changes."""
    status_s = status if isinstance(status, str) else ("True" if status else "False")
    out = [dict(c) for c in conditions or []]
    current = find(out, type_)
    new = {"type": type_, "status": status_s, "reason": reason, "message": message,
           "lastTransitionTime": _ts(now)}
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


def _ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")
