"""The status fields that describe how the training is going: progress, checkpoint, nodes, Stalled."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from forge_trainer.contract import Progress, TerminationMessage

from ..api.enums import ConditionType as T, Phase, Reason
from ..api.names import ANNOTATION_PROGRESS
from ..api.training import CheckpointRef, ProgressStatus
from ..k8s import conditions as C
from ..k8s.objects import annotations_of, parse_ts, truncate, ts
from .draft import Draft
from .observe import Attempt, pod_index, read_last_line, terminated


# status.nodes holds at most this many names (the CRD's maxItems, and the most nodes one attempt has) and
# this many characters in all: over many restarts on changing nodes, the oldest records give way
MAX_NODES = 4096
MAX_NODE_CHARS = 256 * 1024
MAX_PATH_CHARS = 4096  # a checkpoint's path as rank 0 reports it (PATH_MAX)


@dataclass(frozen=True)
class Report:
    """Rank 0's last report: a periodic Progress, or its final summary read as one."""

    progress: Progress
    validation_loss: float | None = None
    """Only the final summary has it."""


def read_progress(pods: list[dict[str, Any]]) -> Report | None:
    """Rank 0's last report: its progress annotation, or its final summary in the termination message."""
    for pod in pods:
        if pod_index(pod) != "0":
            continue
        # the final summary (termination message) is newer than the last periodic report
        message = read_last_line(TerminationMessage, (terminated(pod) or {}).get("message"))
        if message is not None and (summary := summary_report(message)) is not None:
            return summary
        progress = read_last_line(Progress, annotations_of(pod).get(ANNOTATION_PROGRESS))
        if progress is not None:
            return Report(progress)
    return None


def summary_report(message: TerminationMessage) -> Report | None:
    """A finished run's summary as its last progress report (a completed run is at 100%, nothing
    left); None for a message without a step (a failed run's carries only the error)."""
    if message.step is None:
        return None
    done = message.status == "completed"
    return Report(Progress(step=message.step, total_steps=message.total_steps, tokens_seen=message.tokens_seen,
                           loss=message.train_loss, last_checkpoint=message.last_checkpoint,
                           percent=100.0 if done else None, eta_seconds=0 if done else None),
                  validation_loss=message.val_loss)


def merge_progress(old: dict[str, Any] | None, report: Report, now: datetime) -> dict[str, Any]:
    """status.progress: what the trainer reported (the ProgressStatus fields of the same name as the
    Progress's), plus eta (for people) and lastStepTime, which the operator adds itself."""
    reported = {**report.progress.model_dump(), "validation_loss": report.validation_loss}
    if reported["percent"] is not None:
        reported["percent"] = round(reported["percent"], 1)
    if reported["eta_seconds"] is not None:
        reported["eta"] = human_duration(reported["eta_seconds"])
    new = {f.alias: reported[name] for name, f in ProgressStatus.model_fields.items()
           if reported.get(name) is not None}
    old = old or {}
    # any change counts: after a restart the step goes back to the checkpoint's, then forward again
    moved = new.get("step") != old.get("step")
    new["lastStepTime"] = ts(now) if moved or not old.get("lastStepTime") else old["lastStepTime"]
    return new


def record_progress(d: Draft, attempt: Attempt) -> None:
    """What rank 0 reported (progress, the last checkpoint, tokens) and which nodes ran workers."""
    status = d.status
    report = read_progress(attempt.pods) or read_progress(attempt.all_pods)
    if report is not None:
        status["progress"] = merge_progress(d.old_status.get("progress"), report, d.now)
        ckpt = report.progress.last_checkpoint
        if ckpt is not None:
            written = ckpt.model_dump()
            written["path"] = truncate(written.get("path") or "", MAX_PATH_CHARS)
            status["lastCheckpoint"] = {f.alias: written[name] for name, f in CheckpointRef.model_fields.items()
                                        if written.get(name) is not None}
        budget = status.setdefault("budget", {})
        budget["tokens"] = int(report.progress.tokens_seen or budget.get("tokens") or 0)
    elif status.get("progress"):
        status["progress"] = resumed_progress(status["progress"], (status.get("restarts") or [None])[-1], d.now)
    if not attempt.running and status.get("progress"):
        status["progress"] = idle_progress(status["progress"])
    nodes = bounded_nodes({p["spec"]["nodeName"] for p in attempt.pods if p.get("spec", {}).get("nodeName")},
                          set(status.get("nodes") or []))
    if nodes:
        status["nodes"] = nodes


