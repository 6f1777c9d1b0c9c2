"""Worker pods refused at admission (PodSecurity, a ResourceQuota, a webhook), without a cluster: when the
operator looks for the refusal (only while the Job lacks pods), and what the training says about it."""

from __future__ import annotations

import pytest

from forge_operator.k8s import conditions as C
from forge_operator.training.observe import Observed, read, short_of_pods
from forge_operator.training.planner import plan_training
from operator_support import NOW, job, obj, pod

REFUSAL = ('Error creating: pods "llm-r0-2-x7k2p" is forbidden: violates PodSecurity "restricted:latest": '
           'restricted volume types (volume "scratch" uses restricted volume type "hostPath")')
QUOTED = ('the API server refused the worker pods of Job llm-r0: pods "llm-r0-2-*" is forbidden: violates '
          'PodSecurity "restricted:latest": restricted volume types (volume "scratch" uses restricted volume '
          'type "hostPath")')
STARTED = {"startTime": "2026-11-22T11:59:00Z"}


def started_job(**status) -> dict:
    j = job("llm-r0", **(STARTED | status))
    j["spec"].update(completions=4, parallelism=4)
    j["metadata"]["namespace"] = "ns"
    return j


@pytest.mark.parametrize("status, spec, pods, short", [
    ({}, {}, 0, True),                                   # started, no pod created
    ({"active": 2}, {}, 2, True),                        # two of four refused
    ({"active": 4}, {}, 4, False),                       # all there: nothing to look for
    ({"active": 2, "succeeded": 2}, {}, 4, False),       # finished ranks count
    ({}, {}, 4, False),                                  # the pods are seen (the Job's status lags behind)
    ({"active": 4}, {}, 0, False),                       # the status counts them (the pods seen lag behind)
    ({"startTime": None}, {}, 0, False),                 # the controller has not synced the Job yet
    ({}, {"suspend": True}, 0, False),                   # suspended: no pods wanted
    ({"conditions": [{"type": "Failed", "status": "True"}]}, {}, 0, False),  # finished
])
def test_a_job_is_short_of_pods_only_while_the_controller_should_have_made_them(status, spec, pods, short):
    j = started_job(**status)
    j["status"] = {k: v for k, v in j["status"].items() if v is not None}
    j["spec"].update(spec)
    assert short_of_pods(j, [pod(f"p{i}", i) for i in range(pods)]) is short


class CountingReader:
    def __init__(self, jobs: list[dict], events: list[dict]) -> None:
        self.jobs, self.events, self.calls = jobs, events, []

    def list(self, api_version, kind, namespace, label_selector="", field_selector=""):
        self.calls.append((kind, field_selector))
        return {"Job": self.jobs, "Event": self.events}.get(kind, [])

    def get(self, api_version, kind, name, namespace=None):
        return None


def event(message: str, at: str) -> dict:
    return {"metadata": {"name": f"e-{at}"}, "reason": "FailedCreate", "message": message, "lastTimestamp": at}


def test_events_are_read_only_for_a_job_short_of_pods():
    training = obj()
    healthy = CountingReader([started_job(active=4)], [event(REFUSAL, "2026-11-22T11:59:00Z")])
    assert read(healthy, training, NOW).refusals == {}
    # no LIST of events when nothing is wrong (the API server's EndpointSlices: the NetworkPolicy)
    assert [kind for kind, _ in healthy.calls] == ["Job", "Pod", "EndpointSlice"]
    short = CountingReader([started_job()], [event("Error creating: old", "2026-11-22T11:59:00Z"),
                                             event(REFUSAL, "2026-11-22T11:59:30Z")])
    assert read(short, training, NOW).refusals == {"llm-r0": REFUSAL}  # the newest
    assert ("Event", "involvedObject.uid=uid-llm-r0,reason=FailedCreate") in short.calls


def test_refused_pods_give_the_training_a_condition_that_quotes_the_refusal():
    o = obj()
    o["status"] = {"restartCount": 0, "phase": "Pending"}
    plan = plan_training(o, Observed(now=NOW, jobs=[started_job()], refusals={"llm-r0": REFUSAL}))
    invalid = C.find(plan.status["conditions"], "Invalid")
    assert (invalid["status"], invalid["reason"], invalid["message"]) == ("True", "PodsRefused", QUOTED)
    assert plan.status["phase"] == "Pending"
    assert [(e.type, e.reason, e.message) for e in plan.events] == [("Warning", "PodsRefused", QUOTED)]

    # the Job controller retries: a new pod name, the same refusal; nothing new to write or say
    o["status"] = plan.status
    again = REFUSAL.replace("x7k2p", "q9z4m")
    plan = plan_training(o, Observed(now=NOW, jobs=[started_job()], refusals={"llm-r0": again}))
    assert plan.status == o["status"] and plan.events == []

    # the pods are admitted (a quota freed): the condition goes
    o["status"] = plan.status
    pods = [pod(f"p{i}", i, phase="Pending", node="") for i in range(4)]
    plan = plan_training(o, Observed(now=NOW, jobs=[started_job(active=4)], pods=pods))
    assert C.find(plan.status["conditions"], "Invalid") is None
