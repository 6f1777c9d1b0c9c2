# TEMPORARY while dist.py is being edited; removed when dist.py moves to runtime/.
from .contract import ConfigError, DataError, ExitCode, StoppedBeforeTraining, TrainerError, error_named  # noqa: F401

OK, DATA_ERROR, PREEMPTED, CONFIG_ERROR = ExitCode.OK, ExitCode.DATA_ERROR, ExitCode.PREEMPTED, ExitCode.CONFIG_ERROR
