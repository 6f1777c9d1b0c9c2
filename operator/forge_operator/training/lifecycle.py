"""Which phase a ForgeTraining is in, and what its workers need next: start an attempt (after its
backoff, once the last workers have stopped), suspend and resume it (with or without Kueue),
finish it, age it out; and what an Invalid condition says (a spec this operator cannot run, a
child the API server refused)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..api import defaults
from ..api.base import describe_location
from ..api.enums import TERMINAL_PHASES, ConditionType as T, Phase, Reason
from ..api.training import ForgeTraining
from ..k8s import conditions as C
from ..k8s.objects import ApplyOutcome, Event, EventType, Plan, deleting, owned_by, parse_ts, ts
from .children import WorkerState, desired_children
from .draft import Draft, Settings
from .failure import NOT_A_FAILURE, avoided_nodes, backoff_seconds, node_lost, stuck_terminating
from .observe import Attempt, Observed, active, attempt_label, job_condition, phase
from .readiness import Stuck, why_queued

STOPPING_RECHECK_SECONDS = 5.0


# --------------------------------------------------------------------------- the spec
def report_invalid_spec(d: Draft, message: str) -> Plan:
    """Nothing is lost: running workers keep the last good spec, and the training goes on from here
    once the spec is fixed. Only the condition (and one event) says what is wrong."""
    was = C.find(d.old_status.get("conditions"), T.INVALID)
    d.set_condition(T.INVALID, True, Reason.INVALID_SPEC, message)
    d.status.setdefault("phase", str(Phase.PENDING))
    if not C.is_true(d.old_status.get("conditions"), T.INVALID) or was.get("message") != stored_message(d):
        d.event(Reason.INVALID_SPEC, message, warning=True)
    return d.plan


def stored_message(d: Draft) -> str:
    """The Invalid condition's message as the status holds it (cut to its limit), to compare with the last."""
    return (C.find(d.conditions, T.INVALID) or {}).get("message", "")


def clear_invalid_spec(d: Draft) -> None:
    """The spec is fine now. A refused child (ChildRejected) is cleared by :func:`record_apply_outcome`
    once the API server accepts it."""
    if (C.find(d.conditions, T.INVALID) or {}).get("reason") == Reason.INVALID_SPEC:
        d.status["conditions"] = C.remove(d.conditions, T.INVALID)


def record_apply_outcome(plan: Plan, old_status: dict[str, Any], outcome: ApplyOutcome, now: datetime) -> None:
    """A child the API server refused (built from the user's free-form fields: env, volumes, ...), or an
    object of a child's name that is not ours (never modified), is reported on the training instead of
    failing the reconcile, with one event per new report. Either way no workers start: the Job is
    applied last.

    A refusal is reported until the workers' Job is accepted: the Job is the child built from those
    fields, and once it is accepted every child is. (A suspended or finished training applies no Job,
    and keeps the report.) A conflict is reported until an apply of every planned child meets none."""
    status = plan.status
    reason, message = None, ""
    if outcome.rejected is not None:
        reason, message = Reason.CHILD_REJECTED, outcome.rejected.describe()
    elif outcome.conflict is not None:
        c = outcome.conflict
        reason, message = Reason.CHILD_CONFLICT, (
            f"{c.kind} {c.name} exists and is not this training's ({c.why}): the operator leaves it untouched "
            f"and starts no workers until it is deleted or renamed")
    if reason is not None:
        status["conditions"] = C.set_condition(status.get("conditions"), T.INVALID, True, reason, message, now,
                                               status.get("observedGeneration"))
        was = C.find(old_status.get("conditions"), T.INVALID)
        if was is None or was.get("message") != C.find(status["conditions"], T.INVALID)["message"]:
            plan.events.append(Event(EventType.WARNING, str(reason), message))
        if not outcome.accepted_a("Job"):  # what the planner said of a new Job did not happen
            plan.events = [e for e in plan.events if e.reason != Reason.CREATED]
        return
    current = (C.find(status.get("conditions"), T.INVALID) or {}).get("reason")
    if (current == Reason.CHILD_REJECTED and outcome.accepted_a("Job")) or \
            (current == Reason.CHILD_CONFLICT and len(outcome.accepted) == len(plan.apply)):
        status["conditions"] = C.remove(status["conditions"], T.INVALID)


