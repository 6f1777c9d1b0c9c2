"""The ForgeEval planner, pure: waiting for the model, the evaluation Job, Running, and the results,
gates and GatesPassed read from the pod's termination message (as the kubelet stores it)."""

from __future__ import annotations

import yaml

from forge_operator.evaluation.observe import ObservedEval, read
from forge_operator.evaluation.planner import plan_eval
from forge_operator.k8s import conditions as C
from forge_operator.k8s.network import NetworkSeen
from forge_trainer.contract import EvalTerminationMessage, GateOutcome, SuiteOutcome
from operator_support import NOW, forge_eval

IMAGE = "forge-trainer:test"
MODEL = {"pvc": {"claimName": "models", "path": "run-1"}}


def obj(**spec) -> dict:
    o = forge_eval()
    o["metadata"].update(namespace="ns", generation=3, uid="uid-e")
    o["spec"].update(spec)
    return o


def trained(phase: str = "Succeeded") -> dict:
    status = {"phase": phase} | ({"modelRef": {"location": MODEL}} if phase == "Succeeded" else {})
    return {"metadata": {"name": "llm"}, "status": status}


def job() -> dict:
    return {"metadata": {"name": "llm-eval", "uid": "uid-j"}, "status": {}}


def pod(phase: str = "Running", exit_code: int | None = None, message: str | None = None) -> dict:
    p = {"metadata": {"name": "llm-eval-abc"}, "status": {"phase": phase}}
    if exit_code is not None:
        p["status"]["containerStatuses"] = [{"name": "evaluator", "state": {"terminated": {
            "exitCode": exit_code, **({"message": message} if message is not None else {})}}}]
    return p


def plan(o: dict, **observed):
    return plan_eval(o, ObservedEval(now=NOW, **observed), IMAGE)


def cond(p, type_: str) -> dict | None:
    return C.find(p.status.get("conditions"), type_)


def test_it_waits_for_its_training_and_says_so_once():
    p = plan(obj(), trainings={"llm": trained("Running")})
    assert p.status["phase"] == "Pending" and not p.apply and p.requeue_after
    running = cond(p, "Running")
    assert (running["status"], running["reason"]) == ("False", "WaitingForModel")
    assert "ForgeTraining llm is Running; evaluated once it has Succeeded" in running["message"]
    assert [(e.type, e.reason) for e in p.events] == [("Normal", "WaitingForModel")]
    again = plan(obj() | {"status": p.status}, trainings={"llm": trained("Running")})
    assert again.status == p.status and not again.events
    missing = plan(obj(), trainings={"llm": None})
    assert "ForgeTraining llm does not exist" in cond(missing, "Running")["message"]


def test_a_failed_training_fails_the_evaluation():
    p = plan(obj(), trainings={"llm": trained("Failed")})
    assert p.status["phase"] == "Failed" and cond(p, "Failed")["reason"] == "ModelUnavailable"
    assert p.status["completionTime"] and not p.apply


def test_once_the_training_succeeded_its_export_is_evaluated_by_one_job():
    o = obj(baseline={"checkpoint": {"pvc": {"claimName": "old-models", "path": "v1"}}},
            gates=[{"metric": "heldout.loss", "maxDrop": 0.05}])
    p = plan(o, trainings={"llm": trained()})
    assert p.status["phase"] == "Pending" and [c["kind"] for c in p.apply] == ["ConfigMap", "NetworkPolicy", "Job"]
    config_map, _, job_ = p.apply
    config = yaml.safe_load(config_map["data"]["eval.yaml"])
    assert config["model_path"] == "/mnt/pvc/models/run-1" and config["baseline_path"] == "/mnt/pvc/old-models/v1"
    assert config["output_dir"] == "/mnt/pvc/models/run-1/evaluations/llm"
    assert config["suites"][0]["path"] == "/mnt/pvc/corpus" and config["gates"][0]["max_drop"] == 0.05
    spec = job_["spec"]
    assert spec["backoffLimit"] == 0 and job_["metadata"]["ownerReferences"][0]["uid"] == "uid-e"
    pod_spec = spec["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["command"] == ["python", "-m", "forge_trainer.eval", "--config", "/etc/forge/eval.yaml"]
    assert container["image"] == IMAGE and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod_spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"models": False, "old-models": True, "corpus": True}  # results are written next to the model
    assert pod_spec["securityContext"]["runAsNonRoot"] and spec["template"]["metadata"]["labels"]["forge.dev/eval"] == "llm"


