"""The pure heart of the operator: from a ForgeTraining and what was observed, decide everything.

``plan_training(obj, observed, settings)`` returns the new status, the children to
apply, what to delete and which events to emit. It reads no clock and no API:
the handler passes ``observed.now`` and the listed Jobs, Pods and Nodes. Running
it twice on the same input gives the same plan, which is what makes the
operator level-based and safe to kill at any point.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import ValidationError

from forge_trainer import exitcodes

from . import conditions as C
from .api.training import ForgeTraining
from .children import ANNOTATION_SPEC_HASH, WorkerState, desired_children, job_name, spec_hash
from .conditions import Reason
from .constants import ANNOTATION_PROGRESS, LABEL_ATTEMPT
from .translate import TranslationError, trainer_config

MAX_RESTART_RECORDS = 20
ACCOUNTING_SECONDS = 30  # granularity of status.budget.gpuHours
# how long past budget.deadline (plus the pods' grace period) a trainer may take to checkpoint and export
DEADLINE_SLACK_SECONDS = 600
JOB_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
ALWAYS_NON_RETRYABLE = (exitcodes.DATA_ERROR, exitcodes.CONFIG_ERROR)
PHASE_CONDITION = {
    "Queued": C.QUEUED, "Initializing": C.INITIALIZING, "Running": C.RUNNING, "Restarting": C.RESTARTING,
    "Suspended": C.SUSPENDED, "Succeeded": C.SUCCEEDED, "Failed": C.FAILED,
}
TERMINAL = ("Succeeded", "Failed")
# restarts the user asked for (an edit) do not use up failurePolicy.maxRestarts
NOT_A_FAILURE = (Reason.RESOURCES_CHANGED,)


@dataclass(frozen=True)
class Settings:
    trainer_image: str | None = None
    # how often an unfinished training is looked at again without any event (timeouts, backoff, accounting)
    resync_seconds: float = 15.0


@dataclass
class Observed:
    now: datetime
    jobs: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    # node name -> Node; None for a node that no longer exists; a node that could not be read is absent
    nodes: dict[str, dict[str, Any] | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    status: dict[str, Any]
    apply: list[dict[str, Any]] = field(default_factory=list)
    delete_jobs: list[str] = field(default_factory=list)
    force_delete_pods: list[str] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)  # with their grace period
    events: list[Event] = field(default_factory=list)
    # (job name, suspend): set spec.suspend of that existing Job
    suspend_job: tuple[str, bool] | None = None
    # reconcile again after this many seconds even if nothing changes (controller-runtime's RequeueAfter)
    requeue_after: float | None = None


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    exit_code: int | None = None
    # the exit code is the trainer's own (from its termination message), not torchrun's or the kubelet's
    from_trainer: bool = False


# --------------------------------------------------------------------------- small readers
def ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def human_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def format_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors()[:5]:
            loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
            parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
        return "; ".join(parts)
    return str(err)


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    c = C.find(job.get("status", {}).get("conditions"), type_)
    return c if c and c.get("status") == "True" else None


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term
    return None


def _last_json_line(text: str | None) -> dict[str, Any]:
    try:
        data = json.loads((text or "").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def _node_ready(node: dict[str, Any] | None) -> tuple[bool, datetime | None]:
    if node is None:
        return False, None
    c = C.find(node.get("status", {}).get("conditions"), "Ready")
    if c is None:
        return False, None
    return c.get("status") == "True", parse_ts(c.get("lastTransitionTime"))


def pod_index(pod: dict[str, Any]) -> str | None:
    return (pod["metadata"].get("annotations") or {}).get(JOB_INDEX_ANNOTATION)


# --------------------------------------------------------------------------- failure detection
def pod_failure(pod: dict[str, Any]) -> Failure | None:
    """Why one worker pod failed, or None if it has not."""
    st = pod.get("status", {})
    name = pod["metadata"]["name"]
    node = pod.get("spec", {}).get("nodeName", "?")
    disruption = C.find(st.get("conditions"), "DisruptionTarget")
    if st.get("phase") != "Failed":
        return None
    if st.get("reason") == "Evicted":
        return Failure(Reason.EVICTED, f"pod {name} on node {node} was evicted: {st.get('message', '')}".strip())
    if disruption and disruption.get("status") == "True" and "Preempt" in disruption.get("reason", ""):
        return Failure(Reason.PREEMPTED, f"pod {name} on node {node} was preempted")
    term = _terminated(pod) or {}
    code = term.get("exitCode")
    # torchrun exits with its own code when a worker fails; the trainer's termination message
    # (one JSON line) carries the worker's documented exit code
    summary = _last_json_line(term.get("message"))
    # a worker that finished (exitCode 0) while another process of its pod failed explains nothing
    trainer_code = summary.get("exitCode") if isinstance(summary.get("exitCode"), int) else None
    from_trainer = bool(trainer_code) or summary.get("status") == "preempted"
    if trainer_code:
        code = trainer_code
    elif summary.get("status") == "preempted":
        code = exitcodes.PREEMPTED
    if term.get("reason") == "OOMKilled":
        return Failure(Reason.OOM_KILLED, f"pod {name} on node {node} was OOM-killed (exit code {code})", code)
    if code == exitcodes.PREEMPTED:
        return Failure(Reason.PREEMPTED, f"pod {name} on node {node} was stopped and saved a checkpoint "
                                         f"(exit code {code})", code, from_trainer)
    detail = summary.get("message") or ((term.get("message") or "").strip().splitlines() or [""])[-1]
    suffix = f": {detail[:300]}" if detail else ""
    return Failure(Reason.POD_FAILED, f"pod {name} on node {node} failed with exit code {code}{suffix}", code,
                   from_trainer)


def group_failure(ft: ForgeTraining, job: dict[str, Any] | None, pods: list[dict[str, Any]],
                  obs: Observed) -> tuple[Failure | None, list[str]]:
    """The first reason to restart the group, and pods that must be force-deleted."""
    fp = ft.spec.failure_policy
    timeout = timedelta(seconds=fp.node_failure_timeout_seconds)
    # When one rank fails, torchrun stops the others, which then fail too. The failure that explains
    # the group's is the one the trainer itself reported (its documented exit code: data error, config
    # error, preempted), not a neighbour's "rendezvous closed".
    failed = [f for f in (pod_failure(p) for p in sorted(pods, key=lambda p: p["metadata"]["name"])) if f]
    if failed:
        return sorted(failed, key=lambda f: not f.from_trainer)[0], []
    stuck = [pod["metadata"]["name"] for pod in pods if _stuck_terminating(pod, obs.now, timeout)]
    if stuck:
        return Failure(Reason.STUCK_TERMINATING, f"pods {', '.join(sorted(stuck))} stuck terminating for more than "
                                                 f"{fp.node_failure_timeout_seconds}s"), stuck
    for pod in pods:
        node_name = pod.get("spec", {}).get("nodeName")
        if not node_name or pod.get("status", {}).get("phase") not in ("Running", "Pending"):
            continue
        if node_name not in obs.nodes:
            continue  # not observed (no RBAC to read nodes): unknown is not lost
        if _node_lost(obs.nodes[node_name], obs.now, timeout):
            return Failure(Reason.NODE_LOST, f"node {node_name} of pod {pod['metadata']['name']} is not Ready for "
                                             f"more than {fp.node_failure_timeout_seconds}s"), []
    if job is not None and _job_condition(job, "Failed"):
        c = _job_condition(job, "Failed")
        return Failure(Reason.POD_FAILED, f"job {job['metadata']['name']} failed: {c.get('reason')}: "
                                          f"{c.get('message', '')}".strip()), []
    return None, []


def _stuck_terminating(pod: dict[str, Any], now: datetime, timeout: timedelta) -> bool:
    """Still there ``timeout`` after its grace period ended (a graceful deletion sets deletionTimestamp
    to the end of the grace period)."""
    deleted = parse_ts(pod["metadata"].get("deletionTimestamp"))
    return deleted is not None and now - deleted > timeout


def backoff_seconds(ft: ForgeTraining, failures: int) -> int:
    fp = ft.spec.failure_policy
    if failures <= 0:
        return 0
    return min(fp.max_backoff_seconds, fp.backoff_seconds * 2 ** (failures - 1))


# --------------------------------------------------------------------------- progress
def read_progress(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Rank 0's last report: its progress annotation, or its final summary in the termination message."""
    for pod in pods:
        if pod_index(pod) != "0":
            continue
        term = _terminated(pod) or {}
        # the final summary (termination message) is newer than the last periodic report
        for text in (term.get("message"), (pod["metadata"].get("annotations") or {}).get(ANNOTATION_PROGRESS)):
            data = _last_json_line(text)
            if "step" not in data:
                continue
            if "trainLoss" in data or "valLoss" in data:  # the trainer's RunSummary
                data = {**data, "loss": data.get("trainLoss"), "validationLoss": data.get("valLoss")}
                if data.get("status") == "completed":
                    data["percent"], data["etaSeconds"] = 100.0, 0
            return data
    return None