def report_refused_pods(d: Draft, attempt: Attempt, obs: Observed) -> None:
    """Worker pods the API server refused at admission (PodSecurity, a ResourceQuota, a webhook): the Job
    controller retries them with backoff and only says why in its events. The training quotes the
    newest refusal while its Job lacks pods, with one event per new refusal, and clears it once the
    pods are there (a quota freed) or the Job is gone (a fixed spec is a new attempt)."""
    refusal = obs.refusals.get(attempt.job_name) if attempt.job is not None else None
    current = C.find(d.conditions, T.INVALID) or {}
    if refusal is None:
        if current.get("reason") == Reason.PODS_REFUSED:
            d.status["conditions"] = C.remove(d.conditions, T.INVALID)
        return
    # the generated part of the pod's name changes with every retry; the refusal does not
    quote = re.sub(rf'"({re.escape(attempt.job_name)}-\d+)-[a-z0-9]+"', r'"\1-*"',
                   refusal.removeprefix("Error creating: "))
    message = f"the API server refused the worker pods of Job {attempt.job_name}: {quote}"
    d.set_condition(T.INVALID, True, Reason.PODS_REFUSED, message)
    if current.get("reason") != Reason.PODS_REFUSED or current.get("message") != stored_message(d):
        d.event(Reason.PODS_REFUSED, message, warning=True)


# --------------------------------------------------------------------------- finished trainings
def age_out(d: Draft, ft: ForgeTraining, attempt: Attempt, trainer_yaml: str, settings: Settings) -> Plan:
    """A finished training keeps its Service and identity, deletes its Job ttlSecondsAfterFinished
    after it finished, and stops workers that still run (lost node, budget used up, spec now invalid):
    SIGTERM, checkpoint. A Job with a failed pod ends by itself (backoffLimit 0) and is kept for its logs."""
    d.plan.apply = desired_children(ft, trainer_yaml, WorkerState(attempt.number), image=settings.trainer_image,
                                    include_job=False, network=d.network)
    ttl, done = ft.spec.ttl_seconds_after_finished, parse_ts(d.status.get("completionTime"))
    if attempt.job is not None and ttl is not None and done is not None:
        left = (done + timedelta(seconds=ttl) - d.now).total_seconds()
        if left <= 0:
            d.delete_job(attempt.job_name)
        else:
            d.plan.requeue_after = left
    if active(attempt.job) and not any(phase(p) == "Failed" for p in attempt.pods):
        d.delete_job(attempt.job_name)
    return d.plan


def completed(attempt: Attempt) -> bool:
    return attempt.job is not None and job_condition(attempt.job, "Complete") is not None


def succeed(d: Draft, ft: ForgeTraining, attempt: Attempt, trainer_yaml: str, settings: Settings) -> Plan:
    out = ft.spec.output.location
    d.status["modelRef"] = {"location": out.to_dict(), "provenance": defaults.PROVENANCE_FILE}
    d.finish(Phase.SUCCEEDED, Reason.TRAINING_COMPLETED,
             f"training finished; model exported to {describe_location(out)}")
    d.plan.apply = desired_children(ft, trainer_yaml, WorkerState(attempt.number), image=settings.trainer_image,
                                    include_job=False, network=d.network)
    return d.plan


# --------------------------------------------------------------------------- suspend and Kueue
def leave_queue(d: Draft, ft: ForgeTraining, attempt: Attempt) -> Attempt:
    """Kueue owns `suspend` of a queued Job (it unsuspends what it admitted), so a user's suspension of
    a queued training deletes the Job instead: its workload leaves the queue and frees its quota, and
    resuming queues a new Job for the same attempt. A finished Job is judged first (success, failure)."""
    sched = ft.spec.scheduling
    if not (sched.suspend and sched.queue_name and active(attempt.job)):
        return attempt
    d.delete_job(attempt.job_name)
    return attempt.without_job()


