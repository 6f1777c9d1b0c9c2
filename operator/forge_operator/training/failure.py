"""Why a worker group failed, and what to do about it: restart the whole group (with backoff), or
give up (a non-retryable exit code, restarts used up, the deadline passed)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from forge_trainer.contract import ExitCode, TerminationMessage

from ..api.enums import ConditionType as T, Reason
from ..api.training import ForgeTraining
from ..k8s import conditions as C
from ..k8s.objects import annotations_of, parse_ts, truncate, ts
from .budget import deadline, deadline_reached
from .children import ANNOTATION_SPEC_HASH, spec_hash
from .draft import Draft
from .fieldnames import in_spec_terms
from .observe import (
    Attempt, Observed, job_condition, last_line, node_ready, phase, pod_index, read_last_line, started, terminated,
    waiting_reason,
)

MAX_RESTART_RECORDS = 20
MAX_FAILED_PODS = 8  # failed pods listed in one restart record
# a node blamed for this many restarts (of those recorded) is kept out of the next attempts
AVOID_AFTER_BLAMES = 2
# a worker that died of a signal (exit code 128+N) it did not report itself: the node may be at fault
SIGNALLED = 128
# exit codes that no restart can fix, whatever failurePolicy.nonRetryableExitCodes says
ALWAYS_NON_RETRYABLE = (int(ExitCode.DATA_ERROR), int(ExitCode.CONFIG_ERROR))
# restarts the user asked for (an edit) do not use up failurePolicy.maxRestarts
NOT_A_FAILURE = (Reason.RESOURCES_CHANGED,)


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    exit_code: int | None = None
    # the exit code is the trainer's own (from its termination message), not torchrun's or the kubelet's
    from_trainer: bool = False
    # the node at fault, when the failure says the node is (see blamed_node)
    node: str | None = None


# --------------------------------------------------------------------------- detection
def pod_failure(pod: dict[str, Any]) -> Failure | None:
    """Why one worker pod failed, or None if it has not."""
    st = pod.get("status", {})
    name = pod["metadata"]["name"]
    node = pod.get("spec", {}).get("nodeName", "?")
    disruption = C.find(st.get("conditions"), "DisruptionTarget")
    if st.get("phase") != "Failed":
        return None
    if st.get("reason") == "Evicted":
        return Failure(Reason.EVICTED, f"pod {name} on node {node} was evicted: {st.get('message', '')}".strip(),
                       node=node)
    if st.get("reason") and terminated(pod) is None:  # refused by the kubelet before any container ran
        return Failure(Reason.POD_REJECTED, f"pod {name} was rejected by node {node}: {st['reason']}: "
                                            f"{st.get('message', '')}".strip(), node=node)
    if disruption and disruption.get("status") == "True" and "Preempt" in disruption.get("reason", ""):
        return Failure(Reason.PREEMPTED, f"pod {name} on node {node} was preempted")
    term = terminated(pod) or {}
    code = term.get("exitCode")
    # torchrun exits with its own code when a worker fails; the trainer's termination message
    # (one JSON line) carries the worker's documented exit code. A crash's stderr tail is no such
    # message: it reads as an empty one, and its last line is the detail.
    message = read_last_line(TerminationMessage, term.get("message")) or TerminationMessage()
    # a worker that finished (exit code 0) while another process of its pod failed explains nothing;
    # an older trainer's preempted message has no exit code
    preempted = message.status == "preempted"
    from_trainer = bool(message.exit_code) or preempted
    if message.exit_code:
        code = message.exit_code
    elif preempted:
        code = int(ExitCode.PREEMPTED)
    if term.get("reason") == "OOMKilled":
        return Failure(Reason.OOM_KILLED, f"pod {name} on node {node} was OOM-killed (exit code {code})", code)
    if code == ExitCode.PREEMPTED:
        return Failure(Reason.PREEMPTED, f"pod {name} on node {node} was stopped and saved a checkpoint "
                                         f"(exit code {code})", code, from_trainer)
    if code == ExitCode.RENDEZVOUS_TIMEOUT and from_trainer:
        return Failure(Reason.RENDEZVOUS_TIMEOUT, f"pod {name} on node {node}: {message.message}", code, True)
    detail = in_spec_terms(message.message or last_line(term.get("message")) or "")
    suffix = f": {detail[:300]}" if detail else ""
    signalled = not from_trainer and code is not None and code > SIGNALLED
    return Failure(Reason.POD_FAILED, f"pod {name} on node {node} failed with exit code {code}{suffix}", code,
                   from_trainer, node if signalled else None)


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
        first = sorted(failed, key=lambda f: not f.from_trainer)[0]
        if first.reason == Reason.RENDEZVOUS_TIMEOUT:
            first = replace(first, message=f"{first.message}; {not_started(pods, ft.spec.resources.num_nodes)}")
        return first, []
    stuck = [pod["metadata"]["name"] for pod in pods if stuck_terminating(pod, obs.now, timeout)]
    if stuck:
        first = next(p for p in pods if p["metadata"]["name"] == sorted(stuck)[0])
        return Failure(Reason.STUCK_TERMINATING, f"pods {', '.join(sorted(stuck))} stuck terminating for more than "
                                                 f"{fp.node_failure_timeout_seconds}s",
                       node=first.get("spec", {}).get("nodeName")), stuck
    for pod in pods:
        node_name = pod.get("spec", {}).get("nodeName")
        if not node_name or phase(pod) not in ("Running", "Pending"):
            continue
        if node_name not in obs.nodes:
            continue  # not observed (no RBAC to read nodes): unknown is not lost
        if node_lost(obs.nodes[node_name], obs.now, timeout):
            return Failure(Reason.NODE_LOST, f"node {node_name} of pod {pod['metadata']['name']} is not Ready for "
                                             f"more than {fp.node_failure_timeout_seconds}s", node=node_name), []
    if job is not None and (c := job_condition(job, "Failed")):
        return Failure(Reason.POD_FAILED, f"job {job['metadata']['name']} failed: {c.get('reason')}: "
                                          f"{c.get('message', '')}".strip()), []
    return None, []


def why_restart(d: Draft, ft: ForgeTraining, attempt: Attempt, obs: Observed) -> Failure | None:
    """A reason to replace the running group: a failure, or an edit of the spec. An edit is a new
    attempt for a Job that runs, and for a suspended one before it runs again (a resume, or Kueue's
    admission), never the old Job with the new spec. Past the deadline an edit changes nothing: the
    trainer is ending the run. Pods stuck terminating are force-deleted."""
    if attempt.job is None:
        return None
    failure, stuck = (None, []) if attempt.suspended else group_failure(ft, attempt.job, attempt.pods, obs)
    for name in stuck:
        d.delete_pod(name, force=True)
    if failure is None and not ft.spec.scheduling.suspend and not deadline_reached(ft, d.now):
        have = annotations_of(attempt.job).get(ANNOTATION_SPEC_HASH)
        if have and have != spec_hash(ft):
            failure = Failure(Reason.RESOURCES_CHANGED, "the spec changed (resources, budget or hyperparameters); "
                                                        "restarting from the last checkpoint")
    return failure


def not_started(pods: list[dict[str, Any]], num_nodes: int) -> str:
    """The node ranks whose container had not started when the failure was seen: those a rendezvous
    that timed out waited for (torch counts who joined, it does not name who did not)."""
    by_rank = {pod_index(p): p for p in pods}
    missing = []
    for rank in range(num_nodes):
        p = by_rank.get(str(rank))
        if p is None:
            missing.append(f"{rank} (no pod)")
        elif not started(p):
            missing.append(f"{rank} ({p['metadata']['name']}: {waiting_reason(p)})")
    if not missing:
        return "every node rank's container had started"
    return f"node ranks not started: {', '.join(missing)}"


def stuck_terminating(pod: dict[str, Any], now: datetime, timeout: timedelta) -> bool:
    """Still there ``timeout`` after its grace period ended (a graceful deletion sets deletionTimestamp
    to the end of the grace period)."""
    deleted = parse_ts(pod["metadata"].get("deletionTimestamp"))
    return deleted is not None and now - deleted > timeout


def node_lost(node: dict[str, Any] | None, now: datetime, timeout: timedelta) -> bool:
    """Deleted, or not Ready for longer than the timeout (the NodeLost rule)."""
    ready, since = node_ready(node)  # a deleted node (None) is not Ready, since never
    return not ready and (since is None or now - since > timeout)


# --------------------------------------------------------------------------- policy
def backoff_seconds(ft: ForgeTraining, failures: int) -> int:
    fp = ft.spec.failure_policy
    if failures <= 0:
        return 0
    return min(fp.max_backoff_seconds, fp.backoff_seconds * 2 ** (failures - 1))


def restart_or_fail(d: Draft, ft: ForgeTraining, attempt: Attempt, failure: Failure,
                    next_job_name: str) -> Attempt | None:
    """Restart the whole group (the next attempt, without a Job yet), or fail the training (None)."""
    spec = ft.spec
    counts = failure.reason not in NOT_A_FAILURE
    non_retryable = set(ALWAYS_NON_RETRYABLE) | set(spec.failure_policy.non_retryable_exit_codes or [])
    if failure.exit_code in non_retryable:
        d.fail(Reason.NON_RETRYABLE_EXIT_CODE, failure.message)
        return None
    if deadline_reached(ft, d.now):
        d.fail(Reason.DEADLINE_EXCEEDED, f"training.budget.deadline {ts(deadline(ft))} has passed, so the workers "
                                         f"are not restarted; last failure: {failure.message}")
        return None
    if counts and attempt.failures >= spec.failure_policy.max_restarts:
        d.fail(Reason.MAX_RESTARTS_EXCEEDED, f"{attempt.failures} restarts used up failurePolicy.maxRestarts="
                                             f"{spec.failure_policy.max_restarts}; last failure: {failure.message}")
        return None
    return restart(d, attempt, failure, counts, next_job_name, spec.resources.num_nodes)


def restart(d: Draft, attempt: Attempt, failure: Failure, counts: bool, next_job_name: str, workers: int) -> Attempt:
    """Record the restart in the status (before anything acts on it) and stop the current group."""
    status = d.status
    number, failures = attempt.number + 1, attempt.failures + (1 if counts else 0)
    resume = (status.get("lastCheckpoint") or {}).get("step")
    record: dict[str, Any] = {"time": ts(d.now), "reason": str(failure.reason), "message": truncate(failure.message)}
    if failure.exit_code is not None:
        record["exitCode"] = failure.exit_code
    if resume is not None:
        record["step"] = resume
    if failure.node:
        record["node"] = failure.node
    failed = failed_pods(attempt.pods)
    if failed:
        record["failedPods"] = failed
    status["restarts"] = [{**r, "message": truncate(r.get("message", ""))}
                          for r in [*(status.get("restarts") or []), record][-MAX_RESTART_RECORDS:]]
    status["restartCount"] = number
    status["failureCount"] = failures
    d.delete_job(attempt.job_name)
    where = f"checkpoint step {resume}" if resume is not None else "the start (no checkpoint yet)"
    d.set_condition(T.RESTARTING, True, failure.reason, f"{failure.message}; restart {number} resumes from {where}")
    also = [f"{p['name']} ({p['reason']}{_exit(p)}, node {p.get('node', '?')})" for p in failed]
    d.event(failure.reason, f"restarting all {workers} workers (restart {number}): {failure.message}; "
                            f"resuming from {where}" + (f"; failed pods: {', '.join(also)}" if len(also) > 1 else ""),
            warning=True)
    # the pods labelled with the old attempt are still the ones a suspension waits for
    return Attempt(number, failures, next_job_name, None, attempt.all_pods, [])



def _exit(p: dict[str, Any]) -> str:
    return f", exit code {p['exitCode']}" if p.get("exitCode") is not None else ""


def failed_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each failed pod of an attempt with its reason, in rank order, at most MAX_FAILED_PODS."""
    out = []
    for pod in sorted(pods, key=lambda p: int(pod_index(p) or 0)):
        f = pod_failure(pod)
        if f is None:
            continue
        entry: dict[str, Any] = {"name": pod["metadata"]["name"], "reason": str(f.reason)}
        if (rank := pod_index(pod)) is not None and rank.isdigit():
            entry["rank"] = int(rank)
        if node := pod.get("spec", {}).get("nodeName"):
            entry["node"] = node
        if f.exit_code is not None:
            entry["exitCode"] = f.exit_code
        out.append(entry)
    return out[:MAX_FAILED_PODS]


def avoided_nodes(status: dict[str, Any]) -> tuple[str, ...]:
    """The nodes blamed for at least AVOID_AFTER_BLAMES of the recorded restarts: the next attempts keep
    off them (a GPU or a link that keeps failing is the node's, not the training's)."""
    blamed = Counter(r["node"] for r in status.get("restarts") or [] if r.get("node"))
    return tuple(sorted(n for n, count in blamed.items() if count >= AVOID_AFTER_BLAMES))
