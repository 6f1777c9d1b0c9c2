"""The Argo CD health checks, run as Argo CD runs them: Lua 5.1, `obj` global, no os/io.

Argo CD evaluates resource_customizations with gopher-lua (Lua 5.1) and, unless
`useOpenLibs` is set, without the os and io libraries; lupa's Lua 5.1 with those
removed is the same language and the same sandbox. Every status below is also
validated by the API models, so a case cannot use a field the operator never writes.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from lupa.lua51 import LuaRuntime

from forge_operator.api.eval import ForgeEvalStatus
from forge_operator.api.training import ForgeTrainingStatus
from forge_operator.training.observe import Observed
from forge_operator.training.planner import plan_training

ROOT = Path(__file__).resolve().parents[2]
HEALTH = ROOT / "argocd" / "health" / "forge.dev"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
T = "2026-11-22T12:00:00Z"


def run_health(kind: str, obj: dict) -> dict:
    lua = LuaRuntime(unpack_returned_tuples=True)
    g = lua.globals()
    for name in ("io", "os", "require", "dofile", "loadfile", "package", "debug"):
        g[name] = None

    def to_lua(value):
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items() if v is not None})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    g.obj = to_lua(obj)
    hs = lua.execute((HEALTH / kind / "health.lua").read_text())
    return {"status": hs["status"], "message": hs["message"]}


def cond(type_: str, status: str = "True", reason: str = "Reason", message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": T}


def training(status: dict | None, generation: int = 1) -> dict:
    o = {"apiVersion": "forge.dev/v1alpha1", "kind": "ForgeTraining",
         "metadata": {"name": "llm", "namespace": "team-a", "generation": generation},
         "spec": {"method": "pretrain"}}
    if status is not None:
        ForgeTrainingStatus.model_validate(status)  # the case uses only real status fields
        o["status"] = status
    return o


def ev(status: dict | None, gates: list | None = None, generation: int = 1) -> dict:
    o = {"apiVersion": "forge.dev/v1alpha1", "kind": "ForgeEval",
         "metadata": {"name": "llm-eval", "namespace": "team-a", "generation": generation},
         "spec": {"suites": [{"name": "heldout"}]}}
    if gates is not None:
        o["spec"]["gates"] = gates
    if status is not None:
        ForgeEvalStatus.model_validate(status)
        o["status"] = status
    return o


PROGRESS = {"step": 1200, "totalSteps": 3000, "tokensSeen": 9_830_400, "percent": 40.0, "loss": 2.31,
            "tokensPerSecond": 51234.5, "etaSeconds": 11520, "eta": "3h12m"}

TRAINING_CASES = {
    "new, no status yet": (training(None), "Progressing", "Waiting for the operator"),
    "status without a phase": (training({"observedGeneration": 1}), "Progressing", "Waiting for the operator"),
    "edited, operator has not seen it": (
        training({"phase": "Succeeded", "observedGeneration": 1}, generation=2),
        "Progressing", "Waiting for the operator to observe generation 2 (it has seen 1)"),
    "pending": (training({"phase": "Pending", "observedGeneration": 1}), "Progressing", "Pending"),
    "queued by Kueue": (
        training({"phase": "Queued", "observedGeneration": 1, "conditions": [
            cond("Queued", reason="WaitingForAdmission", message="waiting for Kueue to admit the workers from queue gpu")]}),
        "Progressing", "waiting for Kueue to admit the workers from queue gpu"),
    "initializing": (training({"phase": "Initializing", "observedGeneration": 1}), "Progressing", "Initializing"),
    "running with progress": (
        training({"phase": "Running", "observedGeneration": 1, "progress": PROGRESS}),
        "Progressing", "Running: 40.0% (step 1200 of 3000), ETA 3h12m"),
    "running, fractional percent, no budget in steps": (
        training({"phase": "Running", "observedGeneration": 1,
                  "progress": {"step": 7, "percent": 12.345, "tokensSeen": 100}}),
        "Progressing", "Running: 12.3% (step 7)"),
    "running, nothing reported yet": (
        training({"phase": "Running", "observedGeneration": 1, "progress": {"step": 0, "tokensSeen": 0}}),
        "Progressing", "Running"),
    "restarting": (
        training({"phase": "Restarting", "observedGeneration": 1, "restartCount": 1, "conditions": [
            cond("Restarting", reason="NodeLost", message="node gpu-3 is not Ready; resuming from step 1000")]}),
        "Progressing", "node gpu-3 is not Ready; resuming from step 1000"),
    "succeeded": (
        training({"phase": "Succeeded", "observedGeneration": 1, "progress": {**PROGRESS, "percent": 100.0},
                  "conditions": [cond("Succeeded", reason="TrainingCompleted", message="trained 3000 steps")]}),
        "Healthy", "trained 3000 steps"),
    "succeeded, a stale Stalled condition does not matter": (
        training({"phase": "Succeeded", "observedGeneration": 1, "conditions": [cond("Stalled", message="x")]}),
        "Healthy", "Training succeeded"),
    "failed": (
        training({"phase": "Failed", "observedGeneration": 1, "conditions": [
            cond("Running", "False"),
            cond("Failed", reason="MaxRestartsExceeded", message="3 restarts, the limit is 2: exit code 1")]}),
        "Degraded", "3 restarts, the limit is 2: exit code 1"),
    "failed without a condition": (training({"phase": "Failed", "observedGeneration": 1}), "Degraded", "Training failed"),
    "suspended": (
        training({"phase": "Suspended", "observedGeneration": 1, "conditions": [
            cond("Suspended", reason="SuspendedByUser", message="suspended at step 1200")]}),
        "Suspended", "suspended at step 1200"),
    "invalid edit keeps workers running": (
        training({"phase": "Running", "observedGeneration": 2, "progress": PROGRESS, "conditions": [
            cond("Running"), cond("Invalid", reason="InvalidSpec", message="spec.training.sequenceLength: too long")]},
            generation=2),
        "Degraded", "spec.training.sequenceLength: too long"),
    "Invalid False is fine": (
        training({"phase": "Running", "observedGeneration": 1, "progress": PROGRESS,
                  "conditions": [cond("Invalid", "False")]}),
        "Progressing", "Running: 40.0% (step 1200 of 3000), ETA 3h12m"),
    "stalled": (
        training({"phase": "Running", "observedGeneration": 1, "progress": PROGRESS, "conditions": [
            cond("Stalled", reason="NoProgress", message="no new step for 900s (stallTimeoutSeconds 600)")]}),
        "Degraded", "no new step for 900s (stallTimeoutSeconds 600)"),
    "stall cleared": (
        training({"phase": "Running", "observedGeneration": 1, "progress": PROGRESS,
                  "conditions": [cond("Stalled", "False", reason="Progressing")]}),
        "Progressing", "Running: 40.0% (step 1200 of 3000), ETA 3h12m"),
    "image pull failure": (
        training({"phase": "Initializing", "observedGeneration": 1, "conditions": [
            cond("PodsReady", "False", reason="ImagePullFailed",
                 message='worker llm-r0-1-x (rank 1) cannot pull its image: ImagePullBackOff t:1: Back-off')]}),
        "Degraded", 'worker llm-r0-1-x (rank 1) cannot pull its image: ImagePullBackOff t:1: Back-off'),
    "unschedulable": (
        training({"phase": "Pending", "observedGeneration": 1, "conditions": [
            cond("PodsReady", "False", reason="Unschedulable",
                 message="4 of 4 worker pods cannot be scheduled; the scheduler says ...")]}),
        "Progressing", "4 of 4 worker pods cannot be scheduled; the scheduler says ..."),
    "missing claim": (
        training({"phase": "Pending", "observedGeneration": 1, "conditions": [
            cond("PodsReady", "False", reason="PVCNotFound", message="PersistentVolumeClaim ckpt does not exist")]}),
        "Progressing", "PersistentVolumeClaim ckpt does not exist"),
    "unbound claim": (
        training({"phase": "Pending", "observedGeneration": 1, "conditions": [
            cond("PodsReady", "False", reason="PVCNotBound", message="PersistentVolumeClaim ckpt is not bound")]}),
        "Progressing", "PersistentVolumeClaim ckpt is not bound"),
    "no LocalQueue": (
        training({"phase": "Queued", "observedGeneration": 1, "conditions": [
            cond("Queued", reason="LocalQueueNotFound", message="LocalQueue team-a does not exist"),
            cond("PodsReady", "False", reason="LocalQueueNotFound", message="LocalQueue team-a does not exist")]}),
        "Progressing", "LocalQueue team-a does not exist"),
    "no Kueue": (
        training({"phase": "Queued", "observedGeneration": 1, "conditions": [
            cond("Queued", reason="KueueNotInstalled", message="Kueue is not installed"),
            cond("PodsReady", "False", reason="KueueNotInstalled", message="Kueue is not installed")]}),
        "Degraded", "Kueue is not installed"),
    "pods starting is plain progress": (
        training({"phase": "Initializing", "observedGeneration": 1, "conditions": [
            cond("PodsReady", "False", reason="PodsStarting", message="1/4 ranks running")]}),
        "Progressing", "Initializing"),
    # not a phase of this API version (so not validated): a newer operator's phase must not read as broken
    "a phase a newer operator adds": ({**training(None), "status": {"phase": "Exporting"}},
                                      "Progressing", "Exporting"),
}

GATE = [{"metric": "heldout.perplexity", "comparator": "<", "threshold": 30}]
EVAL_CASES = {
    "new": (ev(None), "Progressing", "Waiting for the operator"),
    "running": (ev({"phase": "Running", "observedGeneration": 1}), "Progressing", "Evaluation Running"),
    "edited, not seen yet": (ev({"phase": "Succeeded", "observedGeneration": 1}, generation=3), "Progressing",
                             "Waiting for the operator to observe generation 3 (it has seen 1)"),
    "gate passed": (
        ev({"phase": "Succeeded", "observedGeneration": 1, "mainMetric": "heldout.perplexity=21.4",
            "conditions": [cond("GatesPassed", message="1 of 1 gates passed")]}, gates=GATE),
        "Healthy", "1 of 1 gates passed (heldout.perplexity=21.4)"),
    "gate failed": (
        ev({"phase": "Succeeded", "observedGeneration": 1, "conditions": [
            cond("GatesPassed", "False", reason="GateFailed", message="heldout.perplexity 41.2, needs < 30")]},
           gates=GATE),
        "Degraded", "heldout.perplexity 41.2, needs < 30"),
    "failed": (
        ev({"phase": "Failed", "observedGeneration": 1, "conditions": [
            cond("Failed", reason="ModelNotFound", message="no model at pvc models/llm")]}),
        "Degraded", "no model at pvc models/llm"),
    "succeeded, gate not written yet": (ev({"phase": "Succeeded", "observedGeneration": 1}, gates=GATE),
                                        "Progressing", "Evaluation finished; waiting for the gate result"),
    "succeeded, no gates asked for": (ev({"phase": "Succeeded", "observedGeneration": 1}), "Healthy",
                                      "Evaluation succeeded (no gates)"),
}


@pytest.mark.parametrize("obj, status, message", TRAINING_CASES.values(), ids=TRAINING_CASES.keys())
def test_forgetraining_health(obj, status, message):
    assert run_health("ForgeTraining", obj) == {"status": status, "message": message}


@pytest.mark.parametrize("obj, status, message", EVAL_CASES.values(), ids=EVAL_CASES.keys())
def test_forgeeval_health(obj, status, message):
    assert run_health("ForgeEval", obj) == {"status": status, "message": message}


def test_the_operators_own_first_status_reads_as_progressing():
    """Not a hand-made status: what the planner writes for a new training in a Kueue queue."""
    o = yaml.safe_load((ROOT / "examples" / "pretrain-dense.yaml").read_text())
    o["metadata"].update(namespace="team-a", uid="u-1", generation=1, resourceVersion="1")
    o["spec"]["scheduling"] = {"queueName": "gpu"}
    plan = plan_training(o, Observed(now=datetime(2026, 11, 22, tzinfo=timezone.utc), jobs=[], pods=[], nodes={}))
    o["status"] = plan.status
    hs = run_health("ForgeTraining", o)
    assert hs["status"] == "Progressing" and "queue gpu" in hs["message"], hs


def test_a_missing_generation_does_not_break_the_script():
    o = training({"phase": "Running", "observedGeneration": 1})
    del o["metadata"]["generation"]
    assert run_health("ForgeTraining", o)["status"] == "Progressing"


def test_every_status_is_one_argo_cd_knows():
    seen = {s for _, s, _ in [*TRAINING_CASES.values(), *EVAL_CASES.values()]}
    assert seen <= ARGO_STATUSES
    assert {"Healthy", "Progressing", "Degraded", "Suspended"} <= seen


def test_the_argocd_cm_patch_embeds_the_same_scripts():
    check = subprocess.run([sys.executable, str(ROOT / "argocd" / "generate_cm_patch.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    cm = yaml.safe_load((ROOT / "argocd" / "argocd-cm-patch.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"] == {
        f"resource.customizations.health.forge.dev_{kind}": (HEALTH / kind / "health.lua").read_text()
        for kind in ("ForgeTraining", "ForgeEval")}


def test_the_scripts_use_no_library_argo_cd_leaves_out():
    """Branches no case reaches must not call os/io/require either (they would fail only in Argo CD)."""
    for kind in ("ForgeTraining", "ForgeEval"):
        code = "\n".join(line.split("--", 1)[0] for line in (HEALTH / kind / "health.lua").read_text().splitlines())
        for word in ("os.", "io.", "require", "dofile", "loadfile"):
            assert word not in code, f"{kind}/health.lua uses {word!r}"
