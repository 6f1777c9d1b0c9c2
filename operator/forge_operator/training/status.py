"""The status fields that describe how the training is going: progress, checkpoint, nodes, Stalled."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..api.enums import ConditionType as T, Phase, Reason
from ..api.names import ANNOTATION_PROGRESS
from ..api.training import ProgressStatus
from ..k8s import conditions as C
from ..k8s.objects import annotations_of, parse_ts, ts
from .draft import Draft
from .observe import Attempt, last_json_line, pod_index, terminated

# status.progress as the trainer reports it; the operator adds eta (for people) and lastStepTime itself
PROGRESS_KEYS = tuple(f.alias for name, f in ProgressStatus.model_fields.items()
                      if name not in ("eta", "last_step_time"))


def read_progress(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Rank 0's last report: its progress annotation, or its final summary in the termination message."""
    for pod in pods:
        if pod_index(pod) != "0":
            continue
        term = terminated(pod) or {}
        # the final summary (termination message) is newer than the last periodic report
        for text in (term.get("message"), annotations_of(pod).get(ANNOTATION_PROGRESS)):
            data = last_json_line(text)
            if "step" not in data:
                continue
            if "trainLoss" in data or "valLoss" in data:  # the trainer's RunSummary
                data = {**data, "loss": data.get("trainLoss"), "validationLoss": data.get("valLoss")}
                if data.get("status") == "completed":
                    data["percent"], data["etaSeconds"] = 100.0, 0
            return data
    return None


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


def record_progress(d: Draft, attempt: Attempt) -> None:
    """What rank 0 reported (progress, the last checkpoint, tokens) and which nodes ran workers."""
    status = d.status
    report = read_progress(attempt.pods) or read_progress(attempt.all_pods)
    if report is not None:
        status["progress"] = merge_progress(d.old_status.get("progress"), report, d.now)
        ckpt = report.get("lastCheckpoint")
        if isinstance(ckpt, dict) and ckpt.get("step") is not None:
            status["lastCheckpoint"] = {k: ckpt[k] for k in ("step", "path", "time") if ckpt.get(k) is not None}
        budget = status.setdefault("budget", {})
        budget["tokens"] = int(report.get("tokensSeen") or budget.get("tokens") or 0)
    nodes = set(status.get("nodes") or [])
    nodes.update(p["spec"]["nodeName"] for p in attempt.pods if p.get("spec", {}).get("nodeName"))
    if nodes:
        status["nodes"] = sorted(nodes)


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

