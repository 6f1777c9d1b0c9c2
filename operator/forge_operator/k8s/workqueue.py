"""A work queue of object keys, as client-go's ``workqueue`` (what controller-runtime's reconcilers read).

Triggers only add a key: kopf's event handlers return at once, and a burst of events of one object
(its pods' and Job's status changes while the group starts) costs one reconcile, not one per event.
A key is queued at most once however often it is added before a worker takes it; a key added while a
worker reconciles it is queued again when that worker is done, so no change is missed and no object is
reconciled by two workers at a time.

Two lines: what an event added goes before what a timer added (the periodic resync of every running
training, which at hundreds of trainings keeps the workers busy), so a failed worker is acted on
without waiting behind the resyncs. A key waiting in the timers' line that an event adds moves to the
events' line.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable

from prometheus_client import Counter, Gauge

DEPTH = Gauge("forge_operator_workqueue_depth", "Keys waiting in the work queue for a worker")
ADDS = Counter("forge_operator_workqueue_adds_total", "Triggers added to the work queue (one per event or timer)")


class WorkQueue:
    def __init__(self) -> None:
        self._urgent: deque[Hashable] = deque()  # added by events
        self._later: deque[Hashable] = deque()   # added by timers only
        self._dirty: dict[Hashable, bool] = {}   # queued (or to be, when its worker is done) -> urgent
        self._processing: set[Hashable] = set()
        self._cond = threading.Condition()
        self._closed = False

    def add(self, key: Hashable, urgent: bool = True) -> None:
        ADDS.inc()
        with self._cond:
            if self._closed:
                return
            if key in self._dirty:
                if urgent and not self._dirty[key]:  # an event for a key a timer queued: it moves ahead
                    self._dirty[key] = True
                    if key not in self._processing:
                        self._later.remove(key)
                        self._urgent.append(key)
                return
            self._dirty[key] = urgent
            if key not in self._processing:
                self._push(key)

    def _push(self, key: Hashable) -> None:
        (self._urgent if self._dirty[key] else self._later).append(key)
        DEPTH.set(len(self._urgent) + len(self._later))
        self._cond.notify()

    def get(self, wait: bool = True) -> Hashable | None:
        """The next key, once there is one (None: the queue is closed, or empty and ``wait`` is false); the
        caller calls ``done`` with it."""
        with self._cond:
            while wait and not (self._urgent or self._later) and not self._closed:
                self._cond.wait()
            if not (self._urgent or self._later):
                return None
            key = (self._urgent or self._later).popleft()
            DEPTH.set(len(self._urgent) + len(self._later))
            self._processing.add(key)
            del self._dirty[key]
            return key

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._push(key)

    def close(self) -> None:
        """Workers finish the key they hold and stop; what is queued is dropped."""
        with self._cond:
            self._closed = True
            self._urgent.clear()
            self._later.clear()
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._urgent) + len(self._later)


def start_workers(queue: WorkQueue, count: int, work: Callable[[Hashable], None], name: str = "forge-worker") -> list[threading.Thread]:
    """``count`` daemon threads, each taking keys from ``queue`` and calling ``work`` on them until it closes."""

    def run() -> None:
        while (key := queue.get()) is not None:
            try:
                work(key)
            finally:
                queue.done(key)

    threads = [threading.Thread(target=run, name=f"{name}-{i}", daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads
