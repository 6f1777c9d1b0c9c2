"""Phases, condition types and reasons of every Forge resource, each defined once.

String enums: a member is the string the API server stores (``Phase.RUNNING == "Running"``),
so status dicts, CRD enums and ``kubectl`` output all read the same words. Reasons are
CamelCase, one constant each (Kubeflow's ``TrainJob<Cond>Reason`` style).
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    """``status.phase``: one word for people; the conditions carry the detail."""

    PENDING = "Pending"
    QUEUED = "Queued"
    INITIALIZING = "Initializing"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TRAINING_PHASES = tuple(Phase)
EVAL_PHASES = (Phase.PENDING, Phase.RUNNING, Phase.SUCCEEDED, Phase.FAILED)
TERMINAL_PHASES = (Phase.SUCCEEDED, Phase.FAILED)


class ConditionType(StrEnum):
    # ForgeTraining: one per phase that has a condition ...
    QUEUED = "Queued"
    INITIALIZING = "Initializing"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    # ... and two that hold beside the phase
    STALLED = "Stalled"
    INVALID = "Invalid"
    PODS_READY = "PodsReady"  # as Kueue's Workload: every rank runs; False says what holds the workers up
    # ForgeEval: Running, Succeeded and Failed as above, and whether every gate passed
    GATES_PASSED = "GatesPassed"


# The condition that is True in each phase (Pending has none).
PHASE_CONDITION: dict[Phase, ConditionType] = {
    Phase.QUEUED: ConditionType.QUEUED, Phase.INITIALIZING: ConditionType.INITIALIZING,
    Phase.RUNNING: ConditionType.RUNNING, Phase.RESTARTING: ConditionType.RESTARTING,
    Phase.SUSPENDED: ConditionType.SUSPENDED, Phase.SUCCEEDED: ConditionType.SUCCEEDED,
    Phase.FAILED: ConditionType.FAILED,
}


class Reason(StrEnum):
    CREATED = "Created"
    QUEUED_BY_KUEUE = "WaitingForAdmission"
    SUSPENDED_BY_USER = "SuspendedByUser"
    RESUMED = "Resumed"
    PODS_STARTING = "PodsStarting"
    ALL_RANKS_RUNNING = "AllRanksRunning"
    TRAINING_COMPLETED = "TrainingCompleted"
    # restarts
    POD_FAILED = "PodFailed"
    OOM_KILLED = "OOMKilled"
    EVICTED = "Evicted"
    POD_REJECTED = "PodRejected"  # the kubelet refused the pod at admission (UnexpectedAdmissionError, OutOf<resource>)
    PREEMPTED = "Preempted"
    NODE_LOST = "NodeLost"
    STUCK_TERMINATING = "StuckTerminating"
    RENDEZVOUS_TIMEOUT = "RendezvousTimeout"  # the workers that started waited in vain for the others
    RESOURCES_CHANGED = "ResourcesChanged"
    BACKING_OFF = "BackingOff"
    WORKERS_STOPPING = "PreviousWorkersStopping"  # the next workers wait until the last ones have stopped
    # failures
    MAX_RESTARTS_EXCEEDED = "MaxRestartsExceeded"
    NON_RETRYABLE_EXIT_CODE = "NonRetryableExitCode"
    INVALID_SPEC = "InvalidSpec"
    CHILD_REJECTED = "ChildRejected"  # the API server refused a child built from the spec's free-form fields
    CHILD_CONFLICT = "ChildConflict"  # an object of a child's name exists and is not ours: left untouched
    # PodsReady False: what holds up the workers of the attempt
    UNSCHEDULABLE = "Unschedulable"  # the scheduler cannot place a worker (GPUs, taints, an unbound claim)
    RESIDENCY_UNSATISFIABLE = "ResidencyUnsatisfiable"  # ... because no node in spec.residency can run one
    PVC_NOT_FOUND = "PVCNotFound"  # ... because a claim the spec names does not exist
    PVC_NOT_BOUND = "PVCNotBound"  # ... because a claim the spec names exists but is not bound to a volume
    # PodsReady False while Queued: what keeps Kueue from ever admitting the workers
    LOCAL_QUEUE_NOT_FOUND = "LocalQueueNotFound"  # scheduling.queueName names no LocalQueue in the namespace
    LOCAL_QUEUE_INACTIVE = "LocalQueueInactive"  # the LocalQueue exists but Kueue says it is not active
    KUEUE_NOT_INSTALLED = "KueueNotInstalled"  # scheduling.queueName is set and the API serves no LocalQueue
    IMAGE_PULL_FAILED = "ImagePullFailed"  # the kubelet cannot pull the image (ErrImagePull, ImagePullBackOff)
    PODS_REFUSED = "PodsRefused"  # admission (PodSecurity, a quota, a webhook) refused the Job's worker pods
    GPU_HOUR_BUDGET_EXHAUSTED = "GpuHourBudgetExhausted"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    # stall
    NO_PROGRESS = "NoProgress"
    PROGRESSING = "Progressing"
    NOT_RUNNING = "NotRunning"
    EVALUATION_GATE_FAILED = "EvaluationGateFailed"  # a training's evaluation failed a gate (its model stays)
    # ForgeEval
    WAITING_FOR_MODEL = "WaitingForModel"  # its trainingRef has not Succeeded (yet)
    MODEL_UNAVAILABLE = "ModelUnavailable"  # its trainingRef Failed: there is no model to evaluate
    EVALUATING = "Evaluating"
    EVALUATION_COMPLETED = "EvaluationCompleted"
    EVALUATION_FAILED = "EvaluationFailed"
    ALL_GATES_PASSED = "AllGatesPassed"
    GATE_FAILED = "GateFailed"