# what rank 0 measured while it ran: without a running worker it would be an extrapolation
RATES = ("tokensPerSecond", "mfu")
ETA_FIELDS = ("etaSeconds", "eta")


def idle_progress(progress: dict[str, Any]) -> dict[str, Any]:
    """status.progress while no worker runs (Pending, Queued, Restarting, Suspended, Failed): the step,
    tokens, loss and percent stay as they were; the throughput and the ETA go, since nothing is
    computing towards them. A finished run's ETA of 0 stays."""
    kept = {k: v for k, v in progress.items() if k not in RATES}
    if kept.get("etaSeconds") != 0:
        kept = {k: v for k, v in kept.items() if k not in ETA_FIELDS}
    return kept


def resumed_progress(progress: dict[str, Any], restart: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
    """After a restart and until the new workers report, the step is the one they resume from (the
    checkpoint the restart recorded; 0, the start, when there was none), not the one the last workers
    reached and lost. Only progress older than the restart is rewound, so it happens once per restart."""
    if not restart:
        return progress
    last = parse_ts(progress.get("lastStepTime"))
    when = parse_ts(restart.get("time"))
    if when is None or (last is not None and last >= when):
        return progress
    step = int(restart.get("step") or 0)
    rewound = {**progress, "step": step, "lastStepTime": ts(now)}
    if progress.get("totalSteps"):
        rewound["percent"] = round(100.0 * step / progress["totalSteps"], 1)
    return rewound


def bounded_nodes(current: set[str], earlier: set[str]) -> list[str]:
    """status.nodes, bounded (MAX_NODES names, MAX_NODE_CHARS characters): the nodes of the current attempt
    first, then those of earlier ones, each in name order; sorted."""
    kept: list[str] = []
    chars = 0
    for name in [*sorted(current), *sorted(earlier - current)]:
        if len(kept) == MAX_NODES:
            break
        if chars + len(name) <= MAX_NODE_CHARS:
            kept.append(name)
            chars += len(name)
    return sorted(kept)


def check_stall(d: Draft, stall_timeout_seconds: int) -> None:
    """Stalled: Running, yet no new step reported for failurePolicy.stallTimeoutSeconds. The clock starts
    at the later of the last step change and the moment the group became Running (so a restart, a
    resume or a slow start never counts as a stall). Outside Running the condition is False."""
    status, limit = d.status, stall_timeout_seconds
    if status.get("phase") != Phase.RUNNING or not limit:  # 0: never
        return
    progress = status.get("progress") or {}
    times = [t for t in (parse_ts(progress.get("lastStepTime")),
                         parse_ts((C.find(d.conditions, T.RUNNING) or {}).get("lastTransitionTime"))) if t]
    if not times:
        return
    since = max(times)
    was = C.is_true(d.conditions, T.STALLED)
    if (d.now - since).total_seconds() > limit:
        # the message names a time, not a duration, so it does not change (and cost a write) every reconcile
        msg = f"step {progress.get('step', 0)} has not advanced since {ts(since)} (stallTimeoutSeconds={limit})"
        d.set_condition(T.STALLED, True, Reason.NO_PROGRESS, msg)
        if not was:
            d.event(Reason.NO_PROGRESS, msg, warning=True)
    elif C.find(d.conditions, T.STALLED) is not None:
        d.set_condition(T.STALLED, False, Reason.PROGRESSING, f"step {progress.get('step', 0)} advancing")


def human_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if days:
        return f"{days}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"

