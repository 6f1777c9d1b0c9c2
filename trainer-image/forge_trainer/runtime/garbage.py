"""Python's garbage collector during training, as torchtitan's GarbageCollection.

Left automatic, the collector runs whenever allocations pass its threshold: at a random point inside a
step, on each worker at a different time, so that every collective of that step waits for the slowest
worker's pause. During training it is off and collects at a step boundary every
``training.gc_interval_steps`` steps instead, on every worker at the same step. What the set-up built
(the model, the data's indexes, imported modules) is frozen first: those objects live as long as the
run, and no collection scans them again.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

PERIODIC_GENERATION = 1
"""The periodic collection's generation: the young objects and those that survived one collection
(the step's temporaries, reference cycles from the loop, the checkpoints, the reports), not the oldest."""


class GarbageCollection:
    """Automatic collection off between ``start`` and ``stop``; ``step(n)`` collects every ``every`` steps."""

    def __init__(self, every: int):
        self.every = every
        self.was_enabled = gc.isenabled()
        self.started = False

    def start(self) -> None:
        """After the set-up: collect what it left, freeze what remains, and turn automatic collection off."""
        self.was_enabled = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()
        self.started = True

    def step(self, step: int) -> None:
        """At the boundary after step ``step`` (1-based): collect when it is a multiple of the interval."""
        if self.started and step % self.every == 0:
            t0 = time.monotonic()
            gc.collect(PERIODIC_GENERATION)
            log.debug("garbage collection at step %d: %.3f s", step, time.monotonic() - t0)

    def stop(self) -> None:
        """The collector as it was before ``start`` (the process may go on: tests, `forge train`, a notebook)."""
        if not self.started:
            return
        self.started = False
        gc.unfreeze()
        if self.was_enabled:
            gc.enable()
