"""What the trainer and the operator agree on, defined once: names, exit codes, and the JSON that
crosses the process boundary (the progress annotation, the termination message).

The operator imports this module: it needs pydantic only (no torch). Field names are snake_case in
Python and camelCase on the wire (`model_dump(by_alias=True)`); the operator parses the same models.
The trainer writes every key; reading, only the keys without which a message means nothing are
required (a progress report's step, a checkpoint's step) and every other one may be missing (None),
so the operator still reads what an older trainer wrote.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from enum import IntEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

PROGRESS_ANNOTATION = "forge.dev/progress"
"""Rank 0 writes its progress JSON into this annotation of its own pod."""
POD_NAME_ENV = "FORGE_POD_NAME"
POD_NAMESPACE_ENV = "FORGE_POD_NAMESPACE"
"""The pod's name and namespace (downward API), so rank 0 can annotate it."""
CONTAINER_NAME = "trainer"
"""The worker pod's container, which runs the trainer."""
IMAGE_ENV = "FORGE_IMAGE"
"""The trainer image reference the operator put in the pod; provenance.json records it (and, read from the
pod's status, its digest)."""
NODE_NAME_ENV = "FORGE_NODE_NAME"
NODE_REGION_ENV = "FORGE_NODE_REGION"
NODE_ZONE_ENV = "FORGE_NODE_ZONE"
"""The node a worker runs on (downward API spec.nodeName) and the pod's topology.kubernetes.io/region and
zone labels (downward API; the API server copies them from the node at binding where its
PodTopologyLabelsAdmission plugin is on, else they are empty); provenance.json records them per node."""
TOPOLOGY_REGION_LABEL = "topology.kubernetes.io/region"
TOPOLOGY_ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
"""A one-line JSON summary goes here at exit: the final progress, or the error with its exit code."""
PRESTOP_COMMAND = ("python", "-m", "forge_trainer.prestop")
"""The worker container's preStop hook: SIGTERM to the trainer workers, then wait until they have
checkpointed and exited (before the kubelet sends SIGTERM to torchrun, which would SIGKILL them after 30 s)."""
LAUNCH_COMMAND = ("python", "-m", "forge_trainer.launch")
"""The worker container's command, followed by torchrun's arguments: torchrun itself, except that a
static rendezvous that times out ends with exit code RENDEZVOUS_TIMEOUT and a termination message."""


class ExitCode(IntEnum):
    """Process exit codes of `python -m forge_trainer`, sysexits(3)-style.

    The operator reads them: DATA_ERROR and CONFIG_ERROR are not retried (running again cannot
    help), PREEMPTED means a checkpoint was written and the run can resume. Any other code (a
    crash, 137 after an OOM kill) is a retryable failure."""

    OK = 0
    """Training finished (a budget was reached) and the model was exported."""
    DATA_ERROR = 65
    """The training data cannot be used: empty directory, unreadable file, a vocabulary larger than
    the data supports, too little text for one sequence."""
    PREEMPTED = 75
    """SIGTERM received: the current step finished, a checkpoint was written, resume later. Also
    SIGTERM before the first step (while the data is prepared): nothing to save, start again later."""
    RENDEZVOUS_TIMEOUT = 69
    """The nodes of the group did not all join torchrun's rendezvous within its timeout (a pod that
    could not start: an image pull, a volume attach, no room on any node). Written by
    `python -m forge_trainer.launch`; a restart may succeed."""
    CONFIG_ERROR = 78
    """The configuration is invalid or cannot run: bad field, seq_len above the model's context, a
    model/batch that cannot fit in memory, a missing base model."""


class TrainerError(Exception):
    """An error that ends the run with a documented exit code and a one-line message."""

    exit_code: int = 1
    kind = "error"

    def __str__(self) -> str:
        return f"{self.kind}: {super().__str__()}"


class DataError(TrainerError):
    exit_code = ExitCode.DATA_ERROR
    kind = "data error"


class ConfigError(TrainerError):
    exit_code = ExitCode.CONFIG_ERROR
    kind = "config error"


class StorageError(TrainerError):
    """An S3-compatible store refused or could not be reached: wrong credentials, an unreachable endpoint,
    no such bucket. Not retried (botocore has already retried what a retry can fix); the message names the
    location's field and what to check."""

    exit_code = ExitCode.CONFIG_ERROR
    kind = "storage error"


class RendezvousTimeout(TrainerError):
    exit_code = ExitCode.RENDEZVOUS_TIMEOUT
    kind = "rendezvous timed out"


class RewardError(TrainerError):
    """A reward function failed on a batch of completions (raised, returned the wrong number of scores or a
    non-number, its service did not answer): the step cannot be scored. Not retried: the same function
    fails the same way again."""

    exit_code = ExitCode.CONFIG_ERROR
    kind = "reward error"


class StoppedBeforeTraining(TrainerError):
    """SIGTERM during set-up (data preparation, model building): there is nothing to checkpoint yet."""

    exit_code = ExitCode.PREEMPTED
    kind = "stopped"