# --------------------------------------------------------------------------- the workers
@dataclass
class Workers:
    """What the workers of the attempt are doing, as the phase reads it."""

    waiting: float = 0.0  # seconds of backoff left before the next Job
    stopping: list[dict[str, Any]] = field(default_factory=list)  # the last workers, still stopping
    queued: bool = False  # created suspended, for Kueue to admit
    queue_stuck: Stuck | None = None  # ... which it never will as things are (no Kueue, no LocalQueue)


def start_workers(d: Draft, ft: ForgeTraining, attempt: Attempt, obs: Observed, trainer_yaml: str,
                  settings: Settings) -> Workers:
    """The children this attempt should have. The Job is applied once, when its attempt starts; its
    template never changes after that (an edit is a new attempt). Afterwards only `suspend` is
    written, and only when the user's wish differs from what is observed, so a stale read can never
    undo Kueue's admission."""
    sched = ft.spec.scheduling
    w = Workers(waiting=backoff_left(d, ft, attempt))
    # Kueue owns `suspend` of a queued Job: created suspended, unsuspended by Kueue on admission.
    w.queued = bool(sched.queue_name) and (attempt.job is None or attempt.suspended) and not sched.suspend
    w.queue_stuck = why_queued(obs.queue, ft.metadata.namespace) if w.queued else None
    last = (d.status.get("restarts") or [{}])[-1] if attempt.number else {}
    state = WorkerState(restart_count=attempt.number, suspend=sched.suspend or w.queued,
                        restart_reason=last.get("reason", ""), avoid_nodes=avoided_nodes(d.status))
    w.stopping = wait_for_stopped_workers(d, ft, attempt, obs)
    start = attempt.job is None and w.waiting <= 0 and not (sched.suspend and sched.queue_name) and not w.stopping
    d.plan.apply = desired_children(ft, trainer_yaml, state, image=settings.trainer_image, include_job=start,
                                    network=d.network)
    if attempt.job is not None:
        if sched.suspend and not attempt.suspended:
            d.suspend_job(attempt.job_name, True)
        elif not sched.suspend and attempt.suspended and not sched.queue_name and not w.stopping:
            d.suspend_job(attempt.job_name, False)
    return w


def backoff_left(d: Draft, ft: ForgeTraining, attempt: Attempt) -> float:
    """Seconds until the next attempt may start (failurePolicy backoff; none after an edit)."""
    if attempt.job is not None or attempt.number == 0:
        return 0.0
    last = (d.status.get("restarts") or [{}])[-1]
    last_time = parse_ts(last.get("time"))
    delay = 0 if last.get("reason") in NOT_A_FAILURE else backoff_seconds(ft, attempt.failures)
    return 0.0 if last_time is None else (last_time + timedelta(seconds=delay) - d.now).total_seconds()


def wait_for_stopped_workers(d: Draft, ft: ForgeTraining, attempt: Attempt, obs: Observed) -> list[dict[str, Any]]:
    """The workers the next ones wait for. The next workers start once the last ones have stopped:
    these may still be writing their checkpoint into the same directory (preStop hook, up to the grace
    period), and the next ones resume from it and rendezvous under the same names. That is: a new Job
    waits for every worker of the training, and a suspended Job resumes once the pods its suspension
    deleted are gone. Workers that cannot stop are force-deleted."""
    sched = ft.spec.scheduling
    stopping: list[dict[str, Any]] = []
    stuck: list[str] = []
    if attempt.job is None:
        mine = [p for p in obs.pods if (a := attempt_label(p)) is not None and a <= attempt.number]
        stopping, stuck = still_stopping(ft, obs, mine)
        # workers whose Job is gone and that nobody deletes (the Job deleted with --cascade=orphan,
        # or before the garbage collector got to them) are stopped gracefully
        for p in stopping:
            if not deleting(p) and not any(owned_by(p, j) for j in obs.jobs if j["metadata"].get("uid")):
                d.delete_pod(p["metadata"]["name"])
    elif attempt.suspended and not sched.suspend and not sched.queue_name:  # Kueue resumes a queued one
        stopping, stuck = still_stopping(ft, obs, attempt.pods)
    for name in stuck:
        d.delete_pod(name, force=True)
    return stopping


