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


def observe_training(namespace: str, name: str, status: dict[str, Any]) -> None:
    """Mirror a training's status into the gauges (called after every reconcile)."""
    key = (namespace, name)
    phase = status.get("phase")
    for p in PHASES:
        PHASE.labels(*key, p).set(1.0 if p == phase else 0.0)
    progress = status.get("progress") or {}
    for gauge, value in ((STEP, progress.get("step")), (TOKENS, progress.get("tokensSeen")),
                         (LOSS, progress.get("loss")), (TOKENS_PER_SECOND, progress.get("tokensPerSecond")),
                         (ETA, progress.get("etaSeconds")), (RESTARTS, status.get("restartCount", 0)),
                         (GPU_HOURS, (status.get("budget") or {}).get("gpuHours"))):
        if value is not None:
            gauge.labels(*key).set(float(value))
        elif gauge in (TOKENS_PER_SECOND, ETA):  # no worker runs: no throughput, no estimate (not the last one)
            try:
                gauge.remove(*key)
            except KeyError:
                pass
    if progress.get("percent") is not None:
        PROGRESS.labels(*key).set(float(progress["percent"]) / 100)


def serve(port: int) -> None:
    start_http_server(port)
