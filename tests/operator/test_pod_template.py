"""``spec.podTemplate``: what the user adds to the worker pods, merged by the documented rules (the operator's
labels, annotations and restricted defaults stay unless a field of the user's replaces a default; the
operator's own keys cannot be set), pure and on the control plane in a namespace that enforces `restricted`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from forge_operator.api import ForgeTraining
from forge_operator.api.base import format_error
from forge_operator.training.children import WorkerState, desired_children
from operator_support import obj, training
from test_lifecycle import phase_is, running_workers
from test_pod_security import enforce_restricted

POD_TEMPLATE = {
    "metadata": {"labels": {"team": "nlp"}, "annotations": {"k8s.v1.cni.cncf.io/networks": "rdma-net"}},
    "securityContext": {"runAsUser": 20000, "supplementalGroups": [3000]},
    "containerSecurityContext": {"capabilities": {"add": ["IPC_LOCK"], "drop": ["ALL"]}},
    "extendedResources": {"rdma/hca_shared_devices_a": 1},
}


def worker_template(**spec) -> dict:
    ft = ForgeTraining.model_validate(obj(**spec))
    return next(c for c in desired_children(ft, "x: 1", WorkerState()) if c["kind"] == "Job")["spec"]["template"]


def test_the_pod_template_is_merged_into_the_workers():
    t = worker_template(podTemplate=POD_TEMPLATE)
    meta, pod = t["metadata"], t["spec"]
    container = pod["containers"][0]
    assert meta["labels"]["team"] == "nlp" and meta["labels"]["forge.dev/training"] == "llm"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "forge-operator" and meta["labels"]["forge.dev/attempt"] == "0"
    assert meta["annotations"]["k8s.v1.cni.cncf.io/networks"] == "rdma-net"
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    # the user's fields replace the default's, the rest of the default stays
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 20000, "runAsGroup": 10001,
                                      "fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch",
                                      "seccompProfile": {"type": "RuntimeDefault"}, "supplementalGroups": [3000]}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                            "capabilities": {"add": ["IPC_LOCK"], "drop": ["ALL"]}}
    for amounts in (container["resources"]["requests"], container["resources"]["limits"]):
        assert amounts == {"nvidia.com/gpu": "8", "rdma/hca_shared_devices_a": "1"}


def test_without_a_pod_template_the_workers_are_as_before():
    assert worker_template() == worker_template(podTemplate={})


@pytest.mark.parametrize("pod_template, message", [
    ({"metadata": {"labels": {"forge.dev/training": "other"}}}, "spec.podTemplate.metadata.labels: app.kubernetes.io/managed-by"),
    ({"metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": "3"}}},
     "spec.podTemplate.metadata.annotations: app.kubernetes.io/managed-by"),
    ({"extendedResources": {"memory": "1Ti"}}, "spec.podTemplate.extendedResources: cpu and memory are set by"),
    ({"extendedResources": {"nvidia.com/gpu": 4}}, "spec.podTemplate.extendedResources: the GPU resource"),
])
def test_what_the_operator_sets_itself_is_refused_naming_the_field(pod_template, message):
    with pytest.raises(ValidationError) as err:
        ForgeTraining.model_validate(obj(podTemplate=pod_template))
    assert message in format_error(err.value)


@pytest.mark.cluster
def test_restricted_admits_workers_with_the_users_labels_and_security_context(kube, operator):
    enforce_restricted(kube)
    pod_template = {k: v for k, v in POD_TEMPLATE.items() if k in ("metadata", "securityContext")}
    kube.apply(training("llm", resources={"numNodes": 2}, podTemplate=pod_template))
    pods = kube.wait_for("2 running ranks", running_workers(kube, "llm", 2, 0))
    for pod in pods:
        assert pod["metadata"]["labels"]["team"] == "nlp"
        assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "rdma-net"
        sc = pod["spec"]["securityContext"]
        assert sc["runAsUser"] == 20000 and sc["supplementalGroups"] == [3000] and sc["runAsNonRoot"] is True
    kube.wait_for("Running", phase_is(kube, "llm", "Running"))
    assert kube.get("pods", selector="team=nlp")["items"]


POD_SETTINGS = {
    "nodeSelector": {"pool": "a100"}, "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"podAntiAffinity": {"x": 1}}, "volumes": [{"name": "scratch", "emptyDir": {}}],
    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
    "env": [{"name": "NCCL_DEBUG", "value": "INFO"}], "imagePullSecrets": ["registry"],
}


@pytest.mark.parametrize("where", ["podTemplate", "resources"])
def test_pod_settings_are_taken_from_the_pod_template_or_from_resources(where):
    spec = {where: POD_SETTINGS} if where == "podTemplate" else {"resources": {**obj()["spec"]["resources"], **POD_SETTINGS}}
    pod = worker_template(**spec)["spec"]
    container = pod["containers"][0]
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == [POD_SETTINGS["tolerations"][0],
                                  {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == {"podAntiAffinity": {"x": 1}} and pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["volumes"][-1] == {"name": "scratch", "emptyDir": {}}
    assert container["volumeMounts"][-1] == {"name": "scratch", "mountPath": "/scratch"}
    assert container["env"][-1] == {"name": "NCCL_DEBUG", "value": "INFO"}


def test_a_trainings_evaluation_runs_where_its_pod_template_says():
    from forge_operator.training.evaluation import build_evaluation
    ev = {"suites": [{"name": "h", "type": "perplexity", "format": "text", "data": {"pvc": {"claimName": "corpus"}}}]}
    ft = ForgeTraining.model_validate(obj(podTemplate=POD_SETTINGS, evaluation=ev))
    resources = build_evaluation(ft)["spec"]["resources"]
    assert resources["nodeSelector"] == {"pool": "a100"} and resources["tolerations"] == POD_SETTINGS["tolerations"]


@pytest.mark.parametrize("spec, message", [
    ({"podTemplate": {"env": [{"name": "MASTER_PORT", "value": "1"}]}}, "spec.podTemplate.env: MASTER_ADDR, MASTER_PORT"),
    ({"podTemplate": {"env": [{"name": "FORGE_POD_NAME", "value": "x"}]}}, "names starting with FORGE_"),
    ({"podTemplate": {"tolerations": []}, "resources": {"tolerations": []}},
     "spec.podTemplate.tolerations: set podTemplate.tolerations or resources.tolerations, not both"),
])
def test_pod_settings_the_operator_owns_or_set_twice_are_refused(spec, message):
    with pytest.raises(ValidationError) as err:
        ForgeTraining.model_validate(obj(**spec))
    assert message in format_error(err.value)
