"""The parts of training/ the planner calls, table-driven: failure detection and backoff, the
child builders, the translation to the trainer's configuration, status helpers; no cluster."""

from __future__ import annotations

import pytest

from forge_operator.api import defaults
from forge_operator.api.training import ForgeTraining, ProgressStatus
from forge_operator.training.children import WorkerState, desired_children
from forge_operator.training.failure import backoff_seconds, pod_failure
from forge_operator.training.status import human_duration
from forge_operator.training.translate import trainer_config
from forge_trainer.contract import DataError, Progress, TerminationMessage
from operator_support import obj, pod

@pytest.mark.parametrize("pod_status, reason, code", [
    ({"phase": "Failed", "reason": "Evicted", "message": "low memory"}, "Evicted", None),
    ({"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]},
     "OOMKilled", 137),
    ({"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 75}}}]}, "Preempted", 75),
    ({"phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "True",
                                         "reason": "PreemptionByScheduler"}]}, "Preempted", None),
    ({"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 1, "message": "boom\nCUDA error"}}}]},
     "PodFailed", 1),
    ({"phase": "Running"}, None, None),
    # under torchrun the container's code is torchrun's; the trainer's termination message has its own
    ({"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
        "exitCode": 1, "message": TerminationMessage.failed(DataError("no files")).to_json()}}}]},
     "PodFailed", 65),
    # an older trainer's preempted line has no exitCode; a partial one no status
    ({"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
        "exitCode": 1, "message": '{"status": "preempted", "reason": "sigterm", "step": 7}'}}}]}, "Preempted", 75),
    ({"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
        "exitCode": 1, "message": '{"exitCode": 65, "message": "data error: no files"}'}}}]}, "PodFailed", 65),
    # JSON that is no termination message is text like any other: its last line is the detail
    ({"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
        "exitCode": 1, "message": 'boom\n{"status": "failed", "exitCode": "CUDA error"}'}}}]}, "PodFailed", 1),
])
def test_pod_failure_reasons(pod_status, reason, code):
    p = pod("w", 0)
    p["status"] = pod_status
    f = pod_failure(p)
    assert (f.reason if f else None) == reason
    if f:
        assert f.exit_code == code
    if reason == "PodFailed":
        assert ("CUDA error" if code == 1 else "data error: no files") in f.message


def test_backoff_doubles_and_is_capped():
    ft = ForgeTraining.model_validate(obj(failurePolicy={"backoffSeconds": 10, "maxBackoffSeconds": 60}))
    assert [backoff_seconds(ft, n) for n in range(6)] == [0, 10, 20, 40, 60, 60]


def test_the_status_reads_the_trainers_progress_under_the_same_field_names():
    """status.progress is filled from the contract's Progress by field name (training/status.py): only the
    fields the operator adds itself, or reads from the final summary, are not Progress's."""
    assert set(ProgressStatus.model_fields) - set(Progress.model_fields) == {"validation_loss", "eta",
                                                                              "last_step_time"}


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59, "59s"), (61, "1m01s"), (3600, "1h00m"),
                                           (90061, "1d1h")])
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


def test_translation_maps_the_spec_onto_the_trainer_config():
    o = obj(model={"architecture": {"family": "moe", "numLayers": 2, "hiddenSize": 64, "numAttentionHeads": 4,
                                    "contextLength": 256, "experts": {"numExperts": 8, "numExpertsPerToken": 2}}})
    cfg = trainer_config(ForgeTraining.model_validate(o))
    a = cfg.model.architecture
    assert (a.family, a.num_experts, a.num_experts_per_token) == ("moe", 8, 2)
    assert a.intermediate_size == defaults.intermediate_size(64) == 192 and a.moe_intermediate_size == 96
    assert cfg.data.sources[0].path == "/mnt/pvc/corpus" and cfg.checkpoint.dir == "/mnt/pvc/ckpt/llm"
    assert cfg.output.dir == "/mnt/pvc/models/llm" and cfg.cache_dir == "/mnt/pvc/ckpt/llm/.forge-cache"
    assert cfg.training.global_batch_sequences == 64 and cfg.training.min_lr == pytest.approx(3e-5)


