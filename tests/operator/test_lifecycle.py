"""User stories of the ForgeTraining lifecycle, against the real control plane.

kwok plays the kubelets: pods become Running once the real scheduler binds them,
and a test ends a worker's container with a chosen exit code by annotating the
pod (tests/controlplane/kwok-stages.yaml). Rank 0's progress reports are pod
annotations, which a test writes the way the trainer does.
"""

from __future__ import annotations

import pytest

from forge_trainer.contract import PROGRESS_ANNOTATION, LastCheckpoint, Progress
from operator_support import training

pytestmark = pytest.mark.cluster

EXIT = "kwok.forge.dev/exit-code"


def ft(kube, name: str) -> dict:
    return kube.get("forgetraining", name)


def phase_is(kube, name: str, *phases: str):
    return lambda: (o := ft(kube, name)).get("status", {}).get("phase") in phases and o


def worker_pods(kube, name: str, attempt: int | None = None) -> list[dict]:
    selector = f"forge.dev/training={name}" + (f",forge.dev/attempt={attempt}" if attempt is not None else "")
    pods = kube.get("pods", selector=selector)["items"]
    return sorted(pods, key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]))


def running_workers(kube, name: str, n: int, attempt: int):
    def check():
        pods = [p for p in worker_pods(kube, name, attempt)
                if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
        return pods if len(pods) == n else None
    return check


def report_progress(kube, pod: str, step: int, loss: float, checkpoint_step: int | None = None) -> None:
    ckpt = None if checkpoint_step is None else LastCheckpoint(
        step=checkpoint_step, path=f"step-{checkpoint_step:08d}", time="2026-11-22T05:00:00Z")
    report = Progress(step=step, total_steps=100, tokens_seen=step * 8192, token_budget=819200, percent=step,
                      loss=loss, learning_rate=3e-4, grad_norm=0.5, tokens_per_second=51234.5, mfu=0.41,
                      eta_seconds=(100 - step) * 12, updated_at="2026-11-22T05:00:00Z", last_checkpoint=ckpt)
    kube("annotate", "--overwrite", "pod", pod, f"{PROGRESS_ANNOTATION}={report.to_json()}")


def exit_pod(kube, pod: str, code: int) -> None:
    kube("annotate", "--overwrite", "pod", pod, f"{EXIT}={code}")


def test_four_node_training_runs_and_succeeds(kube, operator):
    kube.apply(training("llm"))
    pending = kube.wait_for("Pending or later", phase_is(kube, "llm", "Pending", "Initializing", "Running"))
    assert pending["status"]["observedGeneration"] == pending["metadata"]["generation"]

    pods = kube.wait_for("4 running ranks", running_workers(kube, "llm", 4, 0))
    assert len({p["spec"]["nodeName"] for p in pods}) == 4, "one 8-GPU worker per node"
    for rank, pod in enumerate(pods):
        c = pod["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert "--nnodes=4" in c["command"] and "--nproc-per-node=8" in c["command"]
        assert f"--rdzv-endpoint=llm-r0-0.llm.{kube.namespace}.svc:29400" in c["command"]
        assert pod["spec"]["hostname"] == f"llm-r0-{rank}" and pod["spec"]["subdomain"] == "llm"
        assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["spec"]["volumes"]

    running = kube.wait_for("Running", phase_is(kube, "llm", "Running"))
    assert running["status"]["startTime"]
    assert sorted(running["status"]["nodes"]) == sorted(p["spec"]["nodeName"] for p in pods)
    config = kube.get("configmap", "llm-config")
    assert "seq_len: 128" in config["data"]["trainer.yaml"]
    for kind in ("configmap/llm-config", "service/llm", "serviceaccount/forge-trainer-llm", "job/llm-r0"):
        owner = kube.get(*kind.split("/"))["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "ForgeTraining" and owner["name"] == "llm" and owner["controller"] is True

    report_progress(kube, pods[0]["metadata"]["name"], step=40, loss=3.21, checkpoint_step=40)
    o = kube.wait_for("progress in status", lambda: (x := ft(kube, "llm"))["status"].get("progress", {}).get(
        "step") == 40 and x)
    p = o["status"]["progress"]
    assert (p["loss"], p["tokensPerSecond"], p["percent"], p["eta"]) == (3.21, 51234.5, 40.0, "12m00s")
    assert o["status"]["lastCheckpoint"]["step"] == 40
    table = kube("get", "forgetraining", "llm").stdout
    assert "Running" in table and "3.21" in table

    for pod in pods:
        exit_pod(kube, pod["metadata"]["name"], 0)
    done = kube.wait_for("Succeeded", phase_is(kube, "llm", "Succeeded"))
    assert done["status"]["completionTime"]
    assert done["status"]["modelRef"]["location"]["pvc"]["claimName"] == "models"
    reasons = [e["reason"] for e in kube.events("involvedObject.kind=ForgeTraining")]
    assert "AllRanksRunning" in reasons and "TrainingCompleted" in reasons
    # the operator wrote nothing onto the user's object
    meta = ft(kube, "llm")["metadata"]
    assert not meta.get("finalizers") and not any("kopf" in k for k in meta.get("annotations", {}))


def test_failed_rank_restarts_whole_group_from_checkpoint(kube, operator):
    kube.apply(training("llm"))
    pods = kube.wait_for("4 running ranks", running_workers(kube, "llm", 4, 0))
    kube.wait_for("Running", phase_is(kube, "llm", "Running"))
    report_progress(kube, pods[0]["metadata"]["name"], step=30, loss=3.5, checkpoint_step=25)
    kube.wait_for("checkpoint in status", lambda: ft(kube, "llm")["status"].get("lastCheckpoint"))

    # rank 0 takes 8 s to stop (its checkpoint): the new group waits for it
    slow = pods[0]["metadata"]["name"]
    kube("annotate", "pod", slow, "kwok.forge.dev/stop-delay=8s")
    exit_pod(kube, pods[2]["metadata"]["name"], 1)
    kube.wait_for("waiting for the last workers", lambda: any(
        c["reason"] == "PreviousWorkersStopping" for c in ft(kube, "llm")["status"].get("conditions", [])))
    jobs = [j["metadata"]["name"] for j in kube.get("jobs")["items"]]
    still = kube("get", "pod", slow, "-o", "jsonpath={.metadata.deletionTimestamp}", check=False)
    assert still.returncode == 0 and still.stdout, "rank 0 should still be stopping"
    assert "llm-r1" not in jobs
    new = kube.wait_for("new group running", running_workers(kube, "llm", 4, 1), timeout=90)
    assert all(p["metadata"]["labels"]["job-name"] == "llm-r1" for p in new)
    env = {e["name"]: e.get("value") for e in new[0]["spec"]["containers"][0]["env"]}
    assert env["FORGE_RESTART_COUNT"] == "1"  # the trainer resumes from the newest complete checkpoint
    kube.wait_for("old group gone", lambda: not worker_pods(kube, "llm", 0), timeout=60)
    o = kube.wait_for("Running again", phase_is(kube, "llm", "Running"))
    assert o["status"]["restartCount"] == 1
    record = o["status"]["restarts"][0]
    assert record["reason"] == "PodFailed" and record["exitCode"] == 1 and record["step"] == 25
    assert "exit code 1" in record["message"]


def test_max_restarts_exceeded_fails(kube, operator):
    kube.apply(training("llm", resources={"numNodes": 2}, failurePolicy={"maxRestarts": 1, "backoffSeconds": 0}))
    for attempt in range(2):
        pods = kube.wait_for(f"attempt {attempt} running", running_workers(kube, "llm", 2, attempt), timeout=90)
        exit_pod(kube, pods[0]["metadata"]["name"], 137)
    o = kube.wait_for("Failed", phase_is(kube, "llm", "Failed"), timeout=60)
    failed = next(c for c in o["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "MaxRestartsExceeded"
    assert "maxRestarts=1" in failed["message"]
    assert o["status"]["restartCount"] == 1


@pytest.mark.parametrize("code", [65, 42])
def test_non_retryable_exit_code_fails_without_restart(kube, operator, code):
    kube.apply(training("llm", resources={"numNodes": 2}, failurePolicy={"nonRetryableExitCodes": [42]}))
    pods = kube.wait_for("running", running_workers(kube, "llm", 2, 0))
    exit_pod(kube, pods[1]["metadata"]["name"], code)
    o = kube.wait_for("Failed", phase_is(kube, "llm", "Failed"))
    failed = next(c for c in o["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "NonRetryableExitCode" and f"exit code {code}" in failed["message"]
    assert not o["status"].get("restartCount")
    assert kube.get("jobs")["items"][0]["metadata"]["name"] == "llm-r0"


def test_child_refused_by_the_api_server_is_reported_not_crashed_on(kube, operator):
    bad_env = {"resources": {"numNodes": 1, "env": [{"value": "no name"}]}}
    kube.apply(training("llm", **bad_env))
    o = kube.wait_for("Invalid", lambda: (x := ft(kube, "llm")) and any(
        c["type"] == "Invalid" and c["status"] == "True" for c in x.get("status", {}).get("conditions", [])) and x)
    invalid = next(c for c in o["status"]["conditions"] if c["type"] == "Invalid")
    assert "Job llm-r0" in invalid["message"] and "name" in invalid["message"]
    assert not kube.get("jobs")["items"]
    # fixed by the user: the training goes on
    kube("patch", "forgetraining", "llm", "--type=merge", "-p",
         '{"spec":{"resources":{"env":[{"name":"NCCL_DEBUG","value":"INFO"}]}}}')
    pods = kube.wait_for("running", running_workers(kube, "llm", 1, 0))
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["NCCL_DEBUG"] == "INFO"
    kube.wait_for("Invalid cleared", lambda: not any(
        c["type"] == "Invalid" for c in ft(kube, "llm")["status"].get("conditions", [])))