def test_the_evaluator_uses_every_gpu_of_its_pod_and_the_cpu_without_one():
    for gpus, device, used in ((4, "cuda", 4), (1, "cuda", 1), (0, "cpu", None)):
        config_map, _, job_ = plan(obj(resources={"gpus": gpus}), trainings={"llm": trained()}).apply
        config = yaml.safe_load(config_map["data"]["eval.yaml"])
        assert (config["device"], config["gpus"]) == (device, used)  # 4: the model split across the 4
        limits = job_["spec"]["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)


def test_a_generation_suite_gets_its_rewards_mounted_and_translated_as_a_trainings():
    rewards = [{"name": "kpi", "weight": 2, "python": {"configMap": {"name": "team-kpis", "key": "kpi.py"}, "function": "score"}},
               {"name": "from-pvc", "python": {"pvc": {"claimName": "scripts", "path": "r/reward.py"}, "function": "f"}},
               {"name": "judge", "http": {"url": "http://judge.team.svc:8080/score"}}]
    o = obj(model={"checkpoint": MODEL}, gates=[{"metric": "gen.reward_kpi", "comparator": ">", "threshold": 0.5}],
            suites=[{"name": "gen", "type": "generation", "data": {"pvc": {"claimName": "corpus", "path": "prompts"}},
                     "temperature": 0.7, "seed": 3, "rewards": rewards}])
    config_map, _, job_ = plan(o).apply
    suite = yaml.safe_load(config_map["data"]["eval.yaml"])["suites"][0]
    assert [r.get("function") for r in suite["rewards"]] == [
        "/mnt/rewards/team-kpis/kpi.py:score", "/mnt/pvc/scripts/r/reward.py:f", None]  # where the pod mounts them
    assert suite["rewards"][2]["http"]["url"] == "http://judge.team.svc:8080/score" and suite["temperature"] == 0.7
    pod_spec = job_["spec"]["template"]["spec"]
    assert {"name": "rewards-team-kpis", "configMap": {"name": "team-kpis"}} in pod_spec["volumes"]
    assert {"name": "rewards-team-kpis", "mountPath": "/mnt/rewards/team-kpis", "readOnly": True} \
        in pod_spec["containers"][0]["volumeMounts"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod_spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"models": False, "corpus": True, "scripts": True}


def test_a_model_folder_needs_no_training():
    p = plan(obj(model={"checkpoint": MODEL}, network={"egress": "Unrestricted"}))
    assert [c["kind"] for c in p.apply] == ["ConfigMap", "Job"]  # and no NetworkPolicy without egress Restricted
    assert yaml.safe_load(p.apply[0]["data"]["eval.yaml"])["egress"]["lock"] is False


def test_the_pod_runs_then_its_results_and_gates_go_into_status():
    running = plan(obj(), trainings={"llm": trained()}, job=job(), pods=[pod()])
    assert running.status["phase"] == "Running" and running.status["startTime"] and not running.apply
    message = EvalTerminationMessage(
        status="completed", exit_code=0, gates_passed=False, results="/mnt/pvc/models/run-1/evaluations/llm/results.json",
        suites=[SuiteOutcome(suite="heldout", type="perplexity", samples=12,
                             metrics={"loss": 3.5, "perplexity": 33.1, "bits_per_byte": 1.2})],
        gates=[GateOutcome(metric="heldout.perplexity", passed=False, value=33.1, comparator="<", threshold=30,
                           message="heldout.perplexity = 33.1, needs < 30: failed")])
    done = plan(obj() | {"status": running.status}, trainings={"llm": trained()}, job=job(),
                pods=[pod("Succeeded", 0, message.to_json())])
    s = done.status
    assert s["phase"] == "Succeeded" and s["completionTime"] and cond(done, "Succeeded")["reason"] == "EvaluationCompleted"
    assert s["results"] == [{"suite": "heldout", "type": "perplexity", "samples": 12,
                             "metrics": {"loss": 3.5, "perplexity": 33.1, "bits_per_byte": 1.2}}]
    assert s["gates"][0] | {} == {"metric": "heldout.perplexity", "passed": False, "value": 33.1, "comparator": "<",
                                  "threshold": 30.0, "message": "heldout.perplexity = 33.1, needs < 30: failed"}
    gates = cond(done, "GatesPassed")
    assert (gates["status"], gates["reason"]) == ("False", "GateFailed")
    assert gates["message"] == "1 of 1 gates failed: heldout.perplexity = 33.1, needs < 30: failed"
    assert s["mainMetric"] == "heldout.perplexity=33.1" and cond(done, "Running")["status"] == "False"
    assert {(e.type, e.reason) for e in done.events} == {("Warning", "GateFailed"), ("Normal", "EvaluationCompleted")}
    # finished: nothing more happens, whatever is observed
    later = plan(obj() | {"status": s}, trainings={"llm": trained("Running")})
    assert later.status == s and not later.apply and not later.events


def test_a_failed_evaluator_fails_the_evaluation_with_its_message():
    failed = EvalTerminationMessage(status="failed", exit_code=78, message="config error: model /mnt/pvc/models/run-1: "
                                    "no config.json (a Hugging Face model folder is needed)")
    p = plan(obj(), trainings={"llm": trained()}, job=job(), pods=[pod("Failed", 78, failed.to_json())])
    assert p.status["phase"] == "Failed"
    assert cond(p, "Failed")["message"] == f"exit code 78: {failed.message}"
    garbled = plan(obj(), trainings={"llm": trained()}, job=job(), pods=[pod("Succeeded", 0, "Traceback ...")])
    assert garbled.status["phase"] == "Failed" and "without results" in cond(garbled, "Failed")["message"]


def test_an_invalid_forgeeval_says_why_until_it_is_fixed():
    bad = obj(gates=[{"metric": "nosuchsuite.loss", "comparator": "<", "threshold": 3.0}])
    p = plan(bad, trainings={"llm": trained()})
    invalid = cond(p, "Invalid")
    assert invalid["status"] == "True" and invalid["reason"] == "InvalidSpec" and "gate" in invalid["message"]
    assert not p.apply and [e.reason for e in p.events] == ["InvalidSpec"]
    fixed = plan(obj() | {"status": p.status}, trainings={"llm": trained()})
    assert cond(fixed, "Invalid") is None and fixed.apply


# --------------------------------------------------------------------------- S3 locations and network.egress
STORE = {"endpoint": "http://rgw.storage.svc:7480", "pathStyle": True, "secretRef": {"name": "store-keys"}}
RGW = {"metadata": {"name": "rgw", "namespace": "storage"},
       "spec": {"selector": {"app": "rgw"}, "ports": [{"port": 7480, "targetPort": 8080}]}}


def on_s3(uri: str, **store) -> dict:
    return {"s3": {"uri": uri, **(store or STORE)}}


def test_a_model_and_suites_on_s3_are_read_through_scratch_with_the_locations_secret():
    exported = {"metadata": {"name": "llm"}, "status": {"phase": "Succeeded",
                                                        "modelRef": {"location": on_s3("s3://runs/llm/model")}}}
    rewards = [{"name": "judge", "http": {"url": "http://192.0.2.9:8080/score"}}]
    o = obj(suites=[{"name": "heldout", "type": "perplexity", "format": "text", "data": on_s3("s3://data/heldout/")},
                    {"name": "gen", "type": "generation", "data": {"pvc": {"claimName": "corpus"}}, "rewards": rewards}])
    config_map, policy, job_ = plan(o, trainings={"llm": exported}, network=NetworkSeen(services={("storage", "rgw"): RGW})).apply
    config = yaml.safe_load(config_map["data"]["eval.yaml"])
    assert config["model_path"] == "s3://runs/llm/model" and config["suites"][0]["path"] == "s3://data/heldout"
    assert config["output_dir"] == "s3://runs/llm/model/evaluations/llm"  # beside the model, as on a claim
    assert config["s3"]["endpoint"] == "http://rgw.storage.svc:7480" and config["s3"]["path_style"] is True
    assert config["scratch_dir"] == "/mnt/scratch" and config["egress"]["lock"] is True
    assert config["fields"] == {"s3://runs/llm/model": "ForgeTraining llm: spec.output.location",
                                "s3://data/heldout": "spec.suites[0].data",
                                "s3://runs/llm/model/evaluations/llm": "ForgeTraining llm: spec.output.location"}
    pod_spec = job_["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]} == {
        "AWS_ACCESS_KEY_ID": "store-keys", "AWS_SECRET_ACCESS_KEY": "store-keys", "AWS_SESSION_TOKEN": "store-keys"}
    assert {"name": "scratch", "emptyDir": {}} in pod_spec["volumes"]
    assert {"name": "scratch", "mountPath": "/mnt/scratch"} in container["volumeMounts"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod_spec["volumes"] if "persistentVolumeClaim" in v] == ["corpus"]
    # the NetworkPolicy: DNS, the store's pods (its Service read), the reward service; nothing in
    assert policy["metadata"]["name"] == "llm-eval" and policy["metadata"]["ownerReferences"][0]["uid"] == "uid-e"
    assert policy["spec"] == {
        "podSelector": {"matchLabels": job_["spec"]["template"]["metadata"]["labels"]},
        "policyTypes": ["Ingress", "Egress"],  # no ingress rule: nothing comes in
        "egress": [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                   {"to": [{"ipBlock": {"cidr": "192.0.2.9/32"}}], "ports": [{"protocol": "TCP", "port": 8080}]},
                   {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "storage"}},
                            "podSelector": {"matchLabels": {"app": "rgw"}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}]}]}


