"""The pure heart of the operator: from a ForgeTraining and what was observed, decide everything.

``plan_training(obj, observed, settings)`` returns the new status, the children to apply, what
to patch and delete, and which events to emit. It reads no clock and no API: ``observed.now`` and
the listed Jobs, Pods and Nodes are its inputs. Running it twice on the same input gives the same
plan, which is what makes the operator level-based and safe to kill at any point.

The decisions live in named helpers: ``failure`` (why a group failed; restart or give up),
``budget`` (deadline, GPU-hours), ``lifecycle`` (phases, suspend and Kueue, starting and stopping
workers), ``status`` (progress, Stalled), ``evaluation`` (spec.evaluation: its ForgeEval and gate). This function only says in which order they are asked.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..api.base import format_error
from ..api.enums import TERMINAL_PHASES
from ..api.training import ForgeTraining
from ..k8s.objects import Plan
from .budget import account_gpu_hours, stop_at_deadline, stop_for_gpu_hours
from .children import job_name
from .draft import Draft, Settings
from .evaluation import evaluate_model
from .failure import restart_or_fail, why_restart
from .lifecycle import (
    age_out, clear_invalid_spec, completed, leave_queue, phase_from_workers, report_invalid_spec,
    report_refused_pods, start_workers, succeed,
)
from .observe import Observed, attempt_of, earlier_jobs
from .readiness import report_pods_ready
from .status import check_stall, record_progress
from .translate import TranslationError, trainer_config


def plan_training(obj: dict[str, Any], obs: Observed, settings: Settings = Settings()) -> Plan:
    d = Draft(obj, obs.now, obs.network)
    # 1. the spec must translate into a runnable trainer configuration
    try:
        ft = ForgeTraining.model_validate({k: v for k, v in obj.items() if k != "status"})
        trainer_yaml = trainer_config(ft).to_yaml()
    except (ValidationError, TranslationError, ValueError) as err:
        return report_invalid_spec(d, format_error(err))
    clear_invalid_spec(d)
    if obs.network_policy is not None:  # network.egress is Unrestricted now: no policy
        d.delete_network_policy(obs.network_policy["metadata"]["name"])

    # 2. the current attempt: its Job and workers; what rank 0 reported; pods refused; the GPU time used
    attempt = attempt_of(d.status, job_name(ft, int(d.status.get("restartCount") or 0)), obs)
    for old in earlier_jobs(obs, attempt.number):
        d.delete_job(old)
    record_progress(d, attempt)
    report_refused_pods(d, attempt, obs)
    account_gpu_hours(d, ft, len(attempt.running))

    # 3. finished trainings only age out; budgets end running ones
    if d.old_phase in TERMINAL_PHASES:
        age_out(d, ft, attempt, trainer_yaml, settings)
        return evaluate_model(d, ft, obj, obs.evaluation)
    if stop_for_gpu_hours(d, ft, attempt) or stop_at_deadline(d, ft, attempt):
        return d.plan
    attempt = leave_queue(d, ft, attempt)

    # 4. success, or a reason to replace the group (a failure, an edit): restart it or give up
    if completed(attempt):
        succeed(d, ft, attempt, trainer_yaml, settings)
        return evaluate_model(d, ft, obj, obs.evaluation)
    failure = why_restart(d, ft, attempt, obs)
    if failure is not None:
        attempt = restart_or_fail(d, ft, attempt, failure, job_name(ft, attempt.number + 1))
        if attempt is None:
            return d.plan

    # 5. the children this attempt should have, and the phase from what runs now
    workers = start_workers(d, ft, attempt, obs, trainer_yaml, settings)
    phase_from_workers(d, ft, attempt, workers, settings)
    report_pods_ready(d, ft, attempt, obs)
    check_stall(d, ft.spec.failure_policy.stall_timeout_seconds)
    return d.plan
