"""What the planner sees of a ForgeEval: the ForgeTrainings it names (model, baseline), its Job and pod, and
(before the Job exists, with network.egress Restricted) the Services its NetworkPolicy allows.

``read`` is the only function here that reads the API (through the runtime's reader)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ..api import defaults
from ..api.base import API_VERSION, StorageLocation
from ..api.names import LABEL_EVAL, LABEL_MANAGED_BY, MANAGED_BY
from ..k8s.network import NetworkSeen, read_network
from ..k8s.objects import Reader, deleting
from .children import egress_urls

TRAINING_KIND = "ForgeTraining"


@dataclass
class ObservedEval:
    now: datetime
    trainings: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    """name -> the ForgeTraining a trainingRef names (None: it does not exist)."""
    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    network: NetworkSeen = field(default_factory=NetworkSeen)
    """The Services of the in-cluster URLs the NetworkPolicy allows (read before the Job exists, if Restricted)."""


def read(reader: Reader, obj: dict[str, Any], now: datetime, job_name: str) -> ObservedEval:
    meta, spec = obj["metadata"], obj.get("spec") or {}
    refs = {(spec.get(k) or {}).get("trainingRef") for k in ("model", "baseline")} - {None}
    trainings = {ref: reader.get(API_VERSION, TRAINING_KIND, ref, meta["namespace"]) for ref in sorted(refs)}
    selector = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_EVAL}={meta['name']}"
    job = next((j for j in reader.list("batch/v1", "Job", meta["namespace"], selector)
                if j["metadata"]["name"] == job_name and not deleting(j)), None)
    pods = reader.list("v1", "Pod", meta["namespace"], selector) if job else []
    network = NetworkSeen()
    if job is None and (spec.get("network") or {}).get("egress", defaults.EGRESS) == "Restricted":
        models = [((t.get("status") or {}).get("modelRef") or {}).get("location") or {} for t in trainings.values() if t]
        network = read_network(reader, egress_urls(spec, models), meta["namespace"], api_server=False)
    return ObservedEval(now=now, trainings=trainings, job=job, pods=pods, network=network)


def training_output(training: dict[str, Any]) -> StorageLocation | None:
    """Where a ForgeTraining exported its model (status.modelRef.location); None when it says nowhere."""
    try:
        return StorageLocation.model_validate(((training.get("status") or {}).get("modelRef") or {}).get("location"))
    except ValidationError:
        return None


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The container's terminated state (exitCode, message), once it has ended."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if (t := (cs.get("state") or {}).get("terminated")) is not None:
            return t
    return None


def job_finished(job: dict[str, Any]) -> str | None:
    """"Complete" or "Failed" once the Job has ended (its condition), else None."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c["type"]
    return None