def test_workers_share_the_trainer_images_group_on_volumes():
    ft = ForgeTraining.model_validate(obj())
    job_ = next(c for c in desired_children(ft, "x: 1", WorkerState()) if c["kind"] == "Job")
    assert job_["spec"]["template"]["spec"]["securityContext"] == {"fsGroup": 10001,
                                                                   "fsGroupChangePolicy": "OnRootMismatch"}


@pytest.mark.parametrize("grace, timeout", [(600, "570"), (30, "30"), (45, "30"), (3600, "3570")])
def test_workers_checkpoint_in_a_prestop_hook_before_torchrun_gets_sigterm(grace, timeout):
    o = obj(resources={"terminationGracePeriodSeconds": grace})
    ft = ForgeTraining.model_validate(o)
    job_ = next(c for c in desired_children(ft, "x: 1", WorkerState()) if c["kind"] == "Job")
    pod_spec = job_["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["lifecycle"] == {"preStop": {"exec": {"command": ["python", "-m", "forge_trainer.prestop"]}}}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == timeout  # torch >= 2.12: torchrun waits that long too
    assert pod_spec["terminationGracePeriodSeconds"] == grace


def test_the_spec_hash_follows_the_spec_and_not_the_operators_rendering(monkeypatch):
    from forge_operator.training import children

    ft = ForgeTraining.model_validate(obj())
    before = children.spec_hash(ft)
    # an operator release that renders the workers differently restarts no running training
    monkeypatch.setattr(children, "PRESTOP_COMMAND", ["sleep", "1"])
    monkeypatch.setattr(children, "torchrun_shutdown_timeout", lambda grace: 1)
    monkeypatch.setattr(children, "build_pod_template", lambda *a, **k: {"spec": {"new": "field"}})
    assert children.spec_hash(ft) == before
    # a default written out is the same spec
    spelled_out = obj(resources={"terminationGracePeriodSeconds": ft.spec.resources.termination_grace_period_seconds})
    assert children.spec_hash(ForgeTraining.model_validate(spelled_out)) == before
    # what the workers depend on counts; what the operator acts on itself does not
    counts = [{"resources": {"terminationGracePeriodSeconds": 900}},
              {"resources": {"env": [{"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "100"}]}},
              {"training": {**obj()["spec"]["training"], "learningRate": 1e-4}},
              {"training": {**obj()["spec"]["training"], "budget": {"maxSteps": 77}}}]
    for edit in counts:
        assert children.spec_hash(ForgeTraining.model_validate(obj(**edit))) != before, edit
    ignored = [{"scheduling": {"suspend": True}}, {"scheduling": {"queueName": "team-a"}},
               {"failurePolicy": {"maxRestarts": 9}}, {"ttlSecondsAfterFinished": 60},
               {"training": {**obj()["spec"]["training"],
                             "budget": {**obj()["spec"]["training"]["budget"], "maxGpuHours": 5}}}]
    for edit in ignored:
        assert children.spec_hash(ForgeTraining.model_validate(obj(**edit))) == before, edit
    # the spec's own shutdown timeout wins over the one derived from the grace period
    own = ForgeTraining.model_validate(obj(resources={"env": [{"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
                                                               "value": "100"}]}))
    monkeypatch.undo()
    env = children.build_pod_template(own, WorkerState(), "img")["spec"]["containers"][0]["env"]
    assert [e["value"] for e in env if e["name"] == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == ["100"]


def test_the_workers_identity_and_the_users_own_service_account():
    ft = ForgeTraining.model_validate(obj())
    kinds = {c["kind"]: c for c in desired_children(ft, "x: 1", WorkerState())}
    assert {kinds[k]["metadata"]["name"] for k in ("ServiceAccount", "Role", "RoleBinding")} == {"forge-trainer-llm"}
    assert kinds["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": "forge-trainer-llm", "namespace": "ns"}]
    assert kinds["Job"]["spec"]["template"]["spec"]["serviceAccountName"] == "forge-trainer-llm"
    # the user's own account is used as it is: the operator grants it nothing
    ft = ForgeTraining.model_validate(obj(resources={"serviceAccountName": "team-a-runner"}))
    kinds = {c["kind"]: c for c in desired_children(ft, "x: 1", WorkerState())}
    assert not {"ServiceAccount", "Role", "RoleBinding"} & set(kinds)
    assert kinds["Job"]["spec"]["template"]["spec"]["serviceAccountName"] == "team-a-runner"
