"""Progress that stops when the training stops, on the real control plane: a suspended training shows
no throughput or ETA and books no GPU-hours; after a failed worker the group restarts and the step
shown is the checkpoint's it resumes from."""

from __future__ import annotations

import time

import pytest

from test_lifecycle import exit_pod, ft, phase_is, report_progress, running_workers

pytestmark = pytest.mark.cluster

RATES = ("tokensPerSecond", "mfu", "etaSeconds", "eta")


def progress(kube, name: str) -> dict:
    return ft(kube, name).get("status", {}).get("progress") or {}


def test_progress_stops_with_the_workers_and_restarts_from_the_checkpoint(kube, operator):
    from operator_support import training

    kube.apply(training("llm"))
    pods = kube.wait_for("4 running ranks", running_workers(kube, "llm", 4, 0))
    report_progress(kube, pods[0]["metadata"]["name"], step=30, loss=2.5, checkpoint_step=20)
    kube.wait_for("the progress with its throughput", lambda: progress(kube, "llm").get("tokensPerSecond"))

    kube("patch", "forgetraining", "llm", "--type=merge", "-p", '{"spec":{"scheduling":{"suspend":true}}}')
    kube.wait_for("Suspended", phase_is(kube, "llm", "Suspended"))
    p = kube.wait_for("no throughput or ETA", lambda: (p := progress(kube, "llm")) and
                      not any(k in p for k in RATES) and p)
    assert (p["step"], p["loss"]) == (30, 2.5)  # what was reached stays
    kube.wait_for("the workers gone", lambda: not running_workers(kube, "llm", 4, 0)() and
                  not kube.get("pods", selector="forge.dev/training=llm")["items"], timeout=90)
    booked = ft(kube, "llm")["status"]["budget"]
    time.sleep(3)  # several resyncs with nothing running: nothing booked
    assert ft(kube, "llm")["status"]["budget"]["gpuHours"] == booked["gpuHours"] and "accountedAt" not in booked

    kube("patch", "forgetraining", "llm", "--type=merge", "-p", '{"spec":{"scheduling":{"suspend":false}}}')
    pods = kube.wait_for("4 running ranks again", running_workers(kube, "llm", 4, 0), timeout=90)
    exit_pod(kube, pods[1]["metadata"]["name"], 1)
    o = kube.wait_for("restart 1", lambda: (o := ft(kube, "llm")).get("status", {}).get("restartCount") == 1 and o)
    assert o["status"]["restarts"][0]["step"] == 20
    p = kube.wait_for("the resumed step", lambda: (p := progress(kube, "llm")).get("step") == 20 and p)
    assert not any(k in p for k in RATES)
