"""Helpers of the operator tests: training manifests, observed Jobs and Pods for the planner, claims, and the
operator as a real process."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BASE_TRAINING = {
    "apiVersion": "forge.dev/v1alpha1", "kind": "ForgeTraining",
    "metadata": {"name": "llm"},
    "spec": {
        "method": "pretrain",
        "model": {"architecture": {"numLayers": 2, "hiddenSize": 64, "numAttentionHeads": 4, "contextLength": 256}},
        "tokenizer": {"train": {"vocabSize": 512}},
        "data": {"sources": [{"name": "corpus", "location": {"pvc": {"claimName": "corpus"}}}]},
        "training": {"sequenceLength": 128, "globalBatch": {"sequences": 64}, "microBatchSize": 2,
                     "budget": {"maxSteps": 100}},
        "resources": {"numNodes": 4, "gpusPerNode": 8},
        "checkpoint": {"location": {"pvc": {"claimName": "ckpt", "path": "llm"}}},
        "failurePolicy": {"maxRestarts": 2, "backoffSeconds": 1, "nodeFailureTimeoutSeconds": 5},
        "output": {"location": {"pvc": {"claimName": "models", "path": "llm"}}},
    },
}

BASE_EVAL = {
    "apiVersion": "forge.dev/v1alpha1", "kind": "ForgeEval",
    "metadata": {"name": "llm"},
    "spec": {"model": {"trainingRef": "llm"},
             "suites": [{"name": "heldout", "type": "perplexity", "format": "text",
                         "data": {"pvc": {"claimName": "corpus"}}}]},
}


def training(name: str = "llm", **spec_overrides) -> dict:
    """A valid ForgeTraining; keyword arguments replace top-level spec sections (merged one level deep)."""
    obj = copy.deepcopy(BASE_TRAINING)
    obj["metadata"]["name"] = name
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(obj["spec"].get(key), dict):
            obj["spec"][key] = {**obj["spec"][key], **value}
        else:
            obj["spec"][key] = value
    return obj


def forge_eval(name: str = "llm") -> dict:
    """A valid ForgeEval (of the training of the same name)."""
    obj = copy.deepcopy(BASE_EVAL)
    obj["metadata"]["name"] = name
    return obj


# --------------------------------------------------------------------------- what the planner observes
NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=timezone.utc)
READY = {"status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}


def obj(**overrides) -> dict:
    """A ForgeTraining as the API server stores it."""
    o = training("llm", **overrides)
    o["metadata"].update(namespace="ns", uid="uid-1", generation=1, resourceVersion="1")
    return o


def job(name: str, **status) -> dict:
    """The Job of attempt N is named llm-rN; its pods point at it by uid."""
    return {"metadata": {"name": name, "uid": f"uid-{name}", "annotations": {},
                         "labels": {"forge.dev/attempt": name.rsplit("-r", 1)[1]}},
            "spec": {"suspend": False}, "status": status}


def pod(name: str, index: int, attempt: int = 0, phase: str = "Running", node: str = "n0", **extra) -> dict:
    p = {"metadata": {"name": name, "labels": {"forge.dev/attempt": str(attempt)},
                      "ownerReferences": [{"kind": "Job", "name": f"llm-r{attempt}", "uid": f"uid-llm-r{attempt}"}],
                      "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
         "spec": {"nodeName": node}, "status": {"phase": phase}}
    for key, value in extra.items():
        p[key].update(value) if isinstance(value, dict) else p.__setitem__(key, value)
    return p


def running_plan(o: dict, n: int = 4, now: datetime = NOW, built_from: dict | None = None, **kw):
    """Plan ``o`` with all n workers running, in a Job built from ``built_from`` (default: ``o`` itself,
    so no edit is detected)."""
    from forge_operator.api.training import ForgeTraining
    from forge_operator.training.children import WorkerState, desired_children
    from forge_operator.training.observe import Observed
    from forge_operator.training.planner import plan_training
    from forge_operator.training.translate import trainer_config

    spec_job = job("llm-r0")
    ft = ForgeTraining.model_validate(built_from or o)
    child_job = next(c for c in desired_children(ft, trainer_config(ft).to_yaml(), WorkerState()) if c["kind"] == "Job")
    spec_job["metadata"]["annotations"] = child_job["metadata"]["annotations"]
    pods = [pod(f"p{i}", i, node=f"n{i}") for i in range(n)]
    return plan_training(o, Observed(now=now, jobs=[spec_job], pods=pods,
                                     nodes={f"n{i}": READY for i in range(n)}), **kw)


class OperatorProcess:
    """`forge operator` as a real process, killable and restartable like a crashed pod."""

    def __init__(self, kubeconfig: str, namespaces: list[str], log: Path, resync: float = 1.0,
                 env: dict[str, str] | None = None):
        self.kubeconfig, self.namespaces, self.log_path, self.resync = kubeconfig, namespaces, log, resync
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "OperatorProcess":
        env = os.environ | {"KUBECONFIG": self.kubeconfig, "FORGE_RESYNC_SECONDS": str(self.resync),
                            "FORGE_HEALTH_ENDPOINT": "", "FORGE_TRAINER_IMAGE": "forge-trainer:test",
                            "PYTHONUNBUFFERED": "1"} | self.extra_env
        args = [sys.executable, "-m", "forge_operator", "operator"]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def create_pvcs(kube, *claims: str) -> None:
    """Bound ReadWriteMany claims (a pre-bound PV each), as a shared filesystem would provide."""
    items = []
    for claim in claims:
        pv = f"{kube.namespace}-{claim}"
        items.append({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                      "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteMany"],
                               "storageClassName": "", "hostPath": {"path": f"/tmp/forge-test-pv/{pv}"},
                               "claimRef": {"namespace": kube.namespace, "name": claim}}})
        items.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
                      "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                               "resources": {"requests": {"storage": "100Gi"}}}})
    kube.apply({"apiVersion": "v1", "kind": "List", "items": items})
    kube.wait_for("claims bound", lambda: all(
        c["status"].get("phase") == "Bound" for c in kube.get("pvc")["items"]) and len(kube.get("pvc")["items"]) >= len(claims))