def still_stopping(ft: ForgeTraining, obs: Observed,
                   pods: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Those of ``pods`` that have not stopped yet, and those to force-delete: stuck terminating, or
    being deleted on a lost node (they cannot stop, no checkpoint comes from them, and they would
    still answer to the host names the next workers take)."""
    timeout = timedelta(seconds=ft.spec.failure_policy.node_failure_timeout_seconds)
    stopping: list[dict[str, Any]] = []
    stuck: list[dict[str, Any]] = []
    for pod in pods:
        if phase(pod) in TERMINAL_PHASES and not deleting(pod):
            continue
        node_name = pod.get("spec", {}).get("nodeName")
        if node_name in obs.nodes and node_lost(obs.nodes[node_name], obs.now, timeout):
            if deleting(pod):
                stuck.append(pod)
            continue
        (stuck if stuck_terminating(pod, obs.now, timeout) else stopping).append(pod)
    return stopping, [p["metadata"]["name"] for p in stuck]


# --------------------------------------------------------------------------- the phase
def phase_from_workers(d: Draft, ft: ForgeTraining, attempt: Attempt, w: Workers, settings: Settings) -> None:
    """The phase, from what runs now; and when to look again."""
    n = ft.spec.resources.num_nodes
    d.plan.requeue_after = w.waiting if w.waiting > 0 else settings.resync_seconds
    if w.waiting > 0:
        d.transition(Phase.RESTARTING, Reason.BACKING_OFF,
                     f"restart {attempt.number} in {int(w.waiting) + 1}s (failurePolicy backoff)", warning=True)
    elif ft.spec.scheduling.suspend:
        busy = [p for p in attempt.all_pods if phase(p) in ("Pending", "Running")]
        msg = "suspended by the user" + (f"; {len(busy)} workers still stopping" if busy else "; no workers run")
        d.transition(Phase.SUSPENDED, Reason.SUSPENDED_BY_USER, msg)
    elif w.stopping:
        d.plan.requeue_after = min(settings.resync_seconds, STOPPING_RECHECK_SECONDS)
        earlier = any((attempt_label(p) or 0) < attempt.number for p in w.stopping)
        d.transition(Phase.RESTARTING if earlier else Phase.PENDING, Reason.WORKERS_STOPPING,
                     f"waiting for {len(w.stopping)} worker(s) of the last run to stop (they write a "
                     f"checkpoint first) before starting {n} new ones")
    elif w.queue_stuck is not None:  # PodsReady says it too, with a warning event per new cause
        d.set_phase(Phase.QUEUED, w.queue_stuck.reason, w.queue_stuck.message)
    elif w.queued:
        d.transition(Phase.QUEUED, Reason.QUEUED_BY_KUEUE,
                     f"waiting for Kueue to admit the workers from queue {ft.spec.scheduling.queue_name}")
    elif len(attempt.running) == n:
        d.status.setdefault("startTime", ts(d.now))
        d.transition(Phase.RUNNING, Reason.RESUMED if resumed(d.status) else Reason.ALL_RANKS_RUNNING,
                     f"all {n} ranks running")
    elif any(p.get("spec", {}).get("nodeName") for p in attempt.pods):
        d.transition(Phase.INITIALIZING, Reason.PODS_STARTING, f"{len(attempt.running)}/{n} ranks running")
    else:
        d.set_phase(Phase.PENDING, Reason.CREATED, f"waiting for {n} worker pods to be scheduled")
        if d.old_phase != Phase.PENDING:
            d.event(Reason.CREATED, f"created {n} worker(s) as job {attempt.job_name}")


def resumed(status: dict[str, Any]) -> bool:
    """Running again after a suspension (rather than for the first time or after a restart)."""
    conds = status.get("conditions")
    suspended, restarting = C.find(conds, T.SUSPENDED), C.find(conds, T.RESTARTING)
    if suspended is None:
        return False
    return restarting is None or suspended["lastTransitionTime"] >= restarting["lastTransitionTime"]
