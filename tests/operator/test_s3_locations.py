"""S3 locations of a ForgeTraining: what the trainer is told, what the worker pods get (the Secret's
credentials as environment, node-local scratch), what the NetworkPolicy allows, what the API refuses,
and a storage error of the trainer becoming the Failed condition. On the test control plane: the pod and
the NetworkPolicy the operator applies."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from forge_operator.api.training import ForgeTraining
from forge_operator.k8s import conditions as C
from forge_operator.k8s.network import NetworkSeen
from forge_operator.training.children import WorkerState, build_pod_template, desired_children
from forge_operator.training.observe import Observed
from forge_operator.training.planner import plan_training
from forge_operator.training.translate import TranslationError, trainer_config
from forge_trainer.contract import TerminationMessage
from operator_support import NOW, job, obj, pod, training

ENDPOINT = "http://192.0.2.20:9000"
STORE = {"endpoint": ENDPOINT, "pathStyle": True, "region": "eu-west-1", "secretRef": {"name": "store-keys"}}
CREDENTIALS = [
    {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "store-keys", "key": "AWS_ACCESS_KEY_ID",
                                                                 "optional": False}}},
    {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "store-keys",
                                                                     "key": "AWS_SECRET_ACCESS_KEY", "optional": False}}},
    {"name": "AWS_SESSION_TOKEN", "valueFrom": {"secretKeyRef": {"name": "store-keys", "key": "AWS_SESSION_TOKEN",
                                                                 "optional": True}}},
]


def s3(uri: str, **store) -> dict:
    return {"s3": {"uri": uri, **(store or STORE)}}


def on_s3(**overrides) -> dict:
    """The base training with its data, checkpoints and export on S3."""
    spec = dict(data={"sources": [{"name": "corpus", "location": s3("s3://corpora/web/")}]},
                checkpoint={"location": s3("s3://runs/llm/ckpt")}, output={"location": s3("s3://runs/llm/model")})
    return obj(**(spec | overrides))


def test_the_trainer_is_told_the_s3_urls_and_the_one_way_to_reach_the_store():
    config = trainer_config(ForgeTraining.model_validate(on_s3()))
    assert config.data.sources[0].path == "s3://corpora/web"
    assert config.checkpoint.dir == "s3://runs/llm/ckpt" and config.output.dir == "s3://runs/llm/model"
    assert (config.s3.endpoint, config.s3.region, config.s3.path_style) == (ENDPOINT, "eu-west-1", True)
    assert config.cache_dir == "/mnt/scratch/cache"  # node-local: nothing of the checkpoints is on a claim
    resumed = on_s3(checkpoint={"location": s3("s3://runs/llm/ckpt"), "resumeFrom": "step-00000100"})
    assert trainer_config(ForgeTraining.model_validate(resumed)).checkpoint.resume == "s3://runs/llm/ckpt/step-00000100"
    # data on S3, checkpoints on a claim: the prepared data stays beside the checkpoints, shared by the nodes
    mixed = trainer_config(ForgeTraining.model_validate(obj(data=on_s3()["spec"]["data"])))
    assert mixed.cache_dir == "/mnt/pvc/ckpt/llm/.forge-cache" and mixed.s3.endpoint == ENDPOINT


def test_the_locations_of_one_training_share_one_store():
    other = on_s3(output={"location": s3("s3://runs/llm/model", endpoint="http://192.0.2.21:9000", pathStyle=True,
                                         secretRef={"name": "store-keys"}, region="eu-west-1")})
    with pytest.raises(TranslationError, match=r"^spec\.output\.location\.s3: every S3 location of a training must use "
                                               r"the same endpoint, region, pathStyle and secretRef \(as "
                                               r"spec\.data\.sources\[0\]\.location\.s3 does\)$"):
        trainer_config(ForgeTraining.model_validate(other))
    plan = plan_training(other, Observed(now=NOW))
    invalid = C.find(plan.status["conditions"], "Invalid")
    assert invalid["status"] == "True" and "every S3 location of a training" in invalid["message"]


def test_the_workers_get_the_secrets_credentials_and_scratch_and_mount_no_claim_for_s3():
    pod_spec = build_pod_template(ForgeTraining.model_validate(on_s3()), WorkerState(), "img")["spec"]
    [container] = pod_spec["containers"]
    assert [e for e in container["env"] if e["name"].startswith("AWS_")] == CREDENTIALS
    assert {"name": "scratch", "emptyDir": {}} in pod_spec["volumes"]
    assert {"name": "scratch", "mountPath": "/mnt/scratch"} in container["volumeMounts"]
    assert not [v for v in pod_spec["volumes"] if "persistentVolumeClaim" in v]
    # without a Secret (the pod's own identity, e.g. IRSA): no credentials from the operator
    keyless = {k: v for k, v in STORE.items() if k != "secretRef"}
    anonymous = on_s3(data={"sources": [{"name": "corpus", "location": s3("s3://corpora/web", **keyless)}]},
                      checkpoint={"location": s3("s3://runs/llm/ckpt", **keyless)},
                      output={"location": s3("s3://runs/llm/model", **keyless)})
    env = build_pod_template(ForgeTraining.model_validate(anonymous), WorkerState(), "img")["spec"]["containers"][0]["env"]
    assert not [e for e in env if e["name"].startswith("AWS_")]


def test_the_network_policy_allows_the_s3_endpoint():
    ft = ForgeTraining.model_validate(on_s3())
    [policy] = [c for c in desired_children(ft, "", WorkerState(), network=NetworkSeen(api_server=None))
                if c["kind"] == "NetworkPolicy"]
    assert policy["spec"]["egress"][-1] == {"to": [{"ipBlock": {"cidr": "192.0.2.20/32"}}],
                                            "ports": [{"protocol": "TCP", "port": 9000}]}
    rgw_store = STORE | {"endpoint": "http://rgw.storage.svc"}
    in_cluster = on_s3(data={"sources": [{"name": "c", "location": s3("s3://corpora", **rgw_store)}]},
                       checkpoint={"location": s3("s3://runs/llm/ckpt", **rgw_store)},
                       output={"location": s3("s3://runs/llm/model", **rgw_store)})
    rgw = {"metadata": {"name": "rgw", "namespace": "storage"},
           "spec": {"selector": {"app": "rgw"}, "ports": [{"port": 80, "targetPort": 7480}]}}
    seen = NetworkSeen(api_server=None, services={("storage", "rgw"): rgw})
    [policy] = [c for c in desired_children(ForgeTraining.model_validate(in_cluster), "", WorkerState(), network=seen)
                if c["kind"] == "NetworkPolicy"]
    assert policy["spec"]["egress"][-1] == {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "storage"}},
                "podSelector": {"matchLabels": {"app": "rgw"}}}], "ports": [{"protocol": "TCP", "port": 7480}]}


@pytest.mark.parametrize("change, field, message", [
    ({"output": {"location": s3("s3://runs")}}, "spec.output.location.s3.uri", "not the bucket's root"),
    ({"output": {"location": s3("s3://runs/llm")}}, "spec.output.location.s3.uri",
     "must not be the checkpoint prefix or a prefix above it"),
])
def test_the_api_refuses_what_s3_locations_cannot_do(change, field, message):
    from forge_operator.api.base import error_fields

    with pytest.raises(ValidationError) as err:
        ForgeTraining.model_validate(on_s3(**change))
    assert message in str(err.value) and field in error_fields(err.value)


def test_a_storage_error_of_the_trainer_fails_the_training_with_its_message_in_spec_terms():
    o = on_s3()
    o["status"] = {"phase": "Running"}
    message = TerminationMessage(status="failed", exit_code=78, message=(
        "storage error: checkpoint.dir s3://runs/llm/ckpt: the S3 credentials were refused by http://192.0.2.20:9000: "
        "check the Secret of checkpoint.dir.s3.secretRef (InvalidAccessKeyId: The AWS access key Id you provided "
        "does not exist in our records.)")).to_json()
    failed = pod("p0", 0, phase="Failed", status={"containerStatuses": [{"name": "trainer", "state": {
        "terminated": {"exitCode": 78, "message": message}}}]})
    plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0", conditions=[{"type": "Failed", "status": "True"}])],
                                     pods=[failed]))
    condition = C.find(plan.status["conditions"], "Failed")
    assert plan.status["phase"] == "Failed" and condition["reason"] == "NonRetryableExitCode"
    assert ("storage error: spec.checkpoint.location s3://runs/llm/ckpt: the S3 credentials were refused" in
            condition["message"]) and "check the Secret of spec.checkpoint.location.s3.secretRef" in condition["message"]


def test_a_succeeded_training_points_at_its_model_in_the_bucket():
    o = on_s3()
    o["status"] = {"phase": "Running"}
    done = job("llm-r0", conditions=[{"type": "Complete", "status": "True"}])
    plan = plan_training(o, Observed(now=NOW, jobs=[done], pods=[pod("p0", 0, phase="Succeeded")]))
    assert plan.status["modelRef"]["location"] == s3("s3://runs/llm/model")
    assert "model exported to s3://runs/llm/model" in C.find(plan.status["conditions"], "Succeeded")["message"]


# --------------------------------------------------------------------------- on the test control plane
@pytest.mark.cluster
def test_the_operator_gives_the_workers_the_secrets_credentials_and_allows_the_endpoint(kube, operator):
    manifest = training("llm", resources={"numNodes": 1, "gpusPerNode": 0},
                        **{k: v for k, v in on_s3()["spec"].items() if k in ("data", "checkpoint", "output")})
    kube.apply(manifest)
    pods = kube.wait_for("a worker pod", lambda: kube.get("pods", selector="forge.dev/training=llm")["items"])
    container = pods[0]["spec"]["containers"][0]
    assert [e for e in container["env"] if e["name"].startswith("AWS_")] == CREDENTIALS
    assert {"name": "scratch", "mountPath": "/mnt/scratch"} in container["volumeMounts"]
    policy = kube.wait_for("the NetworkPolicy", lambda: (kube.get("networkpolicies")["items"] or [None])[0])
    assert {"to": [{"ipBlock": {"cidr": "192.0.2.20/32"}}], "ports": [{"protocol": "TCP", "port": 9000}]} in \
        policy["spec"]["egress"]
    config = json.loads(json.dumps(kube.get("configmaps", "llm-config")["data"]))
    assert "endpoint: http://192.0.2.20:9000" in config["trainer.yaml"] and "s3://runs/llm/ckpt" in config["trainer.yaml"]


def test_on_s3_leaves_the_base_training_alone():
    before = copy.deepcopy(obj())
    on_s3()
    assert obj() == before
