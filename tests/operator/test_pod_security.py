"""Worker pods under the API server's own PodSecurity admission, in a namespace that enforces the
Pod Security Standard `restricted` (what an administrator of a shared cluster sets)."""

from __future__ import annotations

import json

import pytest

from operator_support import training
from test_lifecycle import exit_pod, phase_is, running_workers, worker_pods

pytestmark = pytest.mark.cluster

ENFORCE = "pod-security.kubernetes.io/enforce"


def enforce_restricted(kube) -> None:
    """Enforce `restricted` in the test's namespace, and prove the API server does: a pod with no
    securityContext is refused."""
    kube.cluster.kubectl("label", "--overwrite", "namespace", kube.namespace, f"{ENFORCE}=restricted")
    bare = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"},
            "spec": {"containers": [{"name": "c", "image": "trainer:1"}]}}
    out = kube("apply", "--dry-run=server", "-f", "-", input=json.dumps(bare), check=False)
    assert out.returncode != 0 and 'violates PodSecurity "restricted:latest"' in out.stderr, out.stderr


def test_a_training_runs_to_succeeded_in_a_namespace_that_enforces_restricted(kube, operator):
    """With a signing key's Secret and the downward API variables provenance.json records: both allowed."""
    enforce_restricted(kube)
    kube.apply(training("llm", provenance={"signingKeySecret": {"name": "model-signing"}}))
    pods = kube.wait_for("4 running ranks", running_workers(kube, "llm", 4, 0))
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsUser"] == 10001
        assert pod["spec"]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert {"name": "signing-key", "secret": {"secretName": "model-signing", "defaultMode": 0o440,
                                                  "items": [{"key": "private.pem", "path": "private.pem"}]}} \
            in pod["spec"]["volumes"]
        env = {e["name"]: e.get("valueFrom") for e in pod["spec"]["containers"][0]["env"]}
        assert env["FORGE_NODE_ZONE"] == {"fieldRef": {"apiVersion": "v1",
                                                       "fieldPath": "metadata.labels['topology.kubernetes.io/zone']"}}
    kube.wait_for("Running", phase_is(kube, "llm", "Running"))
    for pod in pods:
        exit_pod(kube, pod["metadata"]["name"], 0)
    kube.wait_for("Succeeded", phase_is(kube, "llm", "Succeeded"))
    refused = [e for e in kube.events("reason=FailedCreate") if "PodSecurity" in e.get("message", "")]
    assert not refused


def test_a_users_host_path_volume_is_refused_by_restricted(kube, operator):
    """The user's own pod fields are passed through as written: a hostPath volume breaks `restricted`.
    The API server refuses the Job's pods (the Job controller says so only in the Job's events); the
    training quotes the refusal in its Invalid condition and an event, and no worker starts."""
    enforce_restricted(kube)
    kube.apply(training("llm", resources={"volumes": [{"name": "scratch", "hostPath": {"path": "/mnt/nvme"}}],
                                          "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}))
    refused = kube.wait_for("the Job's pods refused", lambda: [
        e for e in kube.events("involvedObject.kind=Job,reason=FailedCreate")
        if 'violates PodSecurity "restricted:latest"' in e.get("message", "")])
    assert 'volume "scratch" uses restricted volume type "hostPath"' in refused[0]["message"]
    invalid = kube.wait_for("the training's Invalid condition", lambda: next(
        (c for c in kube.get("forgetraining", "llm").get("status", {}).get("conditions", [])
         if c["type"] == "Invalid" and c["reason"] == "PodsRefused"), None))
    assert invalid["status"] == "True"
    assert invalid["message"].startswith('the API server refused the worker pods of Job llm-r0: pods "llm-r0-')
    assert ('is forbidden: violates PodSecurity "restricted:latest": restricted volume types '
            '(volume "scratch" uses restricted volume type "hostPath")') in invalid["message"]
    told = kube.wait_for("a PodsRefused event on the training", lambda: [
        e for e in kube.events("involvedObject.kind=ForgeTraining,reason=PodsRefused")])
    assert told[0]["type"] == "Warning" and told[0]["message"] == invalid["message"]
    assert not worker_pods(kube, "llm")
    assert ft_phase(kube, "llm") == "Pending"


def ft_phase(kube, name: str) -> str | None:
    return kube.get("forgetraining", name).get("status", {}).get("phase")
