"""The work queue between kopf's events and the reconciles: one reconcile per burst of triggers, never two
workers on one object, no trigger lost."""

from __future__ import annotations

import threading
import time

from forge_operator.k8s.cache import CachedReader, IndexedKind
from forge_operator.k8s.objects import Key, Plan
from forge_operator.k8s.runtime import Runtime
from forge_operator.k8s.workqueue import WorkQueue, start_workers


def test_a_key_added_many_times_before_a_worker_takes_it_is_queued_once():
    q = WorkQueue()
    for _ in range(50):
        q.add("a")
    q.add("b")
    q.add("a")
    assert len(q) == 2
    assert q.get() == "a"
    assert q.get() == "b"
    q.close()
    assert q.get() is None


def test_a_key_added_while_processed_comes_back_once_when_done():
    q = WorkQueue()
    q.add("a")
    assert q.get() == "a"
    for _ in range(10):
        q.add("a")
    assert len(q) == 0  # not handed to a second worker while the first holds it
    q.done("a")
    assert len(q) == 1 and q.get() == "a"
    q.done("a")
    assert len(q) == 0


def test_workers_never_reconcile_one_key_at_the_same_time_and_miss_no_trigger():
    q = WorkQueue()
    lock = threading.Lock()
    running: dict[str, int] = {}
    overlaps: list[str] = []
    done_after: dict[str, float] = {}

    def work(key):
        with lock:
            running[key] = running.get(key, 0) + 1
            if running[key] > 1:
                overlaps.append(key)
        time.sleep(0.005)
        with lock:
            running[key] -= 1
            done_after[key] = time.monotonic()

    start_workers(q, 4, work)
    last_add: dict[str, float] = {}
    for i in range(400):
        key = f"k{i % 5}"
        q.add(key)
        last_add[key] = time.monotonic()
    deadline = time.monotonic() + 10
    while (len(q) or any(running.values()) or any(done_after.get(k, 0) < t for k, t in last_add.items())) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    q.close()
    assert overlaps == []
    # every key was reconciled after its last trigger
    assert all(done_after[k] >= t for k, t in last_add.items()), (done_after, last_add)


def slow_runtime():
    """A runtime whose first reconcile waits for ``release``; ``runs`` lists the reconciles."""
    started, release = threading.Event(), threading.Event()
    runs = []

    class Slow(Runtime):
        def reconcile(self, key):
            runs.append(key)
            if len(runs) == 1:
                started.set()
                release.wait(5)
            return Plan(status={})

    return Slow(None, [], field_manager="t"), runs, started, release


KEY = Key("ForgeTraining", "ns", "llm")
EVAL = Key("ForgeEval", "ns", "llm")


def test_without_workers_triggers_during_a_reconcile_coalesce_into_one_more_and_never_wait():
    rt, runs, started, release = slow_runtime()
    first = threading.Thread(target=rt.enqueue, args=(KEY,))
    first.start()
    assert started.wait(5)
    for _ in range(20):  # each returns at once: the first thread owes one more reconcile
        rt.enqueue(KEY)
    release.set()
    first.join(5)
    assert runs == [KEY, KEY]
    rt.enqueue(KEY)
    assert len(runs) == 3


def test_a_trainings_reconcile_in_progress_does_not_hold_up_the_eval_of_the_same_name():
    rt, runs, started, release = slow_runtime()
    first = threading.Thread(target=rt.enqueue, args=(KEY,))
    first.start()
    assert started.wait(5)
    rt.enqueue(EVAL)  # reconciled in this thread, while the training's reconcile waits
    assert runs == [KEY, EVAL]
    release.set()
    first.join(5)
    assert not first.is_alive()


def test_triggers_while_the_runtime_reconciles_cost_one_more_reconcile_and_return_at_once():
    rt, runs, started, release = slow_runtime()
    rt.start(workers=4)
    try:
        rt.enqueue(KEY)
        assert started.wait(5)
        t0 = time.monotonic()
        for _ in range(20):
            rt.enqueue(KEY)
        assert time.monotonic() - t0 < 1  # an event handler never waits for a reconcile
        release.set()
        deadline = time.monotonic() + 5
        while len(runs) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert runs == [KEY, KEY]
    finally:
        rt.close()


def test_a_job_kept_in_kopfs_index_is_found_by_its_trainings_label():
    jobs = IndexedKind("forge.dev/training")
    job = {"metadata": {"name": "llm-r0", "namespace": "ns", "labels": {"forge.dev/training": "llm"}}}
    jobs.index = {("ns", "llm"): [job]}
    reader = CachedReader(None, {("batch/v1", "Job"): jobs})
    labels = {"forge.dev/training": "llm"}
    assert reader.cached("batch/v1", "Job", "llm-r0", "ns", labels=labels) == job
    assert reader.cached("batch/v1", "Job", "llm-r1", "ns", labels=labels) is None
    assert reader.cached("batch/v1", "Job", "llm-r0", "ns") is None  # without the label: not looked up
    jobs.index = None  # kopf has not handed its index over yet
    assert reader.cached("batch/v1", "Job", "llm-r0", "ns", labels=labels) is None


def test_what_events_add_goes_before_what_timers_add():
    q = WorkQueue()
    for i in range(3):
        q.add(f"resync-{i}", urgent=False)
    q.add("failed")
    q.add("resync-2")  # an event for a key a timer queued: it moves ahead, once
    assert [q.get() for _ in range(4)] == ["failed", "resync-2", "resync-0", "resync-1"]
    q.add("resync-0", urgent=False)  # being processed: comes back after done, in the timers' line
    q.add("other")
    q.done("resync-0")
    assert [q.get(), q.get()] == ["other", "resync-0"]
