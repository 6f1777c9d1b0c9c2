"""`python -m forge_trainer.eval --config PATH`: evaluate a model as configured (the ForgeEval pod)."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from ..config import validation_message
from ..contract import DEFAULT_TERMINATION_MESSAGE_PATH, ConfigError, EvalTerminationMessage, TrainerError

PREFIX = "forge-eval"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forge_trainer.eval", description="Evaluate a model as configured.")
    parser.add_argument("--config", required=True, help="EvalConfig as YAML or JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    path = DEFAULT_TERMINATION_MESSAGE_PATH
    from .config import load_eval_config

    try:
        try:
            config = load_eval_config(args.config)
        except OSError as e:
            raise ConfigError(f"cannot read {args.config}: {e.strerror or e}") from e
        except ValidationError as e:
            raise ConfigError(validation_message(e)) from e
        except ValueError as e:
            raise ConfigError(f"{args.config}: {e}") from e
        path = config.termination_message_path
        from .run import compact, evaluate

        message = compact(evaluate(config))
    except TrainerError as e:
        print(f"{PREFIX}: {e}", file=sys.stderr, flush=True)
        message = EvalTerminationMessage(status="failed", exit_code=e.exit_code, message=str(e))
    from ..runtime.progress import write_termination_message

    write_termination_message(path, message)
    return int(message.exit_code or 0)


if __name__ == "__main__":
    sys.exit(main())
