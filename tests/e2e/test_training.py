"""The quickstart ForgeTraining as 2 worker pods on the real node, with the operator: real torchrun
rendezvous between pods, real checkpoints on a hostPath volume, real signals and exit codes."""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TIMINGS

sys.path.insert(0, str(ROOT / "tests" / "operator"))
from operator_support import OperatorProcess  # noqa: E402

STDLIB = Path(os.__file__).parent


def quickstart(name: str, steps: int, checkpoint_every: int) -> dict:
    """examples/quickstart.yaml on 2 nodes, smaller and shorter (2 busy CPU cores run both workers)."""
    ft = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    ft = copy.deepcopy(ft)
    ft["metadata"] = {"name": name}
    spec = ft["spec"]
    spec["model"]["architecture"].update(numLayers=2, hiddenSize=64, intermediateSize=128, numAttentionHeads=2,
                                         numKeyValueHeads=2, contextLength=64)
    spec["tokenizer"]["train"]["vocabSize"] = 512
    spec["data"]["sources"][0]["include"] = ["a*.py", "b*.py", "c*.py"]
    spec["training"].update(sequenceLength=64, globalBatch={"sequences": 4}, microBatchSize=2, warmupSteps=2,
                            evalIntervalSteps=steps, budget={"maxSteps": steps})
    spec["resources"]["numNodes"] = 2
    spec["checkpoint"]["intervalSteps"] = checkpoint_every
    for where in ("checkpoint", "output"):
        spec[where]["location"]["pvc"]["path"] = f"{name}/{where}"
    return ft


@pytest.fixture
def runs(kube, tmp_path):
    """The claims the quickstart names: "stdlib" (this Python's standard library, read-only) and
    "runs" (a folder on the node, writable by the trainer's uid)."""
    out = tmp_path / "runs"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    items = []
    for claim, path in (("stdlib", STDLIB), ("runs", out)):
        pv = f"{kube.namespace}-{claim}"
        items.append({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                      "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                               "storageClassName": "", "hostPath": {"path": str(path), "type": "Directory"},
                               "claimRef": {"namespace": kube.namespace, "name": claim}}})
        items.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
                      "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                               "resources": {"requests": {"storage": "1Gi"}}}})
    kube.apply({"apiVersion": "v1", "kind": "List", "items": items})
    kube.wait_for("claims bound", lambda: sum(c["status"].get("phase") == "Bound"
                                              for c in kube.get("pvc")["items"]) == 2)
    return out


@pytest.fixture
def forge_operator(crds, kube, image, tmp_path):
    op = OperatorProcess(kube.kubeconfig, [kube.namespace], tmp_path / "operator.log",
                         env={"FORGE_TRAINER_IMAGE": image.name}).start()
    try:
        yield op
    finally:
        op.stop()
        sys.stdout.write(f"\n--- operator log ---\n{op.log()[-4000:]}\n")
        for pod in kube.get("pods")["items"]:
            logs = kube("logs", pod["metadata"]["name"], "--tail", "30", check=False)
            sys.stdout.write(f"\n--- {pod['metadata']['name']} ---\n{logs.stdout}{logs.stderr}\n")


def phase(kube, name: str) -> str | None:
    return kube.get("forgetraining", name).get("status", {}).get("phase")


def worker_pods(kube, name: str) -> list[dict]:
    return [p for p in kube.get("pods")["items"] if p["metadata"].get("labels", {}).get("forge.dev/training") == name
            or name in p["metadata"]["name"]]


def running_workers(kube, name: str) -> list[dict]:
    return [p for p in worker_pods(kube, name) if p.get("status", {}).get("phase") == "Running"]