PROGRESS_KEYS = ("step", "totalSteps", "tokensSeen", "tokenBudget", "percent", "loss", "validationLoss",
                 "learningRate", "tokensPerSecond", "mfu", "etaSeconds", "updatedAt")


def merge_progress(old: dict[str, Any] | None, report: dict[str, Any], now: datetime) -> dict[str, Any]:
    new = {k: report[k] for k in PROGRESS_KEYS if report.get(k) is not None}
    for k in ("step", "totalSteps", "tokensSeen", "tokenBudget", "etaSeconds"):
        if k in new:
            new[k] = int(new[k])
    if "percent" in new:
        new["percent"] = round(float(new["percent"]), 1)
    if "etaSeconds" in new:
        new["eta"] = human_duration(new["etaSeconds"])
    old = old or {}
    # any change counts: after a restart the step goes back to the checkpoint's, then forward again
    moved = new.get("step") != old.get("step")
    new["lastStepTime"] = ts(now) if moved or not old.get("lastStepTime") else old["lastStepTime"]
    return new


# --------------------------------------------------------------------------- the plan
def set_phase(status: dict[str, Any], phase: str, reason: str, message: str, now: datetime,
              generation: int | None) -> None:
    status["phase"] = phase
    conds = status.get("conditions") or []
    if phase != "Running" and C.is_true(conds, C.STALLED):  # stalled describes a running group only
        conds = C.set_condition(conds, C.STALLED, False, Reason.NOT_RUNNING, f"phase {phase}", now, generation)
    for p, type_ in PHASE_CONDITION.items():
        if p == phase:
            conds = C.set_condition(conds, type_, True, reason, message, now, generation)
        elif type_ == C.RESTARTING and phase not in ("Running", *TERMINAL):
            continue  # a restart is "in progress" until the group runs again
        elif C.find(conds, type_) is not None:
            conds = C.set_condition(conds, type_, False, reason, message, now, generation)
    status["conditions"] = conds