def error_named(kind: str, message: str) -> TrainerError | None:
    """The TrainerError another process reported, by class name and message (None: not one of them)."""
    known = (TrainerError, DataError, ConfigError, RewardError, RendezvousTimeout, StoppedBeforeTraining, StorageError)
    return next((cls(message) for cls in known if cls.__name__ == kind), None)


def rfc3339(t: datetime | None = None) -> str:
    """A time as the wire writes it: UTC, whole seconds, `Z`."""
    t = t or datetime.now(timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Wire(BaseModel):
    # Unknown keys are ignored: an operator reads what an older or newer trainer wrote.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore",
                              use_attribute_docstrings=True)

    def to_json(self) -> str:
        """One compact line of JSON with the wire's (camelCase) keys."""
        return json.dumps(self.to_wire(), separators=(",", ":"))

    def to_wire(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


class LastCheckpoint(_Wire):
    step: int
    path: str | None = None
    """The checkpoint's folder; the trainer always writes it."""
    time: str | None = None
    """When it was written (RFC 3339); unknown for a checkpoint of an older trainer."""


class Progress(_Wire):
    """Rank 0's periodic report: the pod annotation, the metrics, the `on_progress` callback.
    The trainer writes every key (null when unknown); a report is read with `step` alone, the rest
    missing (None), as an older or partial one may be."""

    step: int
    total_steps: int | None = None
    """The step the step or token budget ends the run at; null with only a deadline."""
    tokens_seen: int | None = None
    token_budget: int | None = None
    percent: float | None = None
    """Of the nearest budget (steps or tokens), 0-100."""
    loss: float | None = None
    """Training loss, the mean over the last log window."""
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    """All workers together."""
    mfu: float | None = None
    """Model FLOPs utilisation, 0-1; null where the peak FLOP/s of the device is unknown."""
    eta_seconds: int | None = None
    """Until the nearest of the step, token and deadline budgets."""
    updated_at: str | None = None
    last_checkpoint: LastCheckpoint | None = None
    method_metrics: dict[str, float] | None = None
    """The training method's own figures over the last log window, by name (dpo: reward_accuracy,
    reward_margin, logp_chosen, logp_rejected); null for a method that has none."""


class TerminationMessage(_Wire):
    """The one line `python -m forge_trainer` writes at exit, in the first process of each node.

    A finished run (`completed`, or `preempted` with a checkpoint) carries the run's summary, every
    key present; a failed one only `status`, `exitCode` and `message`. `step`, `totalSteps`,
    `tokensSeen` and `lastCheckpoint` are the Progress object's, so rank 0's message is the final
    progress. Written and read with the keys that were set (`exclude_unset`). The trainer always
    writes `status` and `exitCode`; reading, every key may be missing (an older trainer's `preempted`
    line has no `exitCode`)."""

    status: Literal["completed", "preempted", "failed"] | None = None
    reason: str | None = None
    """Why the run ended: max_steps, max_tokens, deadline or sigterm."""
    step: int | None = None
    total_steps: int | None = None
    tokens_seen: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    output_dir: str | None = None
    checkpoint: str | None = None
    last_checkpoint: LastCheckpoint | None = None
    started_at: str | None = None
    ended_at: str | None = None
    exit_code: int | None = None
    message: str | None = None
    """The error, for a failed run: `<kind>: <cause>` in one line."""

    @classmethod
    def failed(cls, error: TrainerError) -> TerminationMessage:
        return cls(status="failed", exit_code=error.exit_code, message=str(error))

    def to_wire(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


EVAL_RESULTS_FILE = "results.json"
"""The evaluator's full results, in its output folder (beside report.md)."""


class SuiteOutcome(_Wire):
    """One suite's metrics on the model (and on the baseline, when there is one)."""

    suite: str
    type: str | None = None
    samples: int | None = None
    metrics: dict[str, float] = {}
    baseline: dict[str, float] | None = None


class GateOutcome(_Wire):
    """One gate: what was compared and whether it passed; `message` says it in words."""

    metric: str
    passed: bool
    value: float | None = None
    comparator: str | None = None
    threshold: float | None = None
    baseline: float | None = None
    max_drop: float | None = None
    drop: float | None = None
    """How much worse than the baseline (a fall of acc, a rise of loss); negative: better."""
    p_value: float | None = None
    """McNemar's exact one-sided p-value that the model is worse than the baseline (per-item metrics)."""
    message: str | None = None


class EvalTerminationMessage(_Wire):
    """The one line `python -m forge_trainer.eval` writes at exit: per-suite metrics and gate outcomes
    (the full results are in `results`), or the error with its exit code."""

    status: Literal["completed", "failed"] | None = None
    exit_code: int | None = None
    message: str | None = None
    suites: list[SuiteOutcome] | None = None
    gates: list[GateOutcome] | None = None
    gates_passed: bool | None = None
    results: str | None = None
    """Where results.json is."""

    def to_wire(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
