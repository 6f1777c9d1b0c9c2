"""A training's spec.evaluation, pure: once it has Succeeded the planner applies its ForgeEval (owned by it,
of the same name), mirrors the outcome into status.evaluation, and a failed gate fails the training with
reason EvaluationGateFailed while its model stays."""

from __future__ import annotations

from forge_operator.k8s import conditions as C
from forge_operator.training.observe import Observed
from forge_operator.training.planner import plan_training
from operator_support import NOW, obj

EVALUATION = {"suites": [{"name": "heldout", "type": "perplexity", "format": "text",
                          "data": {"pvc": {"claimName": "corpus", "path": "heldout"}}}],
              "gates": [{"metric": "heldout.perplexity", "comparator": "<", "threshold": 30}]}
MODEL_REF = {"location": {"pvc": {"claimName": "models", "path": "llm"}}, "provenance": "provenance.json"}


def finished(phase: str = "Succeeded", reason: str = "TrainingCompleted", **spec) -> dict:
    o = obj(**({"evaluation": EVALUATION} | spec))
    o["status"] = {"phase": phase, "completionTime": "2026-11-22T11:00:00Z", "modelRef": MODEL_REF,
                   "conditions": [{"type": phase, "status": "True", "reason": reason, "message": "done",
                                   "lastTransitionTime": "2026-11-22T11:00:00Z"}]}
    return o


def evaluated(gates_passed: str | None, phase: str = "Succeeded") -> dict:
    status = {"phase": phase, "results": [{"suite": "heldout", "metrics": {"loss": 3.5, "perplexity": 33.1}}]}
    if gates_passed is not None:
        status["conditions"] = [{"type": "GatesPassed", "status": gates_passed, "reason": "GateFailed",
                                 "message": "1 of 1 gates failed: heldout.perplexity = 33.1, needs < 30: failed"}]
    return {"metadata": {"name": "llm", "ownerReferences": [{"kind": "ForgeTraining", "name": "llm", "uid": "uid-1"}]},
            "status": status}


def test_a_succeeded_training_gets_its_forgeeval():
    p = plan_training(finished(), Observed(now=NOW))
    (fe,) = p.applies("ForgeEval")
    assert fe["metadata"]["name"] == "llm" and fe["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert fe["spec"]["model"] == {"trainingRef": "llm"} and [g | {"significance": 0.05} for g in EVALUATION["gates"]] == fe["spec"]["gates"]
    assert fe["spec"]["suites"][0]["data"] == EVALUATION["suites"][0]["data"] and fe["spec"]["resources"]["gpus"] == 1
    assert p.status["evaluation"] == {"name": "llm", "phase": "Pending"} and p.status["phase"] == "Succeeded"


def test_a_failed_gate_fails_the_training_and_the_model_stays():
    p = plan_training(finished(), Observed(now=NOW, evaluation=evaluated("False")))
    assert p.status["phase"] == "Failed" and p.status["modelRef"] == MODEL_REF
    failed = C.find(p.status["conditions"], "Failed")
    assert failed["reason"] == "EvaluationGateFailed"
    assert "heldout.perplexity = 33.1, needs < 30: failed" in failed["message"] and "models:/llm" in failed["message"]
    assert C.find(p.status["conditions"], "Succeeded")["status"] == "False"
    assert p.status["evaluation"] == {"name": "llm", "phase": "Succeeded", "gatesPassed": False,
                                      "metrics": {"heldout.loss": 3.5, "heldout.perplexity": 33.1}}
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "EvaluationGateFailed")]
    # level-based: planned again, it stays failed, says nothing more, and keeps its ForgeEval
    again = plan_training(finished() | {"status": p.status}, Observed(now=NOW, evaluation=evaluated("False")))
    assert again.status == p.status and not again.events and again.applies("ForgeEval")


def test_passed_gates_keep_the_training_succeeded():
    p = plan_training(finished(), Observed(now=NOW, evaluation=evaluated("True")))
    assert p.status["phase"] == "Succeeded" and p.status["evaluation"]["gatesPassed"] is True


def test_no_evaluation_without_spec_evaluation_or_after_a_failed_training():
    assert not plan_training(finished(evaluation=None), Observed(now=NOW)).applies("ForgeEval")
    failed = plan_training(finished("Failed", "MaxRestartsExceeded"), Observed(now=NOW))
    assert not failed.applies("ForgeEval") and "evaluation" not in failed.status


def test_a_forgeeval_of_the_same_name_that_is_not_ours_is_not_mirrored():
    theirs = evaluated("False") | {"metadata": {"name": "llm"}}
    p = plan_training(finished(), Observed(now=NOW, evaluation=theirs))
    assert p.status["phase"] == "Succeeded" and p.status["evaluation"] == {"name": "llm", "phase": "Pending"}
