"""The budgets the operator itself enforces: training.budget.deadline and maxGpuHours, and the
GPU-hour accounting behind the latter (maxSteps and maxTokens are the trainer's)."""

from __future__ import annotations

from datetime import datetime, timezone

from ..api.enums import Reason
from ..api.training import ForgeTraining
from ..k8s.objects import parse_ts, ts
from .draft import Draft
from .observe import Attempt, active, job_condition, phase
from .status import human_duration

ACCOUNTING_SECONDS = 30  # granularity of status.budget.gpuHours
# how long past budget.deadline (plus the pods' grace period) a trainer may take to checkpoint and export
DEADLINE_SLACK_SECONDS = 600


def deadline(ft: ForgeTraining) -> datetime | None:
    """training.budget.deadline in UTC (a time without a zone is taken as UTC)."""
    value = ft.spec.training.budget.deadline
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def deadline_reached(ft: ForgeTraining, now: datetime) -> bool:
    when = deadline(ft)
    return when is not None and now >= when


def stop_at_deadline(d: Draft, ft: ForgeTraining, attempt: Attempt) -> bool:
    """budget.deadline, the operator's part: the trainer ends a running training at the deadline itself
    (checkpoint, export: Succeeded). Workers that are not running by then are never started (like a
    Job's activeDeadlineSeconds), and workers still busy long after it are stopped. A worker that
    failed is reported as the failure it is (and not restarted after the deadline)."""
    when, job, pods = deadline(ft), attempt.job, attempt.pods
    if when is None or (job is not None and job_condition(job, "Complete")):
        return False
    late = (d.now - when).total_seconds()
    if late < 0 or any(phase(p) == "Failed" for p in pods):
        return False
    started = any(phase(p) in ("Running", "Succeeded") for p in pods)
    overdue = ft.spec.resources.termination_grace_period_seconds + DEADLINE_SLACK_SECONDS
    if started and late <= overdue:
        return False  # the trainer is ending it (checkpoint and export)
    if started:
        message = (f"training.budget.deadline {ts(when)} passed {human_duration(late)} ago and the workers have "
                   f"not finished; they were stopped (they checkpoint on SIGTERM)")
    else:
        message = f"training.budget.deadline {ts(when)} passed while no worker was running"
    d.fail(Reason.DEADLINE_EXCEEDED, message)
    if active(job):
        d.delete_job(attempt.job_name)
    return True


def stop_for_gpu_hours(d: Draft, ft: ForgeTraining, attempt: Attempt) -> bool:
    """budget.maxGpuHours used up: the training fails and its workers are stopped."""
    limit, used = ft.spec.training.budget.max_gpu_hours, d.status["budget"]["gpuHours"]
    if limit is None or used < limit:
        return False
    d.fail(Reason.GPU_HOUR_BUDGET_EXHAUSTED, f"{used:.2f} GPU-hours used, budget.maxGpuHours={limit}; the workers "
                                             f"were stopped (they checkpoint on SIGTERM)")
    if active(attempt.job):
        d.delete_job(attempt.job_name)
    return True


def account_gpu_hours(d: Draft, ft: ForgeTraining, running: int) -> None:
    """Add the GPU time of the running workers since ``accountedAt``, once per ACCOUNTING_SECONDS.

    Booked in steps so that a reconcile caused by the operator's own status write finds nothing to
    write; while no worker runs, ``accountedAt`` is absent and no time is booked.
    """
    budget = d.status.setdefault("budget", {})
    budget.setdefault("gpuHours", 0.0)
    budget.setdefault("tokens", 0)
    if not running:
        budget.pop("accountedAt", None)
        return
    last = parse_ts(budget.get("accountedAt"))
    if last is None or d.now < last:
        budget["accountedAt"] = ts(d.now)
        return
    elapsed = (d.now - last).total_seconds()
    if elapsed < ACCOUNTING_SECONDS:
        return
    gpus = ft.spec.resources.gpus_per_node
    budget["gpuHours"] = round(float(budget["gpuHours"]) + elapsed * running * gpus / 3600, 4)
    budget["accountedAt"] = ts(d.now)
