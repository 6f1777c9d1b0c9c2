"""`python -m forge_trainer.launch [torchrun arguments]`: torchrun, with a rendezvous that times out
recognisably.

The worker pod's command (the operator's `torchrun_command`). It is torchrun itself, run in this
process with the same arguments, signals and exit codes, except when the nodes do not all join the
static rendezvous within its timeout (`--rdzv-conf timeout=N`). torchrun then ends with a traceback of
a store error and exit code 1, which reads like any crash; here the node writes the termination
message `{"status":"failed","exitCode":69,"message":"rendezvous timed out: ..."}` and exits 69
(`ExitCode.RENDEZVOUS_TIMEOUT`), saying how long it waited and, on node rank 0 (the store's host),
how many of the nodes had joined. Which ranks were missing torch does not say (the store counts its
clients, it does not name them): the operator names them from the pods it sees.

And when the workers stopped after saving a checkpoint (exit code 75, `ExitCode.PREEMPTED`: the preStop
hook or SIGTERM on eviction), torchrun ends with a ChildFailedError and exit code 1; the launcher exits
75 instead, so that the container's exit code says what the workers' do (Job pod failure policies and
the operator read it).

The workers' environment gets `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` unless the pod's sets
the allocator itself (`runtime.dist.default_allocator_conf`).
"""

from __future__ import annotations

import re
import sys

from .contract import DEFAULT_TERMINATION_MESSAGE_PATH, ExitCode, RendezvousTimeout, TerminationMessage

PREFIX = "forge-trainer"
# TCPStore's host: "Timed out after 20 seconds waiting for clients. 1/2 clients joined."
_JOINED = re.compile(r"(\d+)/(\d+) clients joined")


def rendezvous_timeout(node_rank: int, nnodes: str, endpoint: str, rdzv_conf: str, error: str) -> RendezvousTimeout:
    """What a node says when the static rendezvous gave up: its rank, the wait, and who had joined."""
    conf = dict(kv.split("=", 1) for kv in rdzv_conf.split(",") if "=" in kv)
    waited = f"{conf['timeout']} s" if "timeout" in conf else "its timeout"
    total = nnodes.split(":")[-1]
    if node_rank == 0:
        joined = _JOINED.search(error)
        who = f"{joined.group(1)} of {joined.group(2)} nodes joined" if joined else error.strip().splitlines()[-1]
        return RendezvousTimeout(f"node rank 0 waited {waited} for the other nodes of {total}: {who}")
    return RendezvousTimeout(f"node rank {node_rank} waited {waited} for the group of {total} nodes "
                             f"(node rank 0 at {endpoint}): {error.strip().splitlines()[-1]}")


def _termination_path(script_args: list[str]) -> str:
    """The trainer configuration's terminationMessagePath (the launcher runs before any trainer)."""
    from .config import load_config

    try:
        return load_config(script_args[script_args.index("--config") + 1]).termination_message_path
    except Exception:  # noqa: BLE001 - an unreadable configuration is the trainer's to report
        return DEFAULT_TERMINATION_MESSAGE_PATH


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun, parse_args

    from .runtime.dist import default_allocator_conf

    default_allocator_conf()  # the workers inherit it, and have it before they import torch
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        torchrun(argv)
    except DistError as e:  # out of torchrun's agent, only the rendezvous (its store) raises it
        error = rendezvous_timeout(args.node_rank, args.nnodes, args.rdzv_endpoint or f"{args.master_addr}:"
                                   f"{args.master_port}", args.rdzv_conf, str(e))
        print(f"{PREFIX}: {error}", file=sys.stderr, flush=True)
        from .runtime.progress import write_termination_message

        write_termination_message(_termination_path(args.training_script_args), TerminationMessage.failed(error))
        return int(error.exit_code)
    except ChildFailedError as e:
        if {f.exitcode for f in e.failures.values()} == {int(ExitCode.PREEMPTED)}:
            print(f"{PREFIX}: the workers stopped after saving a checkpoint (exit code {int(ExitCode.PREEMPTED)})",
                  file=sys.stderr, flush=True)
            return int(ExitCode.PREEMPTED)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