def test_quickstart_on_two_workers_to_succeeded_with_the_model_exported(kube, runs, forge_operator):
    t0 = time.monotonic()
    kube.apply(quickstart("qs", steps=30, checkpoint_every=10))
    kube.wait_for("2 running workers", lambda: len(running_workers(kube, "qs")) == 2, timeout=240, interval=1)
    TIMINGS["quickstart: 2 workers running"] = time.monotonic() - t0
    kube.wait_for("Succeeded", lambda: phase(kube, "qs") in ("Succeeded", "Failed"), timeout=900, interval=2)
    TIMINGS["quickstart: to Succeeded"] = time.monotonic() - t0
    status = kube.get("forgetraining", "qs")["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    model = runs / "qs" / "output"
    assert (model / "config.json").exists() and list(model.glob("*.safetensors")), sorted(runs.rglob("*"))
    assert status["progress"]["step"] == 30
    # provenance names the image by the digest containerd ran and the node the workers ran on
    prov = json.loads((model / "provenance.json").read_text())
    image_ids = {p["status"]["containerStatuses"][0]["imageID"] for p in worker_pods(kube, "qs")}
    assert prov["image"]["digest"] and all(prov["image"]["digest"] in i for i in image_ids), (prov["image"], image_ids)
    assert {n["node"] for n in prov["nodes"]} == {"real-node-0"}, prov["nodes"]

    # the exported model evaluated by a ForgeEval pod: its results come back in the real container's
    # termination message, and in full as JSON next to the model
    t0 = time.monotonic()
    kube.apply(heldout_eval("qs-eval", training="qs"))
    kube.wait_for("the evaluation to end", lambda: eval_phase(kube, "qs-eval") in ("Succeeded", "Failed"),
                  timeout=600, interval=2)
    TIMINGS["ForgeEval of the exported model: to Succeeded"] = time.monotonic() - t0
    ev = kube.get("forgeeval", "qs-eval")["status"]
    assert ev["phase"] == "Succeeded", json.dumps(ev, indent=1)
    [result] = ev["results"]
    assert result["suite"] == "heldout" and result["samples"] > 0
    assert 1.0 < result["metrics"]["perplexity"] < 512, result  # better than chance over a 512-token vocabulary
    [gate] = ev["gates"]
    assert gate["passed"] and gate["value"] == result["metrics"]["perplexity"], gate
    passed = next(c for c in ev["conditions"] if c["type"] == "GatesPassed")
    assert passed["status"] == "True", passed
    pod = next(p for p in kube.get("pods")["items"] if p["metadata"].get("labels", {}).get("forge.dev/eval") == "qs-eval")
    message = pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
    assert "perplexity" in message, message
    written = json.loads((model / "evaluations" / "qs-eval" / "results.json").read_text())
    assert json.dumps(written).count("perplexity") >= 1, written


def heldout_eval(name: str, training: str) -> dict:
    """A perplexity suite over standard-library files the training did not read (it read a*, b*, c*),
    gated loosely: the exported model of ``training`` on the node's CPU."""
    return {"apiVersion": "forge.dev/v1alpha1", "kind": "ForgeEval", "metadata": {"name": name},
            "spec": {"model": {"trainingRef": training},
                     "suites": [{"name": "heldout", "type": "perplexity", "format": "text",
                                 "data": {"pvc": {"claimName": "stdlib"}}, "include": ["d*.py", "e*.py"],
                                 "maxSamples": 16, "seqLen": 64}],
                     "gates": [{"metric": "heldout.perplexity", "comparator": "<", "threshold": 512}],
                     "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"}}}


def eval_phase(kube, name: str) -> str | None:
    return kube.get("forgeeval", name).get("status", {}).get("phase")



def _log(kube, pod: str) -> str:
    return kube("logs", pod, check=False).stdout


def _container_pid(node, pod: str) -> int:
    """The host PID of a pod's worker container's first process (torchrun under forge_trainer.launch)."""
    listed = json.loads(node.crictl("ps", "--label", f"io.kubernetes.pod.name={pod}", "-o", "json").stdout)
    [container] = listed["containers"]
    return json.loads(node.crictl("inspect", container["id"]).stdout)["info"]["pid"]


def _attempt_pods(kube, name: str, attempt: int) -> list[dict]:
    return [p for p in worker_pods(kube, name)
            if p["metadata"].get("labels", {}).get("forge.dev/attempt") == str(attempt)]


def _index(pod: dict) -> str | None:
    return pod["metadata"].get("annotations", {}).get("batch.kubernetes.io/job-completion-index")


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(kube, runs, forge_operator, node):
    kube.apply(quickstart("kill", steps=40, checkpoint_every=10))
    kube.wait_for("2 running workers", lambda: len(running_workers(kube, "kill")) == 2, timeout=240, interval=1)
    ckpts = runs / "kill" / "checkpoint"
    kube.wait_for("a checkpoint", lambda: list(ckpts.glob("step-*")), timeout=600, interval=1)
    [victim] = [p for p in running_workers(kube, "kill") if _index(p) == "1"]
    t = time.monotonic()
    os.kill(_container_pid(node, victim["metadata"]["name"]), 9)
    kube.wait_for("a restart", lambda: (kube.get("forgetraining", "kill").get("status", {}).get("restartCount") or 0) >= 1,
                  timeout=120, interval=1)
    status = kube.get("forgetraining", "kill")["status"]
    restart = status["restarts"][-1]
    assert restart["exitCode"] == 137, restart
    kube.wait_for("the new attempt's workers", lambda: len([p for p in _attempt_pods(kube, "kill", 1)
                                                            if p["status"].get("phase") == "Running"]) == 2,
                  timeout=240, interval=1)
    TIMINGS["restart after kill: new workers running"] = time.monotonic() - t
    kube.wait_for("Succeeded", lambda: phase(kube, "kill") in ("Succeeded", "Failed"), timeout=900, interval=2)
    assert phase(kube, "kill") == "Succeeded"
    rank0 = [p["metadata"]["name"] for p in _attempt_pods(kube, "kill", 1) if _index(p) == "0"]
    assert rank0 and "resumed from" in _log(kube, rank0[0]), [_log(kube, p) for p in rank0]


