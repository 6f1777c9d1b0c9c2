"""`python -m forge_trainer.prestop`: the worker container's preStop hook (contract.PRESTOP_COMMAND).

torchrun is the container's PID 1. On SIGTERM it forwards SIGTERM to its workers but SIGKILLs them
after 30 s (fixed before torch 2.12), often before a large model's checkpoint is written. The kubelet
runs this hook first: it sends SIGTERM to each trainer worker itself and waits until all have
checkpointed and exited (exit 75), bounded only by the pod's terminationGracePeriodSeconds. Only then
does torchrun get its SIGTERM, with nothing left to kill.

A worker is a process started by torchrun: ``LOCAL_RANK`` in its environment, and the interpreter
running ``-m forge_trainer`` (torchrun's own command line names the module only as its argument; this
hook runs ``forge_trainer.prestop``). Processes forked by a worker look the same and are left to it.
Standard library only (running it imports the package, whose __init__ loads the config module, not torch).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterable, NamedTuple

MODULE = "forge_trainer"
WORKER_ENV = "LOCAL_RANK"
POLL_SECONDS = 0.5
PREFIX = "forge-prestop"


class Proc(NamedTuple):
    pid: int
    ppid: int
    environ: dict[str, str]
    cmdline: list[str]


def runs_module(cmdline: list[str], module: str = MODULE) -> bool:
    """Whether the interpreter of ``cmdline`` runs ``-m module`` (not a script, ``-c``, or another module)."""
    args = iter(cmdline[1:])
    for arg in args:
        if not arg.startswith("-") or arg in ("-", "--"):
            return False  # a script (torchrun's own entry point, the module is only its argument) or stdin
        if arg.startswith("--"):
            if arg == "--check-hash-based-pycs":
                next(args, None)
            continue
        for i, option in enumerate(arg[1:], start=2):  # short options, possibly clustered: -u -m, -um, -mX
            if option in "mcXW":
                value = arg[i:] or next(args, "")
                if option == "m":
                    return value == module
                if option == "c":
                    return False
                break
    return False


def is_worker(environ: dict[str, str], cmdline: list[str]) -> bool:
    return WORKER_ENV in environ and runs_module(cmdline)


def _descends_from(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    seen = set()
    while pid in parents and pid not in seen:
        seen.add(pid)
        pid = parents[pid]
        if pid == ancestor:
            return True
    return False


def pick_workers(procs: Iterable[Proc], *, ancestor: int | None = None, exclude: Iterable[int] = ()) -> list[int]:
    """The pids of the trainer workers among ``procs``: not those forked by a worker, not ``exclude``,
    and with ``ancestor`` only its descendants."""
    procs = list(procs)
    parents = {p.pid: p.ppid for p in procs}
    skip = set(exclude)
    workers = {p.pid: p for p in procs if p.pid not in skip and is_worker(p.environ, p.cmdline)}
    return sorted(pid for pid, p in workers.items()
                  if p.ppid not in workers and (ancestor is None or _descends_from(pid, ancestor, parents)))


def _stat(root: Path, pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) from /proc/<pid>/stat, or None when the process is gone."""
    try:
        text = (root / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name, in parentheses, may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _read_nul(path: Path) -> list[str]:
    try:
        return [s for s in path.read_bytes().decode(errors="replace").split("\0") if s]
    except OSError:  # gone, or another user's (environ is readable by its owner only)
        return []


def read_procs(root: Path = Path("/proc")) -> list[Proc]:
    procs = []
    for entry in root.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(root, int(entry.name))
        if stat is None:
            continue
        environ = dict(v.split("=", 1) for v in _read_nul(entry / "environ") if "=" in v)
        procs.append(Proc(int(entry.name), stat[1], environ, _read_nul(entry / "cmdline")))
    return procs


def alive(pid: int, started: int, root: Path = Path("/proc")) -> bool:
    """Still running: neither gone, a zombie waiting for torchrun to reap it, nor a reused pid."""
    stat = _stat(root, pid)
    return stat is not None and stat[0] not in ("Z", "X", "x") and stat[2] == started


def stop_workers(ancestor: int | None = None, root: Path = Path("/proc"), poll: float = POLL_SECONDS) -> str:
    """SIGTERM to every worker, then wait until all have exited; returns what was done, in one line."""
    pids = pick_workers(read_procs(root), ancestor=ancestor, exclude=[os.getpid()])
    if not pids:
        return f"{PREFIX}: no trainer worker found"
    waiting = {}
    for pid in pids:
        stat = _stat(root, pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            continue
        if stat is not None:
            waiting[pid] = stat[2]
    t0 = time.monotonic()
    while waiting:
        time.sleep(poll)
        waiting = {pid: started for pid, started in waiting.items() if alive(pid, started, root)}
    return (f"{PREFIX}: sent SIGTERM to {len(pids)} trainer worker(s) (pid {', '.join(map(str, pids))}); "
            f"all exited after {time.monotonic() - t0:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forge_trainer.prestop", description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=int, metavar="PID",
                        help="only workers descending from this process (default: all in the container)")
    args = parser.parse_args(argv)
    print(stop_workers(args.parent), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
