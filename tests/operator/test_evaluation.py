"""The ForgeEval planner, pure: stored, validated, and plainly not evaluated yet."""

from __future__ import annotations

from forge_operator.evaluation.planner import NOT_EVALUATED, plan_eval
from forge_operator.k8s import conditions as C
from operator_support import NOW, forge_eval


def obj(**spec) -> dict:
    o = forge_eval()
    o["metadata"].update(namespace="ns", generation=3)
    o["spec"].update(spec)
    return o


def test_a_forgeeval_is_pending_and_says_it_is_not_evaluated():
    plan = plan_eval(obj(), NOW)
    assert plan.status["phase"] == "Pending" and plan.status["observedGeneration"] == 3
    supported = C.find(plan.status["conditions"], "Supported")
    assert (supported["status"], supported["reason"], supported["message"]) == ("False", "NotImplemented",
                                                                                NOT_EVALUATED)
    assert "not evaluated yet" in supported["message"] and supported["observedGeneration"] == 3
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "NotImplemented")]
    assert not plan.apply and not plan.delete and plan.requeue_after is None
    # level-based: planned again from its own status, nothing changes and nothing is said twice
    again = plan_eval(obj() | {"status": plan.status}, NOW)
    assert again.status == plan.status and not again.events


def test_an_invalid_forgeeval_says_why_until_it_is_fixed():
    bad = obj(gates=[{"metric": "nosuchsuite.loss", "comparator": "<", "threshold": 3.0}])
    plan = plan_eval(bad, NOW)
    invalid = C.find(plan.status["conditions"], "Invalid")
    assert invalid["status"] == "True" and invalid["reason"] == "InvalidSpec" and "gate" in invalid["message"]
    assert {e.reason for e in plan.events} == {"InvalidSpec", "NotImplemented"}
    fixed = plan_eval(obj() | {"status": plan.status}, NOW)
    assert C.find(fixed.status["conditions"], "Invalid") is None and not fixed.events
