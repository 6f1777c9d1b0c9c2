"""Prometheus metrics of the operator: training signals per ForgeTraining, not only lifecycle counts."""

from __future__ import annotations

from typing import Any

from prometheus_client import Gauge, start_http_server

from ..api.enums import TRAINING_PHASES

PHASES = tuple(str(p) for p in TRAINING_PHASES)
LABELS = ("namespace", "name")

PHASE = Gauge("forge_training_phase", "1 for the current phase of the training", [*LABELS, "phase"])
STEP = Gauge("forge_training_step", "Optimizer steps done", LABELS)
TOKENS = Gauge("forge_training_tokens_seen", "Training tokens consumed", LABELS)
LOSS = Gauge("forge_training_loss", "Training loss reported by rank 0", LABELS)
TOKENS_PER_SECOND = Gauge("forge_training_tokens_per_second", "Training throughput over all GPUs", LABELS)
PROGRESS = Gauge("forge_training_progress_ratio", "Progress towards the budget, 0-1", LABELS)
ETA = Gauge("forge_training_eta_seconds", "Estimated seconds to the end of the budget", LABELS)
RESTARTS = Gauge("forge_training_restarts", "Restarts of the worker group", LABELS)
GPU_HOURS = Gauge("forge_training_gpu_hours", "GPU-hours consumed", LABELS)
GPU_HOURS_LIMIT = Gauge("forge_training_gpu_hours_limit", "The training's spec.budget.maxGpuHours (absent when unset)",
                        LABELS)
MFU = Gauge("forge_training_mfu", "Model FLOPs utilisation reported by rank 0, 0-1", LABELS)


def observe_training(namespace: str, name: str, status: dict[str, Any]) -> None:
    """Mirror a training's status into the gauges (called after every reconcile)."""
    key = (namespace, name)
    phase = status.get("phase")
    for p in PHASES:
        PHASE.labels(*key, p).set(1.0 if p == phase else 0.0)
    progress = status.get("progress") or {}
    for gauge, value in ((STEP, progress.get("step")), (TOKENS, progress.get("tokensSeen")),
                         (LOSS, progress.get("loss")), (TOKENS_PER_SECOND, progress.get("tokensPerSecond")),
                         (MFU, progress.get("mfu")),
                         (ETA, progress.get("etaSeconds")), (RESTARTS, status.get("restartCount", 0)),
                         (GPU_HOURS, (status.get("budget") or {}).get("gpuHours"))):
        if value is not None:
            gauge.labels(*key).set(float(value))
        elif gauge in (TOKENS_PER_SECOND, MFU, ETA):  # no worker runs: no throughput, no estimate (not the last one)
            _remove(gauge, key)
    if progress.get("percent") is not None:
        PROGRESS.labels(*key).set(float(progress["percent"]) / 100)


def observe_budget(namespace: str, name: str, spec: dict[str, Any]) -> None:
    """Mirror the training's GPU-hours limit (what the budget alert compares ``forge_training_gpu_hours`` to)."""
    limit = ((spec or {}).get("training") or {}).get("budget", {}).get("maxGpuHours")
    if limit is not None:
        GPU_HOURS_LIMIT.labels(namespace, name).set(float(limit))
    else:
        _remove(GPU_HOURS_LIMIT, (namespace, name))


def _remove(gauge: Gauge, key: tuple[str, str]) -> None:
    try:
        gauge.remove(*key)
    except KeyError:
        pass


def serve(port: int) -> None:
    start_http_server(port)
