"""`python -m forge_trainer --config PATH`: one process, or one of many under torchrun."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from pydantic import ValidationError

from .config import load_config, validation_message
from .contract import DEFAULT_TERMINATION_MESSAGE_PATH, ConfigError, TerminationMessage, TrainerError

PREFIX = "forge-trainer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forge_trainer", description="Train a language model as configured.")
    parser.add_argument("--config", required=True, help="TrainerConfig as YAML or JSON")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # One process per node (pod) writes its termination message: the operator reads the exit code
    # of any pod from it, and rank 0's summary as the final progress.
    writes_message = int(os.environ.get("LOCAL_RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s" if "WORLD_SIZE" in os.environ else "%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    termination_path = DEFAULT_TERMINATION_MESSAGE_PATH
    try:
        try:
            config = load_config(args.config)
        except OSError as e:
            raise ConfigError(f"cannot read {args.config}: {e.strerror or e}") from e
        except ValidationError as e:
            raise ConfigError(validation_message(e)) from e
        except ValueError as e:  # YAML/JSON syntax
            raise ConfigError(f"{args.config}: {e}") from e
        termination_path = config.termination_message_path
        from .runtime.signals import SigtermFlag
        from .train import run

        # SIGTERM stays caught from here to the termination message: once one worker has exited,
        # torchrun sends SIGTERM to the rest of the node's workers (with the preStop hook, a second
        # one), and it must not cut short the last progress report or the message.
        stop = SigtermFlag()
        stop.install()
        summary = run(config, stop=stop)
        code, message = summary.exit_code, summary.to_message()
    except TrainerError as e:
        print(f"{PREFIX}: {e}", file=sys.stderr, flush=True)
        code, message = e.exit_code, TerminationMessage.failed(e)
    if writes_message:
        from .runtime.progress import write_termination_message

        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if _in_main_thread() else None
        try:
            write_termination_message(termination_path, message)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return int(code)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
