"""SIGTERM: the handler only sets a flag, which the loop and the set-up look at where stopping is safe."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..contract import StoppedBeforeTraining
from .dist import Dist

STOPPED = "SIGTERM before the first step; nothing to save"


class SigtermFlag:
    """SIGTERM sets a flag; the loop finishes its step, checkpoints and exits PREEMPTED. A second
    SIGTERM (torchrun forwards one once any worker of the node has exited) changes nothing.

    Before the first step there is nothing to save: set-up looks at the flag at safe points (between
    data files, after each phase, on every rank together) and ends the run with StoppedBeforeTraining
    (exit code PREEMPTED) rather than after hours of data preparation. The handler itself only sets
    the flag: an exception raised wherever the signal lands could be taken for another error, or
    leave one rank alone in a collective.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


@contextmanager
def sigterm_caught(stop: SigtermFlag | None = None) -> Iterator[SigtermFlag]:
    """The caller's flag, already installed (SIGTERM stays caught after the block), or one caught
    for the block only. Raises StoppedBeforeTraining when SIGTERM came already."""
    owned = stop is None
    if owned:
        stop = SigtermFlag()
        stop.install()
    try:
        if stop.requested:
            raise StoppedBeforeTraining(STOPPED)
        yield stop
    finally:
        if owned:
            stop.restore()


def on_every_rank(d: Dist, check: Callable[[], None], stop: SigtermFlag | None = None) -> None:
    """``check()`` on every rank, failing on all when it fails on any (Dist.on_every_rank). A SIGTERM
    that arrived before it (``stop``) counts as such a failure, with exit code PREEMPTED."""
    def check_then_stop() -> None:
        check()
        if stop is not None and stop.requested:
            raise StoppedBeforeTraining(STOPPED)

    d.on_every_rank(check_then_stop, "a set-up check")