def test_a_deleted_worker_checkpoints_in_its_grace_period_and_exits_75(kube, runs, forge_operator):
    kube.apply(quickstart("evict", steps=400, checkpoint_every=1000))
    kube.wait_for("2 running workers", lambda: len(running_workers(kube, "evict")) == 2, timeout=240, interval=1)
    # wait until the workers train (past tokenizer, data preparation and the first step)
    kube.wait_for("training steps", lambda: (kube.get("forgetraining", "evict").get("status", {})
                                             .get("progress", {}).get("step") or 0) >= 5, timeout=600, interval=2)
    victim = running_workers(kube, "evict")[0]["metadata"]["name"]
    t = time.monotonic()
    kube("delete", "pod", victim, "--wait=false")
    exit_codes: list[int] = []

    def terminated():
        pod = kube("get", "pod", victim, "-o", "json", check=False)
        if pod.returncode != 0:
            return "gone"
        for cs in json.loads(pod.stdout).get("status", {}).get("containerStatuses", []):
            if "terminated" in cs.get("state", {}):
                exit_codes.append(cs["state"]["terminated"]["exitCode"])
                return cs["state"]["terminated"]
        return None
    state = kube.wait_for("the deleted worker's exit", terminated, timeout=180, interval=0.3)
    TIMINGS["delete to exit with checkpoint"] = time.monotonic() - t
    restarts = kube.wait_for("the restart record", lambda: kube.get("forgetraining", "evict").get("status", {})
                             .get("restarts"), timeout=120, interval=1)
    assert state == "gone" or state["exitCode"] == 75, state
    assert restarts[-1].get("exitCode") == 75 or exit_codes == [75], restarts
    ckpts = runs / "evict" / "checkpoint"
    assert list(ckpts.glob("step-*")), "no checkpoint saved in the grace period"


def test_the_second_worker_starts_90_s_late_and_the_group_still_trains(kube, runs, forge_operator, image):
    """Worker 1 cannot be scheduled for 90 s (another pod holds the node's second CPU), as when the
    second node of a real cluster comes up late; rank 0 waits for it at the rendezvous."""
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cpu-holder"},
                "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                         "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                         "containers": [{"name": "hold", "image": image.name, "imagePullPolicy": "Never",
                                         "command": ["python", "-c", "import time; time.sleep(3600)"],
                                         "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}}]}})
    kube.wait_for("the holder running", lambda: kube.get("pod", "cpu-holder")["status"].get("phase") == "Running",
                  timeout=120, interval=1)
    ft = quickstart("late", steps=10, checkpoint_every=10)
    ft["spec"]["resources"]["cpu"] = "1"
    ft["spec"].setdefault("failurePolicy", {})["rendezvousTimeoutSeconds"] = 300
    kube.apply(ft)
    kube.wait_for("worker 0 running", lambda: len(running_workers(kube, "late")) == 1, timeout=240, interval=1)
    pending = [p for p in worker_pods(kube, "late") if p["status"].get("phase") == "Pending"]
    assert len(pending) == 1, [p["status"] for p in worker_pods(kube, "late")]
    time.sleep(90)
    assert len(running_workers(kube, "late")) == 1  # still only rank 0, waiting at the rendezvous
    kube("delete", "pod", "cpu-holder", "--wait=false")
    t = time.monotonic()
    kube.wait_for("Succeeded", lambda: phase(kube, "late") in ("Succeeded", "Failed"), timeout=900, interval=2)
    TIMINGS["late worker: release to Succeeded"] = time.monotonic() - t
    status = kube.get("forgetraining", "late")["status"]
    assert status["phase"] == "Succeeded" and not status.get("restarts"), json.dumps(status, indent=1)


def test_a_worker_over_its_memory_limit_fails_the_training_as_oom_killed(kube, runs, forge_operator):
    """A memory limit the trainer exceeds (importing torch alone needs more): the kernel's OOM killer
    ends a process in the container, containerd reports OOMKilled, and the training's failure says so."""
    ft = quickstart("oom", steps=10, checkpoint_every=10)
    ft["spec"]["resources"].update(numNodes=1, memory="200Mi")
    ft["spec"]["failurePolicy"] = {"maxRestarts": 0}
    t = time.monotonic()
    kube.apply(ft)
    kube.wait_for("Failed", lambda: phase(kube, "oom") in ("Succeeded", "Failed"), timeout=300, interval=1)
    TIMINGS["OOM: apply to Failed"] = time.monotonic() - t
    status = kube.get("forgetraining", "oom")["status"]
    [failed] = [c for c in status["conditions"] if c["type"] == "Failed"]
    # no restart is left (maxRestarts 0): the condition's reason says so, its message names the OOM kill
    assert status["phase"] == "Failed" and failed["status"] == "True", json.dumps(status, indent=1)
    assert failed["reason"] == "MaxRestartsExceeded" and "was OOM-killed (exit code 137)" in failed["message"], failed
