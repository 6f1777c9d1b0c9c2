"""Process exit codes of `python -m forge_trainer`, sysexits(3)-style.

The operator reads them: DATA_ERROR and CONFIG_ERROR are not retried (running
again cannot help), PREEMPTED means a checkpoint was written and the run can
resume. Any other code (a crash, 137 after an OOM kill) is a retryable failure.
"""

OK = 0
"""Training finished (a budget was reached) and the model was exported."""

DATA_ERROR = 65
"""The training data cannot be used: empty directory, unreadable file,
a vocabulary larger than the data supports, too little text for one sequence."""

PREEMPTED = 75
"""SIGTERM received: the current step finished, a checkpoint was written, resume later.
Also SIGTERM before the first step (while the data is prepared): nothing to save, start again later."""

CONFIG_ERROR = 78
"""The configuration is invalid or cannot run: bad field, seq_len above the
model's context, a model/batch that cannot fit in memory, a missing base model."""


class TrainerError(Exception):
    """An error that ends the run with a documented exit code and a one-line message."""

    exit_code = 1
    kind = "error"

    def __str__(self) -> str:
        return f"{self.kind}: {super().__str__()}"


class DataError(TrainerError):
    exit_code = DATA_ERROR
    kind = "data error"


class ConfigError(TrainerError):
    exit_code = CONFIG_ERROR
    kind = "config error"


class StoppedBeforeTraining(TrainerError):
    """SIGTERM during set-up (data preparation, model building): there is nothing to checkpoint yet."""

    exit_code = PREEMPTED
    kind = "stopped"


def error_named(kind: str, message: str) -> TrainerError | None:
    """The TrainerError another process reported, by class name and message (None: not one of them)."""
    known = (TrainerError, DataError, ConfigError, StoppedBeforeTraining)
    return next((cls(message) for cls in known if cls.__name__ == kind), None)
