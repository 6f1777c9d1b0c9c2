"""How the world learns about a run: a Progress object for callbacks, the pod's
`forge.dev/progress` annotation, Prometheus metrics, and the termination message."""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..contract import (POD_NAME_ENV, POD_NAMESPACE_ENV, PROGRESS_ANNOTATION, LastCheckpoint, Progress,
                        TerminationMessage, rfc3339)

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def build_progress(
    *,
    step: int,
    total_steps: int | None,
    tokens_seen: int,
    token_budget: int | None,
    loss: float | None,
    learning_rate: float,
    grad_norm: float | None,
    tokens_per_second: float | None,
    mfu: float | None,
    last_checkpoint: LastCheckpoint | None,
    deadline: datetime | None = None,
    now: datetime | None = None,
    method_metrics: dict[str, float] | None = None,
) -> Progress:
    """The Progress object: percent and ETA follow the nearest of the step, token and deadline budgets."""
    now = now or datetime.now(timezone.utc)
    fractions = []
    if total_steps:
        fractions.append(step / total_steps)
    if token_budget:
        fractions.append(tokens_seen / token_budget)
    percent = 100.0 * min(max(fractions), 1.0) if fractions else None
    eta = None
    if tokens_per_second and fractions:
        remaining_tokens = []
        if total_steps and step:
            remaining_tokens.append((total_steps - step) * tokens_seen / step)
        if token_budget:
            remaining_tokens.append(token_budget - tokens_seen)
        if remaining_tokens:
            eta = max(min(remaining_tokens), 0) / tokens_per_second
    if deadline is not None:
        left = (deadline - now).total_seconds()
        eta = max(left, 0.0) if eta is None else max(min(eta, left), 0.0)
    return Progress(
        step=step,
        total_steps=total_steps,
        tokens_seen=tokens_seen,
        token_budget=token_budget,
        percent=None if percent is None else round(percent, 2),
        loss=loss,
        learning_rate=learning_rate,
        grad_norm=grad_norm,
        tokens_per_second=None if tokens_per_second is None else round(tokens_per_second, 1),
        mfu=None if mfu is None else round(mfu, 4),
        eta_seconds=None if eta is None else round(eta),
        updated_at=rfc3339(now),
        last_checkpoint=last_checkpoint,
        method_metrics={k: round(v, 6) for k, v in method_metrics.items()} if method_metrics else None,
    )


@dataclass(frozen=True)
class OwnPod:
    api: Any  # a kubernetes CoreV1Api
    name: str
    namespace: str


def own_pod(purpose: str) -> OwnPod | None:
    """This worker's pod and a client for it, when it runs in one (the downward API's name and namespace,
    a service account token); None elsewhere, or with a warning naming ``purpose`` when the client fails."""
    name, namespace = os.environ.get(POD_NAME_ENV), os.environ.get(POD_NAMESPACE_ENV)
    if not name or not namespace or not SERVICE_ACCOUNT_TOKEN.exists():
        return None
    try:
        from kubernetes import client, config

        config.load_incluster_config()
        return OwnPod(client.CoreV1Api(), name, namespace)
    except Exception as e:  # no kubernetes client or config: local only
        log.warning("cannot %s pod %s/%s: %s", purpose, namespace, name, e)
        return None


class PodAnnotator:
    """Patches this pod's progress annotation from a background thread.

    Only the newest value matters, so the queue holds one; a failed patch is
    logged once and never stops training.
    """

    def __init__(self, name: str, namespace: str, api):
        self._api = api  # a kubernetes CoreV1Api
        self._name, self._namespace = name, namespace
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name="forge-progress-annotator", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls) -> PodAnnotator | None:
        own = own_pod("report progress on")
        return cls(own.name, own.namespace, own.api) if own is not None else None

    def submit(self, progress: Progress) -> None:
        try:
            self._queue.get_nowait()
        except queue.Empty:
            pass
        try:
            self._queue.put_nowait(progress)
        except queue.Full:
            pass

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            progress = self._queue.get()
            if progress is None:
                return
            body = {"metadata": {"annotations": {PROGRESS_ANNOTATION: progress.to_json()}}}
            try:
                self._api.patch_namespaced_pod(self._name, self._namespace, body, _request_timeout=10)
            except Exception as e:
                if not self._warned:
                    log.warning("cannot annotate pod %s/%s with progress (will keep trying quietly): %s", self._namespace, self._name, e)
                    self._warned = True


class Metrics:
    """Prometheus gauges on rank 0's metrics port (a private registry, so runs in one process do not clash)."""

    def __init__(self, port: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        g = lambda name, doc: Gauge(name, doc, registry=self.registry)  # noqa: E731
        self.step = g("forge_trainer_step", "Optimizer steps done")
        self.tokens = Counter("forge_trainer_tokens_seen", "Training tokens seen", registry=self.registry)
        self.loss = g("forge_trainer_loss", "Training loss (mean over the last log window)")
        self.lr = g("forge_trainer_learning_rate", "Current learning rate")
        self.grad_norm = g("forge_trainer_grad_norm", "Global gradient norm before clipping")
        self.tps = g("forge_trainer_tokens_per_second", "Training tokens per second, all workers")
        self.mfu = g("forge_trainer_mfu", "Model FLOPs utilisation (0 when the peak is unknown)")
        self.eta = g("forge_trainer_eta_seconds", "Estimated seconds until the budget is reached")
        self.method = Gauge("forge_trainer_method_metric", "The training method's own figures by name (dpo: "
                            "reward_accuracy, reward_margin, logp_chosen, logp_rejected)", ["name"], registry=self.registry)
        self._tokens_reported = 0
        started = start_http_server(port, registry=self.registry)
        self._server = started[0] if isinstance(started, tuple) else None

    def update(self, p: Progress) -> None:
        self.step.set(p.step)
        delta = p.tokens_seen - self._tokens_reported
        if delta > 0:
            self.tokens.inc(delta)
            self._tokens_reported = p.tokens_seen
        for gauge, value in ((self.loss, p.loss), (self.lr, p.learning_rate), (self.grad_norm, p.grad_norm),
                             (self.tps, p.tokens_per_second), (self.mfu, p.mfu), (self.eta, p.eta_seconds)):
            gauge.set(value if value is not None else 0)
        for name, value in (p.method_metrics or {}).items():
            self.method.labels(name).set(value)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class Reporter:
    """Rank 0's progress fan-out: callback, pod annotation, metrics."""

    def __init__(self, on_progress, metrics_port: int | None):
        self.on_progress = on_progress
        self.annotator = PodAnnotator.from_env()
        self.metrics = Metrics(metrics_port) if metrics_port else None

    def report(self, progress: Progress) -> None:
        if self.metrics is not None:
            self.metrics.update(progress)
        if self.annotator is not None:
            self.annotator.submit(progress)
        if self.on_progress is not None:
            self.on_progress(progress)

    def close(self) -> None:
        if self.annotator is not None:
            self.annotator.close()
        if self.metrics is not None:
            self.metrics.close()


def write_termination_message(path: str, message: TerminationMessage) -> None:
    """One line of JSON for the kubelet's terminationMessagePath, if its directory is writable."""
    p = Path(path)
    try:
        if not p.parent.is_dir() or not os.access(p.parent, os.W_OK) and not os.access(p, os.W_OK):
            return
        p.write_text(message.to_json() + "\n")
    except OSError:
        pass

