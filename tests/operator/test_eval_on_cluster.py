"""ForgeEval on the real control plane with the operator process: its Job runs one evaluator pod (kwok
plays the kubelet and writes the pod's termination message, as a kubelet reads it from
terminationMessagePath); the results, the gates and GatesPassed land in status; a failed evaluator
fails it with the evaluator's own words."""

from __future__ import annotations

import pytest
import yaml

from forge_trainer.contract import EvalTerminationMessage, GateOutcome, SuiteOutcome
from operator_support import forge_eval
from test_lifecycle import EXIT

pytestmark = pytest.mark.cluster
MESSAGE = "kwok.forge.dev/termination-message"


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def of_checkpoint(name: str) -> dict:
    fe = forge_eval(name)
    fe["spec"]["model"] = {"checkpoint": {"pvc": {"claimName": "models", "path": f"{name}/model"}}}
    # resources left at their default: one GPU (the test cluster's nodes are GPU nodes, tainted as such)
    fe["spec"]["gates"] = [{"metric": "heldout.perplexity", "comparator": "<", "threshold": 30}]
    return fe


def running_pod(kube, name: str) -> dict:
    def check():
        pods = kube.get("pods", selector=f"forge.dev/eval={name}")["items"]
        return pods[0] if pods and pods[0]["status"].get("phase") == "Running" else None
    return kube.wait_for(f"{name}'s evaluator running", check, timeout=180)


def end_pod(kube, pod: dict, code: int, message: EvalTerminationMessage) -> None:
    kube("annotate", "--overwrite", "pod", pod["metadata"]["name"], f"{MESSAGE}={message.to_json()}", f"{EXIT}={code}")


def test_a_forgeeval_runs_to_succeeded_with_results_and_a_failed_gate_in_status(kube, operator):
    kube.apply(of_checkpoint("ev"))
    pod = running_pod(kube, "ev")
    assert pod["spec"]["containers"][0]["command"][:3] == ["python", "-m", "forge_trainer.eval"]
    kube.wait_for("Running", lambda: kube.get("forgeeval", "ev")["status"].get("phase") == "Running")
    results = EvalTerminationMessage(
        status="completed", exit_code=0, gates_passed=False, results="/mnt/pvc/models/ev/model/evaluations/ev/results.json",
        suites=[SuiteOutcome(suite="heldout", type="perplexity", samples=7,
                             metrics={"loss": 3.5, "perplexity": 33.12, "bits_per_byte": 1.25})],
        gates=[GateOutcome(metric="heldout.perplexity", passed=False, value=33.12, comparator="<", threshold=30,
                           message="heldout.perplexity = 33.12, needs < 30: failed")])
    end_pod(kube, pod, 0, results)
    fe = kube.wait_for("Succeeded", lambda: (o := kube.get("forgeeval", "ev"))["status"].get("phase") == "Succeeded" and o)
    s = fe["status"]
    assert s["results"][0]["metrics"] == {"loss": 3.5, "perplexity": 33.12, "bits_per_byte": 1.25}
    assert s["gates"][0]["passed"] is False and s["gates"][0]["threshold"] == 30 and s["mainMetric"] == "heldout.perplexity=33.12"
    gates = condition(fe, "GatesPassed")
    assert gates["status"] == "False" and "heldout.perplexity = 33.12, needs < 30: failed" in gates["message"]
    table = kube("get", "forgeeval", "ev").stdout
    assert "Succeeded" in table and "heldout.perplexity=33.12" in table and "False" in table
    assert any(e["reason"] == "GateFailed" for e in kube.events("involvedObject.kind=ForgeEval"))


def test_a_failed_evaluator_fails_the_forgeeval_with_its_message(kube, operator):
    kube.apply(of_checkpoint("broken"))
    pod = running_pod(kube, "broken")
    error = EvalTerminationMessage(status="failed", exit_code=78,
                                   message="config error: model /mnt/pvc/models/broken/model: no such model folder")
    end_pod(kube, pod, 78, error)
    fe = kube.wait_for("Failed", lambda: (o := kube.get("forgeeval", "broken"))["status"].get("phase") == "Failed" and o)
    assert condition(fe, "Failed")["message"] == f"exit code 78: {error.message}"
    assert condition(fe, "GatesPassed") is None


def test_a_training_with_evaluation_gets_its_forgeeval_and_a_failed_gate_fails_it(kube, operator):
    from operator_support import training
    from test_lifecycle import exit_pod, phase_is, running_workers

    kube.apply(training("gated", resources={"numNodes": 1, "gpusPerNode": 1}, evaluation={
        "suites": [{"name": "heldout", "type": "perplexity", "format": "text", "data": {"pvc": {"claimName": "corpus"}}}],
        "gates": [{"metric": "heldout.perplexity", "comparator": "<", "threshold": 30}]}))
    (worker,) = kube.wait_for("the worker running", running_workers(kube, "gated", 1, 0), timeout=180)
    exit_pod(kube, worker["metadata"]["name"], 0)
    kube.wait_for("Succeeded", phase_is(kube, "gated", "Succeeded"), timeout=120)
    fe = kube.wait_for("its ForgeEval", lambda: kube("get", "forgeeval", "gated", "-o", "json", check=False).returncode == 0
                       and kube.get("forgeeval", "gated"))
    assert fe["metadata"]["ownerReferences"][0]["kind"] == "ForgeTraining" and fe["spec"]["model"] == {"trainingRef": "gated"}
    pod = running_pod(kube, "gated")
    end_pod(kube, pod, 0, EvalTerminationMessage(
        status="completed", exit_code=0, gates_passed=False,
        suites=[SuiteOutcome(suite="heldout", type="perplexity", samples=3, metrics={"loss": 3.6, "perplexity": 36.6})],
        gates=[GateOutcome(metric="heldout.perplexity", passed=False, value=36.6, comparator="<", threshold=30,
                           message="heldout.perplexity = 36.6, needs < 30: failed")]))
    failed = kube.wait_for("Failed by its gate", phase_is(kube, "gated", "Failed"), timeout=120)
    reason = condition(failed, "Failed")
    assert reason["reason"] == "EvaluationGateFailed" and "heldout.perplexity = 36.6, needs < 30: failed" in reason["message"]
    assert failed["status"]["evaluation"] == {"name": "gated", "phase": "Succeeded", "gatesPassed": False,
                                             "metrics": {"heldout.loss": 3.6, "heldout.perplexity": 36.6}}
    assert failed["status"]["modelRef"]["location"]["pvc"]["claimName"] == "models"  # the model stays


