"""What the trainer and the operator agree on, defined once (the operator imports this module;
it imports nothing). Exit codes are in exitcodes.py."""

PROGRESS_ANNOTATION = "forge.dev/progress"
"""Rank 0 writes its progress JSON into this annotation of its own pod."""
POD_NAME_ENV = "FORGE_POD_NAME"
POD_NAMESPACE_ENV = "FORGE_POD_NAMESPACE"
"""The pod's name and namespace (downward API), so rank 0 can annotate it."""
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
"""A one-line JSON summary goes here at exit: the final progress, or the error with its exit code."""
PRESTOP_COMMAND = ("python", "-m", "forge_trainer.prestop")
"""The worker container's preStop hook: SIGTERM to the trainer workers, then wait until they have
checkpointed and exited (before the kubelet sends SIGTERM to torchrun, which would SIGKILL them after 30 s)."""
