"""The parts of training/ the planner calls, table-driven: failure detection and backoff, the
child builders, the translation to the trainer's configuration, status helpers; no cluster."""

from __future__ import annotations

import copy

import pytest

from forge_operator.api import defaults
from forge_operator.api.training import ForgeTraining, ProgressStatus
from forge_operator.training.children import WorkerState, build_pod_template, desired_children
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


def test_the_egress_lock_is_on_unless_the_spec_opts_out():
    assert trainer_config(ForgeTraining.model_validate(obj())).egress.lock
    assert not trainer_config(ForgeTraining.model_validate(obj(network={"egress": "Unrestricted"}))).egress.lock
    with pytest.raises(ValueError, match="network.egress"):
        ForgeTraining.model_validate(obj(network={"egress": "Open"}))


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod_spec: dict) -> list[str]:
    """The Pod Security Standard `restricted` (v1.34) for the fields a worker pod can have; the API
    server's own PodSecurity admission checks the same in tests/operator/test_pod_security.py."""
    out = []
    sc = pod_spec.get("securityContext", {})
    out += [key for key in ("hostNetwork", "hostPID", "hostIPC") if pod_spec.get(key)]
    out += [f"volume {v['name']}" for v in pod_spec.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    if sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        out.append("seccompProfile")
    if sc.get("runAsUser") == 0:
        out.append("runAsUser=0")
    for c in pod_spec["containers"]:
        csc = c.get("securityContext", {})
        if not (csc.get("runAsNonRoot", sc.get("runAsNonRoot")) is True):
            out.append("runAsNonRoot")
        if csc.get("privileged") or csc.get("allowPrivilegeEscalation") is not False:
            out.append("allowPrivilegeEscalation")
        caps = csc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append("capabilities")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append("hostPort")
    return out


def worker_pod_spec(resources: dict) -> dict:
    ft = ForgeTraining.model_validate(obj(resources=resources))
    job_ = next(c for c in desired_children(ft, "x: 1", WorkerState()) if c["kind"] == "Job")
    return job_["spec"]["template"]["spec"]


HOST_PATH = {"name": "scratch", "hostPath": {"path": "/mnt/nvme"}}


@pytest.mark.parametrize("resources, violations", [
    ({}, []),
    ({"gpusPerNode": 0, "numNodes": 1}, []),
    ({"serviceAccountName": "team-a-runner", "image": "registry.internal/own-trainer:1",
      "imagePullPolicy": "Always", "imagePullSecrets": ["regcred"]}, []),
    ({"nodeSelector": {"pool": "a100"}, "priorityClassName": "high",
      "tolerations": [{"key": "pool", "operator": "Exists"}],
      "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
          {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}, []),
    ({"env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
      "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "creds", "secret": {"secretName": "s3"}}],
      "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}, []),
    # the user's own volumes are passed through as written: a hostPath one makes the pod not
    # `restricted` (the namespace's PodSecurity admission then refuses it: docs/install.md)
    ({"volumes": [HOST_PATH], "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}, ["volume scratch"]),
], ids=["default", "cpu-only", "own-account-and-image", "scheduling", "own-env-and-volumes", "host-path"])
def test_workers_pass_pod_security_restricted(resources, violations):
    pod_spec = worker_pod_spec(resources)
    assert restricted_violations(pod_spec) == violations
    # the trainer image's user whatever image runs; volumes group-writable by it
    assert pod_spec["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod_spec["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False,
                                                            "capabilities": {"drop": ["ALL"]}}


def test_the_checker_of_restricted_finds_what_the_standard_refuses():
    """restricted_violations above is no test that cannot fail: each setting it checks, removed, is found."""
    good = worker_pod_spec({})
    for breaks, found in [(lambda p: p["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
                          (lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile"),
                          (lambda p: p["securityContext"].update(runAsUser=0), "runAsUser=0"),
                          (lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
                           "allowPrivilegeEscalation"),
                          (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
                           "capabilities"),
                          (lambda p: p.update(hostIPC=True), "hostIPC")]:
        pod_spec = copy.deepcopy(good)
        breaks(pod_spec)
        assert restricted_violations(pod_spec) == [found]


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


@pytest.mark.parametrize("failure_policy, timeout", [({}, defaults.RENDEZVOUS_TIMEOUT_SECONDS),
                                                     ({"rendezvousTimeoutSeconds": 600}, 600)])
def test_workers_rendezvous_statically_by_completion_index_and_wait_for_late_nodes(failure_policy, timeout):
    ft = ForgeTraining.model_validate(obj(failurePolicy=failure_policy))
    command = build_pod_template(ft, WorkerState(restart_count=2), "img")["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "forge_trainer.launch"]  # torchrun, a timeout made recognisable
    args = command[3:command.index("-m", 3)]
    assert args == ["--nnodes=4", "--nproc-per-node=8", "--node-rank=$(JOB_COMPLETION_INDEX)",
                    "--rdzv-backend=static", "--rdzv-endpoint=llm-r2-0.llm.ns.svc:29400", "--rdzv-id=uid-1-r2",
                    f"--rdzv-conf=timeout={timeout}", "--max-restarts=0"]
    # tests/trainer/test_rendezvous.py shows torchrun reads them so


def test_the_rendezvous_timeout_has_bounds():
    for bad in (59, 86401):
        with pytest.raises(ValueError, match="rendezvousTimeoutSeconds"):
            ForgeTraining.model_validate(obj(failurePolicy={"rendezvousTimeoutSeconds": bad}))


def test_a_rendezvous_that_timed_out_names_the_node_ranks_whose_pods_had_not_started():
    from forge_operator.training.failure import group_failure
    from forge_operator.training.observe import Observed
    from forge_trainer.contract import RendezvousTimeout
    from operator_support import NOW, job

    timed_out = RendezvousTimeout("node rank 0 waited 1800 s for the other nodes of 4: 2 of 4 nodes joined")
    rank0 = pod("llm-r0-0", 0, phase="Failed", status={"containerStatuses": [{"state": {"terminated": {
        "exitCode": 69, "message": TerminationMessage.failed(timed_out).to_json()}}}]})
    rank1 = pod("llm-r0-1", 1, status={"containerStatuses": [{"state": {"running": {}}}]})
    rank2 = pod("llm-r0-2", 2, phase="Pending", status={"containerStatuses": [
        {"state": {"waiting": {"reason": "ImagePullBackOff"}}}]})
    ft = ForgeTraining.model_validate(obj())
    failure, _ = group_failure(ft, job("llm-r0"), [rank0, rank1, rank2], Observed(now=NOW))
    assert (failure.reason, failure.exit_code) == ("RendezvousTimeout", 69)
    assert failure.message == ("pod llm-r0-0 on node n0: rendezvous timed out: node rank 0 waited 1800 s for the other "
                               "nodes of 4: 2 of 4 nodes joined; node ranks not started: "
                               "2 (llm-r0-2: ImagePullBackOff), 3 (no pod)")
    # exit code 69 without the trainer's message is a crash like any other
    rank0["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "boom"
    assert pod_failure(rank0).reason == "PodFailed"


def test_grpo_translates_its_rewards_and_the_workers_mount_the_reward_configmap():
    """examples/grpo.yaml: the Python rewards are read where the ConfigMap is mounted, the built-in one and
    the sampling and objective settings pass through; the data volume's reward file is mounted too."""
    import yaml

    from pathlib import Path

    from forge_operator.api.names import REWARDS_MOUNT_ROOT

    manifest = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "grpo.yaml").read_text())
    manifest["metadata"]["namespace"] = "team"
    manifest["spec"]["rewards"].append({"name": "on-pvc", "python": {"pvc": {"claimName": "reward-code",
                                                                              "path": "r/score.py"},
                                                                      "function": "score"}})
    ft = ForgeTraining.model_validate(manifest)
    m = trainer_config(ft).method
    assert (m.kind, m.group_size, m.max_new_tokens, m.beta, m.epsilon, m.scale_rewards) == ("grpo", 8, 16, 0.04, 0.2, True)
    functions = {r.name: r.function for r in m.rewards}
    assert functions["digits"] == f"{REWARDS_MOUNT_ROOT}/arithmetic-rewards/arithmetic_reward.py:digits"
    assert functions["on-pvc"] == "/mnt/pvc/reward-code/r/score.py:score"
    assert m.rewards[2].length.max_chars == 8 and m.rewards[0].weight == 0.5
    spec = build_pod_template(ft, WorkerState(), "img")["spec"]
    assert {"name": "rewards-arithmetic-rewards", "configMap": {"name": "arithmetic-rewards"}} in spec["volumes"]
    mounts = spec["containers"][0]["volumeMounts"]
    assert {"name": "rewards-arithmetic-rewards", "mountPath": f"{REWARDS_MOUNT_ROOT}/arithmetic-rewards",
            "readOnly": True} in mounts
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "reward-code" for v in spec["volumes"])

    here = trainer_config(ft, config_map=lambda name: f"/home/me/{name}").method
    assert here.rewards[0].function == "/home/me/arithmetic-rewards/arithmetic_reward.py:digits"

    online = copy.deepcopy(manifest)
    online["spec"]["method"] = "online-dpo"
    del online["spec"]["training"]["grpo"]
    online["spec"]["training"]["dpoBeta"] = 0.3
    o = trainer_config(ForgeTraining.model_validate(online)).method
    assert (o.kind, o.beta, o.group_size, o.loss_type) == ("online-dpo", 0.3, 8, "sigmoid")


def test_the_workers_get_what_provenance_records_and_the_signing_key():
    """The image reference, the node and its region and zone (downward API) in every worker's environment;
    spec.provenance.signingKeySecret mounted read-only (group-readable: the pod's fsGroup) where the
    trainer's configuration looks for it."""
    from forge_operator.api.names import SIGNING_KEY_MOUNT

    plain = build_pod_template(ForgeTraining.model_validate(obj()), WorkerState(), "registry.local/forge:1")
    container = plain["spec"]["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["FORGE_IMAGE"] == "registry.local/forge:1"
    assert env["FORGE_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["FORGE_NODE_REGION"] == {"fieldRef": {"fieldPath": "metadata.labels['topology.kubernetes.io/region']"}}
    assert env["FORGE_NODE_ZONE"] == {"fieldRef": {"fieldPath": "metadata.labels['topology.kubernetes.io/zone']"}}
    assert not [v for v in plain["spec"]["volumes"] if "secret" in v]
    assert trainer_config(ForgeTraining.model_validate(obj())).provenance.signing_key is None

    o = obj(provenance={"signingKeySecret": {"name": "model-signing", "key": "ed25519.pem"}})
    ft = ForgeTraining.model_validate(o)
    pod_spec = build_pod_template(ft, WorkerState(), "img")["spec"]
    assert [v for v in pod_spec["volumes"] if "secret" in v] == [
        {"name": "signing-key", "secret": {"secretName": "model-signing", "defaultMode": 0o440,
                                           "items": [{"key": "ed25519.pem", "path": "ed25519.pem"}]}}]
    assert {"name": "signing-key", "mountPath": SIGNING_KEY_MOUNT, "readOnly": True} in \
        pod_spec["containers"][0]["volumeMounts"]
    assert trainer_config(ft).provenance.signing_key == f"{SIGNING_KEY_MOUNT}/ed25519.pem"


def test_file_mode_and_checkpoint_retention_reach_the_trainer():
    o = obj()
    o["spec"]["output"]["fileMode"] = 0o640
    o["spec"]["checkpoint"]["retainAfterSuccess"] = "Last"
    cfg = trainer_config(ForgeTraining.model_validate(o))
    assert (cfg.output.file_mode, cfg.checkpoint.retain_after_success) == (0o640, "Last")
    defaults_ = trainer_config(ForgeTraining.model_validate(obj()))
    assert (defaults_.output.file_mode, defaults_.checkpoint.retain_after_success) == (0o644, "All")
