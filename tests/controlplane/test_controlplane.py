"""The test control plane behaves like a real cluster with a GPU pool."""

from __future__ import annotations

import os

import pytest

from devcluster import GPU_PRODUCT, GPU_PRODUCT_LABEL, DevCluster, _alive

pytestmark = pytest.mark.cluster

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def gpu_pod(name: str, gpus: int) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "tolerations": [GPU_TOLERATION],
            "containers": [{"name": "main", "image": "trainer:test",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        },
    }


def test_gpu_nodes_look_like_a_gpu_pool(kube):
    nodes = kube.get("nodes")["items"]
    assert len(nodes) >= 4
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["metadata"]["labels"][GPU_PRODUCT_LABEL] == GPU_PRODUCT
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]


def test_scheduler_binds_gpu_pod_and_kwok_runs_it(kube):
    kube.apply(gpu_pod("eight-gpus", 8))
    pod = kube.wait_for("pod Running", lambda: (p := kube.get("pod", "eight-gpus"))["status"].get("phase") == "Running" and p)
    assert pod["spec"]["nodeName"].startswith("gpu-node-")
    assert pod["status"]["podIP"].startswith("127.")


def test_pod_without_gpu_toleration_is_kept_off_the_gpu_pool(kube):
    pod = gpu_pod("no-toleration", 1)
    pod["spec"].pop("tolerations")
    kube.apply(pod)
    event = kube.wait_for("FailedScheduling event", lambda: [
        e for e in kube.events("involvedObject.name=no-toleration") if e["reason"] == "FailedScheduling"])
    assert "untolerated taint" in event[0]["message"]


def test_too_many_gpus_stays_pending_with_failed_scheduling(kube):
    kube.apply(gpu_pod("nine-gpus", 9))
    events = kube.wait_for("FailedScheduling event", lambda: [
        e for e in kube.events("involvedObject.name=nine-gpus") if e["reason"] == "FailedScheduling"])
    assert "Insufficient nvidia.com/gpu" in events[0]["message"]
    pod = kube.get("pod", "nine-gpus")
    assert pod["status"]["phase"] == "Pending"
    assert "nodeName" not in pod["spec"]


def test_kwok_exit_code_annotation_fails_the_container(kube):
    kube.apply(gpu_pod("exits", 1))
    kube.wait_for("Running", lambda: kube.get("pod", "exits")["status"].get("phase") == "Running")
    kube("annotate", "pod", "exits", "kwok.forge.dev/exit-code=137")
    pod = kube.wait_for("Failed", lambda: (p := kube.get("pod", "exits"))["status"].get("phase") == "Failed" and p)
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137


def test_garbage_collector_removes_dependents(kube):
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}})
    owner = kube.get("configmap", "owner")
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    for i in range(3):
        kube.apply({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": f"dependent-{i}", "labels": {"app": "gc"}, "ownerReferences": [ref]}})
    assert len(kube.get("configmap", selector="app=gc")["items"]) == 3
    kube("delete", "configmap", "owner")
    kube.wait_for("dependents collected", lambda: not kube.get("configmap", selector="app=gc")["items"], timeout=60)


def test_job_controller_creates_indexed_pods(kube):
    kube.apply({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "indexed"},
        "spec": {"completions": 2, "parallelism": 2, "completionMode": "Indexed",
                 "template": {"spec": gpu_pod("x", 1)["spec"] | {"restartPolicy": "Never"}}},
    })
    def running():
        pods = kube.get("pods", selector="job-name=indexed")["items"]
        return [p for p in pods if p["status"].get("phase") == "Running"] if len(pods) == 2 else None
    pods = kube.wait_for("2 running pods", lambda: (r := running()) and len(r) == 2 and r)
    indexes = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1"]


def test_down_stops_every_process(tmp_path):
    c = DevCluster(tmp_path / "cp", gpu_nodes=1)
    state = c.up()
    pids = dict(state.pids)
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
    assert all(_alive(pid) for pid in pids.values())
    c.down()
    assert not any(_alive(pid) for pid in pids.values())
    assert not os.path.exists(tmp_path / "cp" / "state.json")