def test_s3_locations_of_one_evaluation_share_one_store():
    o = obj(model={"checkpoint": on_s3("s3://runs/llm/ckpt")},
            suites=[{"name": "heldout", "type": "perplexity", "format": "text",
                     "data": on_s3("s3://data/heldout", endpoint="http://192.0.2.30:9000")}])
    p = plan(o)
    assert not p.apply and cond(p, "Invalid")["message"] == (
        "spec.suites[0].data.s3: every S3 location of an evaluation must use the same endpoint, region, pathStyle and "
        "secretRef (as spec.model.checkpoint.s3 does)")


def test_observe_reads_the_services_of_the_urls_the_policy_allows_before_the_job_only():
    from test_network_policy import Reader

    exported = {"metadata": {"name": "llm"}, "status": {"phase": "Succeeded",
                                                        "modelRef": {"location": on_s3("s3://runs/llm/model")}}}
    reader = Reader({("ForgeTraining", "ns", "llm"): exported, ("Service", "storage", "rgw"): RGW})
    seen = read(reader, obj(), NOW, "llm-eval").network
    assert seen == NetworkSeen(services={("storage", "rgw"): RGW})  # the export's store; no API server
    assert not any(c[1] == "EndpointSlice" for c in reader.calls)
    unrestricted = Reader({("ForgeTraining", "ns", "llm"): exported})
    assert read(unrestricted, obj(network={"egress": "Unrestricted"}), NOW, "llm-eval").network == NetworkSeen()
    assert not any(c[1] == "Service" for c in unrestricted.calls)