def plan_training(obj: dict[str, Any], obs: Observed, settings: Settings = Settings()) -> Plan:
    old_status = obj.get("status") or {}
    status: dict[str, Any] = json.loads(json.dumps(old_status))
    generation = obj.get("metadata", {}).get("generation")
    status["observedGeneration"] = generation
    now = obs.now
    plan = Plan(status=status)
    old_phase = old_status.get("phase")

    def transition(phase: str, reason: str, message: str, warning: bool = False) -> None:
        set_phase(status, phase, reason, message, now, generation)
        if phase != old_phase:
            plan.events.append(Event("Warning" if warning else "Normal", reason, message))

    # 1. the spec must translate into a runnable trainer configuration
    try:
        ft = ForgeTraining.model_validate({k: v for k, v in obj.items() if k != "status"})
        trainer_yaml = trainer_config(ft).to_yaml()
    except (ValidationError, TranslationError, ValueError) as err:
        # Nothing is lost: running workers keep the last good spec, and the training goes on from
        # here once the spec is fixed. Only the condition (and one event) says what is wrong.
        message = format_error(err)
        was_invalid = C.is_true(old_status.get("conditions"), C.INVALID)
        status["conditions"] = C.set_condition(status.get("conditions"), C.INVALID, True, Reason.INVALID_SPEC,
                                               message, now, generation)
        status.setdefault("phase", "Pending")
        if not was_invalid or C.find(old_status.get("conditions"), C.INVALID).get("message") != message:
            plan.events.append(Event("Warning", Reason.INVALID_SPEC, message))
        return plan
    # an Invalid spec is fixed now; a refused child (Reason.CHILD_REJECTED) is cleared by the handler
    # once the API server accepts every child
    if (C.find(status.get("conditions"), C.INVALID) or {}).get("reason") == Reason.INVALID_SPEC:
        status["conditions"] = [c for c in status["conditions"] if c["type"] != C.INVALID]

    spec = ft.spec
    n = spec.resources.num_nodes
    restart_count = int(status.get("restartCount") or 0)
    failures = int(status.get("failureCount") or 0)
    current_name = job_name(ft, restart_count)
    current = next((j for j in obs.jobs if j["metadata"]["name"] == current_name
                    and not j["metadata"].get("deletionTimestamp")), None)
    # Jobs of earlier attempts go; a Job of a later attempt than the status knows is never touched
    plan.delete_jobs = [j["metadata"]["name"] for j in obs.jobs
                        if _attempt(j) is not None and _attempt(j) < restart_count
                        and not j["metadata"].get("deletionTimestamp")]
    attempt_pods = [p for p in obs.pods if (p["metadata"].get("labels") or {}).get(LABEL_ATTEMPT)
                    == str(restart_count)]
    # the workers of this attempt's Job; pods of a deleted Job of the same name are only stopping
    pods = [p for p in attempt_pods if current is not None and _owned_by(p, current)]

    # 2. what rank 0 reported, and who ran
    report = read_progress(pods) or read_progress(attempt_pods)
    if report is not None:
        status["progress"] = merge_progress(old_status.get("progress"), report, now)
        ckpt = report.get("lastCheckpoint")
        if isinstance(ckpt, dict) and ckpt.get("step") is not None:
            status["lastCheckpoint"] = {k: ckpt[k] for k in ("step", "path", "time") if ckpt.get(k) is not None}
        budget = status.setdefault("budget", {})
        budget["tokens"] = int(report.get("tokensSeen") or budget.get("tokens") or 0)
    nodes = set(status.get("nodes") or [])
    nodes.update(p["spec"]["nodeName"] for p in pods if p.get("spec", {}).get("nodeName"))
    if nodes:
        status["nodes"] = sorted(nodes)

    running = [p for p in pods if p.get("status", {}).get("phase") == "Running"
               and not p["metadata"].get("deletionTimestamp")]
    _account_gpu_hours(status, ft, len(running), now)

    # 3. finished trainings only age out
    if old_phase in TERMINAL:
        plan.apply = desired_children(ft, trainer_yaml, WorkerState(restart_count), image=settings.trainer_image,
                                      include_job=False)
        ttl = spec.ttl_seconds_after_finished
        done = parse_ts(status.get("completionTime"))
        if current is not None and ttl is not None and done is not None:
            left = (done + timedelta(seconds=ttl) - now).total_seconds()
            if left <= 0:
                plan.delete_jobs.append(current_name)
            else:
                plan.requeue_after = left
        # a Job with a failed pod ends by itself (backoffLimit 0) and is kept for its logs; one whose
        # workers still run (lost node, budget used up, spec now invalid) is stopped: SIGTERM, checkpoint
        if _active(current) and not any(p.get("status", {}).get("phase") == "Failed" for p in pods):
            plan.delete_jobs.append(current_name)
        return plan

    max_gpu_hours = spec.training.budget.max_gpu_hours
    if max_gpu_hours is not None and status["budget"]["gpuHours"] >= max_gpu_hours:
        status["completionTime"] = ts(now)
        transition("Failed", Reason.GPU_HOUR_BUDGET_EXHAUSTED,
                   f"{status['budget']['gpuHours']:.2f} GPU-hours used, budget.maxGpuHours={max_gpu_hours}; the "
                   f"workers were stopped (they checkpoint on SIGTERM)", warning=True)
        if _active(current):
            plan.delete_jobs.append(current_name)
        return plan

    if _deadline_passed(ft, status, current, pods, now, plan, transition):
        return plan

    user_suspend = spec.scheduling.suspend
    job_suspended = bool(current and current.get("spec", {}).get("suspend"))
    # Kueue owns `suspend` of a queued Job (it unsuspends what it admitted), so a user's suspension
    # of a queued training deletes the Job instead: its workload leaves the queue and frees its quota,
    # and resuming queues a new Job for the same attempt
    kueue_suspend = user_suspend and bool(spec.scheduling.queue_name)
    if kueue_suspend and _active(current):  # a finished Job is judged first (success, failure)
        plan.delete_jobs.append(current_name)
        current, pods, running, job_suspended = None, [], [], False

    # 4. success, or a reason to restart the group
    if current is not None and _job_condition(current, "Complete"):
        status["completionTime"] = ts(now)
        status["modelRef"] = {"location": spec.output.location.to_dict(), "provenance": "provenance.json"}
        transition("Succeeded", Reason.TRAINING_COMPLETED, f"training finished; model exported to "
                                                            f"{spec.output.location.pvc.claim_name}:/"
                                                            f"{spec.output.location.pvc.path}")
        plan.apply = desired_children(ft, trainer_yaml, WorkerState(restart_count), image=settings.trainer_image,
                                      include_job=False)
        return plan

    failure, stuck = (None, [])
    if current is not None and not job_suspended:
        failure, stuck = group_failure(ft, current, pods, obs)
    # An edit is a new attempt: for a Job that runs, and for a suspended one before it runs again (a
    # resume, or Kueue's admission), never the old Job with the new spec. Past the deadline an edit
    # changes nothing: the trainer is ending the run.
    if failure is None and current is not None and not user_suspend and not _deadline_reached(ft, now):
        want = spec_hash(ft)
        have = (current["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
        if have and have != want:
            failure = Failure(Reason.RESOURCES_CHANGED, "the spec changed (resources, budget or hyperparameters); "
                                                        "restarting from the last checkpoint")
    plan.force_delete_pods = stuck

    if failure is not None:
        counts = failure.reason not in NOT_A_FAILURE
        non_retryable = set(ALWAYS_NON_RETRYABLE) | set(spec.failure_policy.non_retryable_exit_codes or [])
        if failure.exit_code in non_retryable:
            status["completionTime"] = ts(now)
            transition("Failed", Reason.NON_RETRYABLE_EXIT_CODE, failure.message, warning=True)
            return plan
        if _deadline_reached(ft, now):
            status["completionTime"] = ts(now)
            transition("Failed", Reason.DEADLINE_EXCEEDED,
                       f"training.budget.deadline {ts(_deadline(ft))} has passed, so the "
                       f"workers are not restarted; last failure: {failure.message}", warning=True)
            return plan
        if counts and failures >= spec.failure_policy.max_restarts:
            status["completionTime"] = ts(now)
            transition("Failed", Reason.MAX_RESTARTS_EXCEEDED,
                       f"{failures} restarts used up failurePolicy.maxRestarts={spec.failure_policy.max_restarts}; "
                       f"last failure: {failure.message}", warning=True)
            return plan
        restart_count += 1
        failures += 1 if counts else 0
        resume = (status.get("lastCheckpoint") or {}).get("step")
        record = {"time": ts(now), "reason": failure.reason, "message": failure.message}
        if failure.exit_code is not None:
            record["exitCode"] = failure.exit_code
        if resume is not None:
            record["step"] = resume
        status["restarts"] = ([*(status.get("restarts") or []), record])[-MAX_RESTART_RECORDS:]
        status["restartCount"] = restart_count
        status["failureCount"] = failures
        plan.delete_jobs.append(current_name)
        current, pods, running = None, [], []
        where = f"checkpoint step {resume}" if resume is not None else "the start (no checkpoint yet)"
        status["conditions"] = C.set_condition(status.get("conditions"), C.RESTARTING, True, failure.reason,
                                               f"{failure.message}; restart {restart_count} resumes from {where}",
                                               now, generation)
        plan.events.append(Event("Warning", failure.reason, f"restarting all {n} workers (restart {restart_count}): "
                                                            f"{failure.message}; resuming from {where}"))

    # 5. the Job this attempt should have
    waiting = 0.0
    if current is None and restart_count > 0:
        last = (status.get("restarts") or [{}])[-1]
        last_time = parse_ts(last.get("time"))
        delay = 0 if last.get("reason") in NOT_A_FAILURE else backoff_seconds(ft, failures)
        if last_time is not None:
            waiting = (last_time + timedelta(seconds=delay) - now).total_seconds()
    # Kueue owns `suspend` of a queued Job: created suspended, unsuspended by Kueue on admission.
    queued = bool(spec.scheduling.queue_name) and (current is None or job_suspended) and not user_suspend
    # the pod template of an attempt is fixed when the attempt starts: it names the checkpoint the
    # restart resumes from (the trainer itself always resumes from the latest complete one)
    last_restart = (status.get("restarts") or [{}])[-1] if restart_count else {}
    state = WorkerState(restart_count=restart_count, resume_step=last_restart.get("step"),
                        suspend=user_suspend or queued, restart_reason=last_restart.get("reason", ""))
    # The next workers start once the last ones have stopped: these may still be writing their
    # checkpoint into the same directory (preStop hook, up to the grace period), and the next ones
    # resume from it and rendezvous under the same names. That is: a new Job waits for every worker
    # of the training, and a suspended Job resumes once the pods its suspension deleted are gone.
    stopping, stuck = [], []
    if current is None:
        mine = [p for p in obs.pods if (a := _attempt(p)) is not None and a <= restart_count]
        stopping, stuck = _still_stopping(ft, obs, mine)
        # workers whose Job is gone and that nobody deletes (the Job deleted with --cascade=orphan,
        # or before the garbage collector got to them) are stopped gracefully
        jobs = {j["metadata"].get("uid") for j in obs.jobs}
        plan.delete_pods = [p["metadata"]["name"] for p in stopping if not p["metadata"].get("deletionTimestamp")
                            and not any(r.get("uid") in jobs for r in p["metadata"].get("ownerReferences") or [])]
    elif job_suspended and not user_suspend and not spec.scheduling.queue_name:  # Kueue resumes a queued one
        stopping, stuck = _still_stopping(ft, obs, pods)
    plan.force_delete_pods += [name for name in stuck if name not in plan.force_delete_pods]
    # The Job is applied once, when its attempt starts; its template never changes after that (an edit
    # is a new attempt). Afterwards only `suspend` is written, and only when the user's wish differs
    # from what is observed, so a stale read can never undo Kueue's admission.
    plan.apply = desired_children(ft, trainer_yaml, state, image=settings.trainer_image,
                                  include_job=current is None and waiting <= 0 and not kueue_suspend
                                  and not stopping)
    if current is not None:
        if user_suspend and not job_suspended:
            plan.suspend_job = (current_name, True)
        elif not user_suspend and job_suspended and not spec.scheduling.queue_name and not stopping:
            plan.suspend_job = (current_name, False)

    # 6. the phase, from what runs now
    plan.requeue_after = waiting if waiting > 0 else settings.resync_seconds
    if waiting > 0:
        transition("Restarting", Reason.BACKING_OFF, f"restart {restart_count} in {int(waiting) + 1}s "
                                                     f"(failurePolicy backoff)", warning=True)
    elif user_suspend:
        active = [p for p in attempt_pods if p.get("status", {}).get("phase") in ("Pending", "Running")]
        msg = "suspended by the user" + (f"; {len(active)} workers still stopping" if active else "; no workers run")
        transition("Suspended", Reason.SUSPENDED_BY_USER, msg)
    elif stopping:
        plan.requeue_after = min(settings.resync_seconds, 5.0)
        earlier = any((_attempt(p) or 0) < restart_count for p in stopping)
        transition("Restarting" if earlier else "Pending", Reason.WORKERS_STOPPING,
                   f"waiting for {len(stopping)} worker(s) of the last run to stop (they write a "
                   f"checkpoint first) before starting {n} new ones")
    elif state.suspend:
        transition("Queued", Reason.QUEUED_BY_KUEUE, f"waiting for Kueue to admit the workers from queue "
                                                      f"{spec.scheduling.queue_name}")
    elif len(running) == n:
        status.setdefault("startTime", ts(now))
        message = f"all {n} ranks running"
        reason = Reason.RESUMED if _resumed(status) else Reason.ALL_RANKS_RUNNING
        transition("Running", reason, message)
    elif any(p.get("spec", {}).get("nodeName") for p in pods):
        transition("Initializing", Reason.PODS_STARTING, f"{len(running)}/{n} ranks running")
    else:
        set_phase(status, "Pending", Reason.CREATED, f"waiting for {n} worker pods to be scheduled", now, generation)
        if old_phase != "Pending":
            plan.events.append(Event("Normal", Reason.CREATED, f"created {n} worker(s) as job "
                                                               f"{job_name(ft, restart_count)}"))
    _check_stall(status, ft, now, generation, plan)
    return plan


def _deadline(ft: ForgeTraining) -> datetime | None:
    """training.budget.deadline in UTC (a time without a zone is taken as UTC)."""
    deadline = ft.spec.training.budget.deadline
    if deadline is None:
        return None
    if deadline.tzinfo is None:
        return deadline.replace(tzinfo=timezone.utc)
    return deadline.astimezone(timezone.utc)


def _deadline_reached(ft: ForgeTraining, now: datetime) -> bool:
    deadline = _deadline(ft)
    return deadline is not None and now >= deadline


def _deadline_passed(ft: ForgeTraining, status: dict[str, Any], current: dict[str, Any] | None,
                     pods: list[dict[str, Any]], now: datetime, plan: Plan, transition) -> bool:
    """budget.deadline, the operator's part: the trainer ends a running training at the deadline itself
    (checkpoint, export: Succeeded). Workers that are not running by then are never started (like a
    Job's activeDeadlineSeconds), and workers still busy long after it are stopped. A worker that
    failed is reported as the failure it is (and not restarted after the deadline)."""
    deadline = _deadline(ft)
    if deadline is None or (current is not None and _job_condition(current, "Complete")):
        return False
    late = (now - deadline).total_seconds()
    if late < 0 or any(p.get("status", {}).get("phase") == "Failed" for p in pods):
        return False
    started = any(p.get("status", {}).get("phase") in ("Running", "Succeeded") for p in pods)
    overdue = ft.spec.resources.termination_grace_period_seconds + DEADLINE_SLACK_SECONDS
    if started and late <= overdue:
        return False  # the trainer is ending it (checkpoint and export)
    when = ts(deadline)
    if started:
        message = (f"training.budget.deadline {when} passed {human_duration(late)} ago and the workers have not "
                   f"finished; they were stopped (they checkpoint on SIGTERM)")
    else:
        message = f"training.budget.deadline {when} passed while no worker was running"
    status["completionTime"] = ts(now)
    transition("Failed", Reason.DEADLINE_EXCEEDED, message, warning=True)
    if _active(current):
        plan.delete_jobs.append(current["metadata"]["name"])
    return True


def _resumed(status: dict[str, Any]) -> bool:
    """Running again after a suspension (rather than for the first time or after a restart)."""
    conds = status.get("conditions")
    suspended, restarting = C.find(conds, C.SUSPENDED), C.find(conds, C.RESTARTING)
    if suspended is None:
        return False
    return restarting is None or suspended["lastTransitionTime"] >= restarting["lastTransitionTime"]


def _still_stopping(ft: ForgeTraining, obs: Observed,
                    pods: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Those of ``pods`` that have not stopped yet, and those to force-delete: stuck terminating, or
    being deleted on a lost node (they cannot stop, no checkpoint comes from them, and they would
    still answer to the host names the next workers take)."""
    timeout = timedelta(seconds=ft.spec.failure_policy.node_failure_timeout_seconds)
    stopping: list[dict[str, Any]] = []
    stuck: list[dict[str, Any]] = []
    for pod in pods:
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        if pod.get("status", {}).get("phase") in TERMINAL and not deleting:
            continue
        node_name = pod.get("spec", {}).get("nodeName")
        if node_name in obs.nodes and _node_lost(obs.nodes[node_name], obs.now, timeout):
            if deleting:
                stuck.append(pod)
            continue
        (stuck if _stuck_terminating(pod, obs.now, timeout) else stopping).append(pod)
    return stopping, [p["metadata"]["name"] for p in stuck]


def _node_lost(node: dict[str, Any] | None, now: datetime, timeout: timedelta) -> bool:
    """Deleted, or not Ready for longer than the timeout (the NodeLost rule)."""
    ready, since = _node_ready(node)  # a deleted node (None) is not Ready, since never
    return not ready and (since is None or now - since > timeout)


def _attempt(obj: dict[str, Any]) -> int | None:
    """The attempt a Job or worker pod belongs to (its label)."""
    value = (obj["metadata"].get("labels") or {}).get(LABEL_ATTEMPT, "")
    return int(value) if value.isdigit() else None


def _owned_by(pod: dict[str, Any], job: dict[str, Any]) -> bool:
    uid = job["metadata"].get("uid")
    return uid is None or any(r.get("uid") == uid for r in pod["metadata"].get("ownerReferences") or [])


def _active(job: dict[str, Any] | None) -> bool:
    if job is None or job["metadata"].get("deletionTimestamp"):
        return False
    return not (_job_condition(job, "Complete") or _job_condition(job, "Failed"))


def _account_gpu_hours(status: dict[str, Any], ft: ForgeTraining, running: int, now: datetime) -> None:
    """Add the GPU time of the running workers since ``accountedAt``, once per ACCOUNTING_SECONDS.

    Booked in steps so that a reconcile caused by the operator's own status write finds nothing to
    write; while no worker runs, ``accountedAt`` is absent and no time is booked.
    """
    budget = status.setdefault("budget", {})
    budget.setdefault("gpuHours", 0.0)
    budget.setdefault("tokens", 0)
    if not running:
        budget.pop("accountedAt", None)
        return
    last = parse_ts(budget.get("accountedAt"))
    if last is None or now < last:
        budget["accountedAt"] = ts(now)
        return
    elapsed = (now - last).total_seconds()
    if elapsed < ACCOUNTING_SECONDS:
        return
    gpus = ft.spec.resources.gpus_per_node
    budget["gpuHours"] = round(float(budget["gpuHours"]) + elapsed * running * gpus / 3600, 4)
    budget["accountedAt"] = ts(now)


def _check_stall(status: dict[str, Any], ft: ForgeTraining, now: datetime, generation: int | None,
                 plan: Plan) -> None:
    """Stalled: Running, yet no new step reported for failurePolicy.stallTimeoutSeconds. The clock starts
    at the later of the last step change and the moment the group became Running (so a restart, a
    resume or a slow start never counts as a stall). Outside Running the condition is False."""
    limit = ft.spec.failure_policy.stall_timeout_seconds
    conds = status.get("conditions")
    if status.get("phase") != "Running" or not limit:  # 0: never
        return
    progress = status.get("progress") or {}
    times = [t for t in (parse_ts(progress.get("lastStepTime")),
                         parse_ts((C.find(conds, C.RUNNING) or {}).get("lastTransitionTime"))) if t]
    if not times:
        return
    since = max(times)
    stalled = (now - since).total_seconds() > limit
    was = C.is_true(conds, C.STALLED)
    if stalled:
        # the message names a time, not a duration, so it does not change (and cost a write) every reconcile
        msg = f"step {progress.get('step', 0)} has not advanced since {ts(since)} (stallTimeoutSeconds={limit})"
        status["conditions"] = C.set_condition(status["conditions"], C.STALLED, True, Reason.NO_PROGRESS, msg, now,
                                               generation)
        if not was:
            plan.events.append(Event("Warning", Reason.NO_PROGRESS, msg))
    elif C.find(status.get("conditions"), C.STALLED) is not None:
        status["conditions"] = C.set_condition(status["conditions"], C.STALLED, False, Reason.PROGRESSING,
                                               f"step {progress.get('step', 0)} advancing", now, generation)
