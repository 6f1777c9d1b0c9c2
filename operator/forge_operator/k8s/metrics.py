"""Prometheus metrics of the operator itself, for every kind: how long reconciles take, how many fail
and why, how many objects wait on a requeue timer, how many objects are in each phase, and when the
last reconcile finished (an operator that stopped reconciling shows as a timestamp that no longer
moves). The trainings' own figures are in ``training/metrics.py``."""

from __future__ import annotations

import threading
import time

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_SECONDS = Histogram("forge_operator_reconcile_duration_seconds", "Time of one reconcile, by kind",
                              ["kind"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RECONCILE_ERRORS = Counter("forge_operator_reconcile_errors_total",
                           "Reconciles that raised (retried after the resync interval), by kind and error",
                           ["kind", "reason"])
REQUEUES_PENDING = Gauge("forge_operator_requeues_pending", "Objects waiting on a requeue timer (a resync, or a retry after a failed reconcile)")
RESOURCES = Gauge("forge_operator_resources", "Objects this replica reconciles, by kind and phase",
                  ["kind", "phase"])
LAST_RECONCILE = Gauge("forge_operator_last_reconcile_timestamp_seconds",
                       "Unix time when the last reconcile of a kind finished", ["kind"])


class PhaseCounts:
    """Keeps ``forge_operator_resources`` in step with the phase of each object, in O(1) per change."""

    def __init__(self) -> None:
        self._phases: dict[object, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def set(self, key: object, kind: str, phase: str | None) -> None:
        with self._lock:
            old = self._phases.pop(key, None)
            if old is not None:
                RESOURCES.labels(*old).dec()
            if phase is not None:
                self._phases[key] = (kind, phase)
                RESOURCES.labels(kind, phase).inc()


def finished(kind: str, started: float, error: BaseException | None = None) -> None:
    """Record one reconcile of ``kind`` begun at ``started`` (``time.monotonic()``)."""
    RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)
    LAST_RECONCILE.labels(kind).set(time.time())
    if error is not None:
        RECONCILE_ERRORS.labels(kind, type(error).__name__).inc()