def test_a_generation_forgeeval_mounts_its_rewards_and_reports_them(kube, operator):
    """A generation suite scored by a Python reward from a ConfigMap and a built-in one: the evaluator pod
    mounts the ConfigMap where the translated config points, and the rewards' metrics and the sign test's
    gate land in status."""
    from forge_trainer.eval.config import EvalConfig

    fe = of_checkpoint("gen")
    fe["spec"]["suites"] = [{"name": "replies", "type": "generation", "data": {"pvc": {"claimName": "corpus"}},
                             "maxNewTokens": 16, "rewards": [
                                 {"name": "kpi", "python": {"configMap": {"name": "kpi", "key": "kpi.py"}, "function": "score"}},
                                 {"name": "no-digit", "regex": {"mustNotMatch": ["[0-9]"]}}]}]
    fe["spec"]["baseline"] = {"checkpoint": {"pvc": {"claimName": "models", "path": "previous"}}}
    fe["spec"]["gates"] = [{"metric": "replies.reward_kpi", "maxDrop": 0.0}]
    kube.apply(fe)
    pod = running_pod(kube, "gen")
    mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts["/mnt/rewards/kpi"]]["configMap"]["name"] == "kpi"
    config_map = volumes["config"]["configMap"]["name"]
    config = EvalConfig.model_validate(yaml.safe_load(next(iter(kube.get("configmap", config_map)["data"].values()))))
    assert [(r.name, r.function) for r in config.suites[0].rewards] == [
        ("kpi", "/mnt/rewards/kpi/kpi.py:score"), ("no-digit", None)]
    metrics = {"reward": 1.2, "reward_kpi": 0.4, "reward_no-digit": 0.8}
    end_pod(kube, pod, 0, EvalTerminationMessage(
        status="completed", exit_code=0, gates_passed=True,
        suites=[SuiteOutcome(suite="replies", type="generation", samples=12, metrics=metrics,
                             baseline={"reward": 1.3, "reward_kpi": 0.5, "reward_no-digit": 0.8})],
        gates=[GateOutcome(metric="replies.reward_kpi", passed=True, value=0.4, baseline=0.5, max_drop=0.0, drop=0.1,
                           p_value=0.31, message="replies.reward_kpi = 0.4 against baseline 0.5: drop 0.1, maxDrop 0, "
                                                 "sign test p = 0.31 (not significant at 0.05): passed")]))
    done = kube.wait_for("Succeeded", lambda: (o := kube.get("forgeeval", "gen"))["status"].get("phase") == "Succeeded" and o)
    assert done["status"]["results"][0]["metrics"] == metrics and done["status"]["gates"][0]["pValue"] == 0.31
    assert condition(done, "GatesPassed")["status"] == "True"


def test_a_forgeeval_on_s3_gets_a_network_policy_of_exactly_dns_its_store_and_its_reward_service(kube, operator):
    """Model and suites on an in-cluster S3 store (a Service of the namespace), a reward service by address:
    the policy the operator applies before the pod allows DNS, the Service's pods on its target port and the
    reward's address, and nothing in; the pod gets the store's credentials and its scratch."""
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "rgw"},
                "spec": {"selector": {"app": "rgw"}, "ports": [{"port": 7480, "targetPort": 8080}]}})
    store = {"endpoint": "http://rgw:7480", "pathStyle": True, "secretRef": {"name": "store-keys"}}
    fe = forge_eval("s3ev")
    fe["spec"]["model"] = {"checkpoint": {"s3": {"uri": "s3://models/llm", **store}}}
    fe["spec"]["suites"] = [
        {"name": "heldout", "type": "perplexity", "format": "text", "data": {"s3": {"uri": "s3://data/heldout", **store}}},
        {"name": "gen", "type": "generation", "data": {"s3": {"uri": "s3://data/prompts", **store}},
         "rewards": [{"name": "judge", "http": {"url": "http://192.0.2.9:8080/score"}}]}]
    kube.apply(fe)
    pod = running_pod(kube, "s3ev")
    policy = kube.wait_for("the NetworkPolicy", lambda: next(iter(kube.get("networkpolicies")["items"]), None))
    assert policy["metadata"]["name"] == "s3ev-eval" and policy["metadata"]["ownerReferences"][0]["kind"] == "ForgeEval"
    assert policy["spec"] == {
        "podSelector": {"matchLabels": {"app.kubernetes.io/managed-by": "forge-operator",
                                        "app.kubernetes.io/name": "forge-eval", "forge.dev/eval": "s3ev"}},
        "policyTypes": ["Ingress", "Egress"],
        "egress": [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                   {"to": [{"ipBlock": {"cidr": "192.0.2.9/32"}}], "ports": [{"protocol": "TCP", "port": 8080}]},
                   {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": kube.namespace}},
                            "podSelector": {"matchLabels": {"app": "rgw"}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}]}]}
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert {e["name"] for e in container["env"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert {"name": "scratch", "mountPath": "/mnt/scratch"} in container["volumeMounts"]
