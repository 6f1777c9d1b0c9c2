"""Honest progress, without a cluster: status.progress shows no throughput or ETA while no worker runs,
the step the workers resume from after a restart, and GPU-hours accrue only while workers run."""

from __future__ import annotations

from datetime import timedelta

from forge_operator.training.observe import Observed
from forge_operator.training.planner import plan_training
from operator_support import NOW, job, obj, pod, running_plan
from test_training_readiness import NO_GPUS, PULL, pending, unscheduled

PROGRESS = {"step": 50, "totalSteps": 100, "percent": 50.0, "tokensSeen": 400, "loss": 2.0, "tokensPerSecond": 900.0,
            "mfu": 0.4, "etaSeconds": 600, "eta": "10m00s", "lastStepTime": "2026-11-22T11:59:00Z"}


def test_no_throughput_or_eta_while_no_worker_runs():
    for spec, status, jobs, pods in [
        ({"scheduling": {"suspend": True}}, "Running", [job("llm-r0")], []),                   # suspended
        ({}, "Pending", [job("llm-r0")], [unscheduled("p0", 0, NO_GPUS)]),                    # unschedulable
        ({}, "Running", [job("llm-r0", conditions=[{"type": "Failed", "status": "True"}])],    # failed
         [pod("p0", 0, phase="Failed", status={"containerStatuses": [{"state": {"terminated": {"exitCode": 65}}}]})]),
    ]:
        o = obj(**spec)
        o["status"] = {"phase": status, "progress": dict(PROGRESS)}
        p = plan_training(o, Observed(now=NOW, jobs=jobs, pods=pods)).status["progress"]
        assert {k: p.get(k) for k in ("tokensPerSecond", "mfu", "etaSeconds", "eta")} == dict.fromkeys(
            ("tokensPerSecond", "mfu", "etaSeconds", "eta"))
        assert (p["step"], p["loss"], p["percent"]) == (50, 2.0, 50.0)  # what was reached stays
    # while the workers run, the trainer's figures are shown
    o = obj()
    o["status"] = {"phase": "Running", "progress": dict(PROGRESS)}
    assert running_plan(o).status["progress"]["tokensPerSecond"] == 900.0


def test_after_a_restart_the_step_shown_is_the_one_resumed_from():
    o = obj()
    o["status"] = {"phase": "Restarting", "restartCount": 1, "failureCount": 1, "progress": dict(PROGRESS),
                   "restarts": [{"time": "2026-11-22T11:59:30Z", "reason": "PodFailed", "step": 40}]}
    plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r1")]))
    p = plan.status["progress"]
    assert (p["step"], p["percent"], p["lastStepTime"]) == (40, 40.0, "2026-11-22T12:00:00Z")
    assert "tokensPerSecond" not in p and "eta" not in p
    # rewound once: the next reconcile, and the new workers' own reports, move it on from there
    o["status"] = plan.status
    assert plan_training(o, Observed(now=NOW + timedelta(seconds=15), jobs=[job("llm-r1")])).status == plan.status
    # no checkpoint before the restart: the new workers start from the beginning
    del o["status"]["restarts"][0]["step"]
    o["status"]["progress"] = dict(PROGRESS)
    assert plan_training(o, Observed(now=NOW, jobs=[job("llm-r1")])).status["progress"]["step"] == 0


def test_gpu_hours_accrue_only_while_workers_run():
    o = pending()
    o["status"]["budget"] = {"gpuHours": 1.0, "tokens": 0, "accountedAt": "2026-11-22T11:50:00Z"}
    for pods in ([unscheduled(f"p{i}", i, NO_GPUS) for i in range(4)],
                 [pod("p0", 0, phase="Pending", node="n0", status={"containerStatuses": [PULL]})]):
        budget = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=pods)).status["budget"]
        assert budget["gpuHours"] == 1.0 and "accountedAt" not in budget


def test_the_metrics_drop_throughput_and_eta_with_the_status():
    from prometheus_client import REGISTRY

    from forge_operator.training.metrics import observe_training

    labels = {"namespace": "ns", "name": "metrics-idle"}
    observe_training("ns", "metrics-idle", {"phase": "Running", "progress": PROGRESS})
    assert REGISTRY.get_sample_value("forge_training_tokens_per_second", labels) == 900.0
    observe_training("ns", "metrics-idle", {"phase": "Suspended", "progress": {"step": 50}})
    assert REGISTRY.get_sample_value("forge_training_tokens_per_second", labels) is None
    assert REGISTRY.get_sample_value("forge_training_eta_seconds", labels) is None
    assert REGISTRY.get_sample_value("forge_training_step", labels) == 50.0
