"""The ForgeTraining planner (training/planner.py and the helpers it calls), table-driven; no cluster."""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest

from forge_operator.api.training import ForgeTraining
from forge_operator.k8s import conditions as C
from forge_operator.k8s.objects import Patch
from forge_operator.training.observe import Observed
from forge_operator.training.planner import plan_training
from forge_trainer.contract import (PROGRESS_ANNOTATION, DataError, ExitCode, LastCheckpoint, Progress,
                                    TerminationMessage)
from operator_support import NOW, READY, job, obj, pod, running_plan

def test_fresh_training_creates_children_with_owner_references():
    plan = plan_training(obj(), Observed(now=NOW))
    kinds = [c["kind"] for c in plan.apply]
    assert kinds == ["ConfigMap", "Service", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "Job"]
    assert all(c["metadata"]["ownerReferences"][0]["uid"] == "uid-1" for c in plan.apply)
    assert plan.status["phase"] == "Pending" and plan.events[0].reason == "Created"


def test_plan_is_idempotent():
    o = obj()
    first = plan_training(o, Observed(now=NOW))
    o2 = copy.deepcopy(o) | {"status": first.status}
    second = plan_training(o2, Observed(now=NOW))
    assert second.status == first.status and second.apply == first.apply and not second.events


def test_restart_waits_for_backoff_before_recreating_the_job():
    o = obj(failurePolicy={"backoffSeconds": 30})
    o["status"] = {"phase": "Restarting", "restartCount": 1, "failureCount": 1,
                   "restarts": [{"time": "2026-11-22T12:00:00Z", "reason": "PodFailed", "step": 10}]}
    early = plan_training(o, Observed(now=NOW + timedelta(seconds=10)))
    assert "Job" not in [c["kind"] for c in early.apply] and early.status["phase"] == "Restarting"
    assert 19 <= early.requeue_after <= 20
    late = plan_training(o, Observed(now=NOW + timedelta(seconds=31)))
    jobs = [c for c in late.apply if c["kind"] == "Job"]
    assert jobs[0]["metadata"]["name"] == "llm-r1"
    env = {e["name"]: e.get("value") for e in jobs[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    # the new workers are restart 1; the trainer resumes from the newest complete checkpoint, which the
    # status recorded as the restart's step
    assert env["FORGE_RESTART_COUNT"] == "1" and jobs[0]["metadata"]["labels"]["forge.dev/attempt"] == "1"
    assert late.status["restartCount"] == 1 and late.status["restarts"][-1]["step"] == 10


def test_stall_condition_after_no_step_for_the_timeout():
    o = obj(failurePolicy={"stallTimeoutSeconds": 600})
    o["status"] = {"phase": "Running", "startTime": "2026-11-22T10:00:00Z",
                   "progress": {"step": 7, "lastStepTime": "2026-11-22T11:40:00Z"},
                   "conditions": [{"type": "Running", "status": "True", "reason": "AllRanksRunning", "message": "",
                                   "lastTransitionTime": "2026-11-22T10:00:00Z"}]}
    plan = running_plan(o)
    stalled = C.find(plan.status["conditions"], "Stalled")
    assert stalled["status"] == "True" and "step 7 has not advanced since 2026-11-22T11:40:00Z" in stalled["message"]
    assert [e.reason for e in plan.events] == ["NoProgress"]
    o["status"]["progress"]["lastStepTime"] = "2026-11-22T11:59:00Z"
    assert C.find(running_plan(o).status.get("conditions"), "Stalled") is None


def test_gpu_hour_budget_ends_the_training():
    o = obj(training={"budget": {"maxSteps": 100, "maxGpuHours": 10}})
    o["status"] = {"phase": "Running", "budget": {"gpuHours": 9.9, "accountedAt": "2026-11-22T11:59:00Z"}}
    plan = running_plan(o)  # 4 nodes x 8 GPUs for 60 s = 0.53 GPU-hours more
    assert plan.status["phase"] == "Failed"
    assert C.find(plan.status["conditions"], "Failed")["reason"] == "GpuHourBudgetExhausted"
    assert plan.deleted("Job") == ["llm-r0"]


@pytest.mark.parametrize("overrides, message", [
    ({"data": {"sources": [{"name": "c", "location": {"s3": {"uri": "s3://bucket/x", "endpoint": "http://a:9000"}}},
                           {"name": "d", "location": {"s3": {"uri": "s3://bucket/y", "endpoint": "http://b:9000"}}}]}},
     "spec.data.sources[1].location.s3: every S3 location of a training must use the same endpoint"),
    ({"training": {"globalBatch": {"sequences": 60}, "budget": {"maxSteps": 10}}},
     "spec.training.globalBatch: 60 sequences is not a multiple of microBatchSize x GPUs"),
])
def test_specs_this_trainer_cannot_run_are_reported_not_crashed_on(overrides, message):
    o = obj()
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(o["spec"].get(k), dict):
            o["spec"][k] = {kk: vv for kk, vv in {**o["spec"][k], **v}.items() if vv is not None}
        else:
            o["spec"][k] = v
    plan = plan_training(o, Observed(now=NOW))
    invalid = C.find(plan.status["conditions"], "Invalid")
    assert invalid["status"] == "True" and message in invalid["message"]
    assert not plan.apply and plan.events[0].type == "Warning"


def test_pod_stuck_terminating_restarts_the_group_and_is_force_deleted():
    o = obj(failurePolicy={"nodeFailureTimeoutSeconds": 60})
    o["status"] = {"phase": "Running"}
    stuck = {"metadata": {"deletionTimestamp": "2026-11-22T11:50:00Z", "deletionGracePeriodSeconds": 30}}
    spec_job = job("llm-r0")
    pods = [pod(f"p{i}", i, node=f"n{i}") for i in range(4)]
    pods[3]["metadata"].update(stuck["metadata"])
    plan = plan_training(o, Observed(now=NOW, jobs=[spec_job], pods=pods, nodes={f"n{i}": READY for i in range(4)}))
    assert plan.deleted("Pod", force=True) == ["p3"]
    assert plan.status["restarts"][0]["reason"] == "StuckTerminating"
    assert plan.deleted("Job") == ["llm-r0"] and plan.status["restartCount"] == 1


def test_node_not_ready_counts_only_after_the_timeout():
    o = obj(failurePolicy={"nodeFailureTimeoutSeconds": 120})
    o["status"] = {"phase": "Running"}
    def nodes(since: str) -> dict:
        lost = {"status": {"conditions": [{"type": "Ready", "status": "Unknown", "lastTransitionTime": since}]}}
        return {"n0": READY, "n1": READY, "n2": READY, "n3": lost}
    pods = [pod(f"p{i}", i, node=f"n{i}") for i in range(4)]
    recent = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=pods, nodes=nodes("2026-11-22T11:59:00Z")))
    assert not recent.status.get("restartCount")
    old = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=pods, nodes=nodes("2026-11-22T11:57:00Z")))
    assert old.status["restarts"][0]["reason"] == "NodeLost" and "n3" in old.status["restarts"][0]["message"]


def test_unreadable_node_is_not_a_lost_node_but_a_deleted_one_is():
    o = obj()
    o["status"] = {"phase": "Running"}
    pods = [pod(f"p{i}", i, node=f"n{i}") for i in range(4)]
    unread = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=pods, nodes={}))
    assert not unread.status.get("restartCount") and unread.status["phase"] == "Running"
    gone = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=pods,
                                     nodes={"n0": READY, "n1": READY, "n2": READY, "n3": None}))
    assert gone.status["restarts"][0]["reason"] == "NodeLost"


def test_final_summary_in_the_termination_message_becomes_the_final_progress():
    o = obj()
    o["status"] = {"phase": "Running", "progress": {"step": 90, "loss": 2.0}}
    rank0 = pod("p0", 0, phase="Succeeded")
    summary = TerminationMessage(
        status="completed", reason="max_steps", step=100, tokens_seen=819200, train_loss=1.9, val_loss=2.1,
        total_steps=100, exit_code=ExitCode.OK,
        last_checkpoint=LastCheckpoint(step=100, path="step-00000100", time="2026-11-22T11:59:00Z"))
    rank0["status"]["containerStatuses"] = [{"state": {"terminated": {"exitCode": 0, "message": summary.to_json()}}}]
    rank0["metadata"]["annotations"][PROGRESS_ANNOTATION] = Progress(step=95, loss=1.95).to_json()
    plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0", conditions=[{"type": "Complete", "status": "True"}])],
                                     pods=[rank0]))
    p = plan.status["progress"]
    assert (p["step"], p["loss"], p["validationLoss"], p["percent"]) == (100, 1.9, 2.1, 100.0)
    assert plan.status["lastCheckpoint"]["step"] == 100 and p["totalSteps"] == 100
    assert plan.status["phase"] == "Succeeded"


def test_a_restart_is_not_a_stall_and_stalled_holds_only_while_running():
    o = obj(failurePolicy={"stallTimeoutSeconds": 600})
    # running again since 11:55 after a restart; the step went back from 50 to the checkpoint's 40
    o["status"] = {"phase": "Running", "progress": {"step": 50, "lastStepTime": "2026-11-22T11:00:00Z"},
                   "conditions": [{"type": "Running", "status": "True", "reason": "AllRanksRunning", "message": "",
                                   "lastTransitionTime": "2026-11-22T11:55:00Z"}]}
    assert C.find(running_plan(o).status.get("conditions"), "Stalled") is None
    from forge_operator.training.status import Report, merge_progress
    back = merge_progress({"step": 50, "lastStepTime": "2026-11-22T11:00:00Z"}, Report(Progress(step=40)), NOW)
    assert back["lastStepTime"] == "2026-11-22T12:00:00Z"
    # a stalled group that is suspended is no longer stalled
    o = obj(failurePolicy={"stallTimeoutSeconds": 60}, scheduling={"suspend": True})
    o["status"] = {"phase": "Running", "conditions": [
        {"type": "Running", "status": "True", "reason": "AllRanksRunning", "message": "",
         "lastTransitionTime": "2026-11-22T10:00:00Z"},
        {"type": "Stalled", "status": "True", "reason": "NoProgress", "message": "",
         "lastTransitionTime": "2026-11-22T10:30:00Z"}]}
    plan = running_plan(o)
    assert plan.status["phase"] == "Suspended"
    assert C.find(plan.status["conditions"], "Stalled")["status"] == "False"


def test_gpu_time_is_booked_in_steps_so_a_replan_writes_nothing():
    o = obj()
    o["status"] = {"phase": "Running", "budget": {"gpuHours": 1.0, "tokens": 0, "accountedAt": "2026-11-22T11:59:50Z"}}
    first = running_plan(o)
    assert first.status["budget"] == o["status"]["budget"]  # 10 s: nothing booked yet
    later = running_plan(o, now=NOW + timedelta(seconds=30))
    assert later.status["budget"]["gpuHours"] == pytest.approx(1.0 + 40 * 32 / 3600, abs=1e-4)
    assert later.status["budget"]["accountedAt"] == "2026-11-22T12:00:30Z"
    # nothing runs: no clock to account against
    idle = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=[]))
    assert "accountedAt" not in idle.status["budget"] and idle.status["budget"]["gpuHours"] == 1.0
    # and a plan from the plan's own status is a fixed point
    again = dict(o, status=first.status)
    assert running_plan(again).status == first.status


def test_only_jobs_of_earlier_attempts_are_deleted():
    o = obj()
    o["status"] = {"phase": "Running", "restartCount": 1}
    plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0"), job("llm-r1"), job("llm-r2")]))
    assert plan.deleted("Job") == ["llm-r0"]


def test_pods_of_a_deleted_job_of_the_same_name_are_not_this_attempts_workers():
    o = obj(resources={"numNodes": 1})
    o["status"] = {"phase": "Running"}
    stale = pod("old", 0, phase="Failed")
    stale["metadata"]["ownerReferences"][0]["uid"] = "uid-of-the-deleted-job"
    stale["status"]["containerStatuses"] = [{"state": {"terminated": {"exitCode": 75}}}]
    plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=[stale]))
    assert not plan.status.get("restartCount") and not plan.deleted("Job")


def test_suspending_a_queued_training_deletes_its_job_and_resuming_queues_a_new_one():
    o = obj(scheduling={"queueName": "team-a", "suspend": True})
    o["status"] = {"phase": "Running"}
    admitted = job("llm-r0")
    plan = plan_training(o, Observed(now=NOW, jobs=[admitted], pods=[pod("p0", 0)]))
    assert plan.deleted("Job") == ["llm-r0"] and not plan.patch
    assert "Job" not in [c["kind"] for c in plan.apply] and plan.status["phase"] == "Suspended"
    o["spec"]["scheduling"]["suspend"] = False
    o["status"] = plan.status
    resumed = plan_training(o, Observed(now=NOW))
    new = next(c for c in resumed.apply if c["kind"] == "Job")
    assert new["metadata"]["name"] == "llm-r0" and new["spec"]["suspend"] is True
    assert new["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert resumed.status["phase"] == "Queued"


def test_a_new_default_trainer_image_does_not_restart_running_trainings():
    from forge_operator.training.draft import Settings
    o = obj()
    o["status"] = {"phase": "Running"}
    upgraded = running_plan(o, settings=Settings(trainer_image="registry.local/forge-trainer:0.2.0"))
    assert not upgraded.status.get("restartCount") and not upgraded.deleted("Job")
    edited = copy.deepcopy(o)
    edited["spec"]["resources"]["image"] = "registry.local/forge-trainer:custom"
    plan = running_plan(edited, built_from=o)
    assert plan.status["restartCount"] == 1
    assert plan.status["restarts"][0]["reason"] == "ResourcesChanged"


def test_a_refused_child_stays_reported_until_the_api_server_accepts_it():
    o = obj()
    o["status"] = {"phase": "Pending", "conditions": [
        {"type": "Invalid", "status": "True", "reason": "ChildRejected", "message": "refused",
         "lastTransitionTime": "2026-11-22T11:00:00Z"}]}
    plan = plan_training(o, Observed(now=NOW))
    assert C.find(plan.status["conditions"], "Invalid")["reason"] == "ChildRejected"
    o["status"]["conditions"][0]["reason"] = "InvalidSpec"
    assert C.find(plan_training(o, Observed(now=NOW)).status["conditions"], "Invalid") is None


def test_the_failing_ranks_own_exit_code_explains_the_group_failure():
    o = obj(resources={"numNodes": 2})
    o["status"] = {"phase": "Running"}
    rank0 = pod("p0", 0, phase="Failed")  # torchrun on node 0 gives up once rank 1 is gone
    rank0["status"]["containerStatuses"] = [{"state": {"terminated": {"exitCode": 1, "message": "rendezvous closed"}}}]
    rank1 = pod("p1", 1, phase="Failed")
    rank1["status"]["containerStatuses"] = [{"state": {"terminated": {
        "exitCode": 1, "message": TerminationMessage.failed(DataError("no files")).to_json()}}}]
    plan = plan_training(o, Observed(now=NOW, jobs=[job("llm-r0")], pods=[rank0, rank1]))
    assert plan.status["phase"] == "Failed"
    assert C.find(plan.status["conditions"], "Failed")["reason"] == "NonRetryableExitCode"
    assert "data error" in C.find(plan.status["conditions"], "Failed")["message"]


def test_workers_not_running_at_the_deadline_are_never_started():
    o = obj(training={"budget": {"maxSteps": 100, "deadline": "2026-11-22T11:00:00Z"}},
            scheduling={"queueName": "team-a"})
    o["status"] = {"phase": "Queued"}
    queued = job("llm-r0")
    queued["spec"]["suspend"] = True
    plan = plan_training(o, Observed(now=NOW, jobs=[queued]))
    failed = C.find(plan.status["conditions"], "Failed")
    assert plan.status["phase"] == "Failed" and failed["reason"] == "DeadlineExceeded"
    assert "2026-11-22T11:00:00Z passed while no worker was running" in failed["message"]
    assert plan.deleted("Job") == ["llm-r0"] and "Job" not in [c["kind"] for c in plan.apply]


def test_running_workers_end_at_the_deadline_themselves_unless_long_overdue():
    o = obj(training={"budget": {"maxSteps": 100, "deadline": "2026-11-22T11:55:00Z"}})
    o["status"] = {"phase": "Running"}
    assert running_plan(o).status["phase"] == "Running"  # 5 min late: the trainer is exporting
    late = running_plan(o, now=NOW + timedelta(minutes=20))  # > 600 s grace + 600 s slack
    assert late.status["phase"] == "Failed" and late.deleted("Job") == ["llm-r0"]
    assert "have not finished" in C.find(late.status["conditions"], "Failed")["message"]


def test_the_next_workers_start_only_once_the_last_ones_have_stopped():
    o = obj(failurePolicy={"nodeFailureTimeoutSeconds": 60, "backoffSeconds": 0})
    o["status"] = {"phase": "Running"}
    nodes = {f"n{i}": READY for i in range(4)}
    # rank 3 failed; the Job controller stops the others, which checkpoint in their preStop hook
    pods = [pod(f"p{i}", i, node=f"n{i}") for i in range(3)] + [pod("p3", 3, phase="Failed", node="n3")]
    failed_job = job("llm-r0", conditions=[{"type": "Failed", "status": "True"}])
    plan = plan_training(o, Observed(now=NOW, jobs=[failed_job], pods=pods, nodes=nodes))
    assert plan.status["restartCount"] == 1 and plan.deleted("Job") == ["llm-r0"]
    assert "Job" not in [c["kind"] for c in plan.apply]
    waiting = C.find(plan.status["conditions"], "Restarting")
    assert plan.status["phase"] == "Restarting" and waiting["reason"] == "PreviousWorkersStopping"
    assert "3 worker(s)" in waiting["message"] and plan.requeue_after <= 5
    o["status"] = plan.status
    # one is still writing; one on a lost node (not Ready for longer than the timeout) cannot stop: it
    # is force-deleted (it would answer to the host name its successor takes), never waited for
    terminating = {"deletionTimestamp": "2026-11-22T12:09:00Z"}
    lost = {"status": {"conditions": [{"type": "Ready", "status": "Unknown",
                                       "lastTransitionTime": "2026-11-22T11:58:00Z"}]}}
    still = [pod("p0", 0, node="n0", metadata=terminating), pod("p1", 1, node="n1", metadata=terminating)]
    plan = plan_training(o, Observed(now=NOW + timedelta(seconds=5), pods=still, nodes={"n0": READY, "n1": lost}))
    assert "Job" not in [c["kind"] for c in plan.apply] and plan.deleted("Pod", force=True) == ["p1"]
    assert "1 worker(s)" in C.find(plan.status["conditions"], "Restarting")["message"]
    # a node NotReady for a moment is not lost: its worker is waited for
    blip = {"status": {"conditions": [{"type": "Ready", "status": "False",
                                       "lastTransitionTime": "2026-11-22T12:00:04Z"}]}}
    plan = plan_training(o, Observed(now=NOW + timedelta(seconds=5), pods=still, nodes={"n0": READY, "n1": blip}))
    assert "2 worker(s)" in C.find(plan.status["conditions"], "Restarting")["message"] and not plan.deleted("Pod", force=True)
    # past its grace period and the node failure timeout: force-deleted, no longer waited for
    plan = plan_training(o, Observed(now=NOW + timedelta(minutes=11), pods=still, nodes={"n0": READY, "n1": lost}))
    assert sorted(plan.deleted("Pod", force=True)) == ["p0", "p1"]
    assert [c["metadata"]["name"] for c in plan.apply if c["kind"] == "Job"] == ["llm-r1"]
    # a worker nobody deletes (its Job deleted with --cascade=orphan) is stopped gracefully; one of a
    # later attempt than the status knows is never touched nor waited for
    orphan, later = pod("p0", 0, node="n0"), pod("q0", 0, attempt=2, node="n0")
    plan = plan_training(o, Observed(now=NOW + timedelta(seconds=5), pods=[orphan, later], nodes={"n0": READY}))
    assert plan.deleted("Pod", force=False) == ["p0"] and "1 worker(s)" in C.find(plan.status["conditions"], "Restarting")["message"]


def test_a_suspended_job_resumes_once_the_pods_its_suspension_deleted_are_gone():
    o = obj()
    o["status"] = {"phase": "Suspended", "conditions": [
        {"type": "Suspended", "status": "True", "reason": "SuspendedByUser", "message": "",
         "lastTransitionTime": "2026-11-22T11:00:00Z"}]}
    suspended = job("llm-r0")
    suspended["spec"]["suspend"] = True
    leaving = [pod(f"p{i}", i, metadata={"deletionTimestamp": "2026-11-22T12:09:00Z"}) for i in range(2)]
    plan = plan_training(o, Observed(now=NOW, jobs=[suspended], pods=leaving, nodes={"n0": READY}))
    assert not plan.patch and plan.status["phase"] == "Pending"
    resumed = C.find(plan.status["conditions"], "Suspended")
    assert resumed["status"] == "False" and resumed["reason"] == "PreviousWorkersStopping"
    assert "waiting for 2 worker(s)" in resumed["message"]
    done = pod("p2", 2, phase="Succeeded")  # a completed index stays; it is not waited for
    plan = plan_training(o, Observed(now=NOW, jobs=[suspended], pods=[done], nodes={"n0": READY}))
    assert plan.patch == [Patch("batch/v1", "Job", "llm-r0", {"spec": {"suspend": False}})]


def test_a_queued_training_suspended_after_its_job_ended_keeps_the_outcome():
    o = obj(scheduling={"queueName": "team-a", "suspend": True})
    o["status"] = {"phase": "Running"}
    done = job("llm-r0", conditions=[{"type": "Complete", "status": "True"}])
    plan = plan_training(o, Observed(now=NOW, jobs=[done], pods=[pod("p0", 0, phase="Succeeded")]))
    assert plan.status["phase"] == "Succeeded" and not plan.deleted("Job")
    failed = job("llm-r0", conditions=[{"type": "Failed", "status": "True"}])
    bad_data = pod("p0", 0, phase="Failed", status={"containerStatuses": [{"name": "trainer", "state": {
        "terminated": {"exitCode": 65, "message": TerminationMessage(status="failed", exit_code=65).to_json()}}}]})
    plan = plan_training(o, Observed(now=NOW, jobs=[failed], pods=[bad_data]))
    assert plan.status["phase"] == "Failed"
    assert C.find(plan.status["conditions"], "Failed")["reason"] == "NonRetryableExitCode"


def test_a_failure_after_the_deadline_is_reported_as_itself_and_not_restarted():
    o = obj(training={"budget": {"maxSteps": 100, "deadline": "2026-11-22T13:00:00+02:00"}})  # 11:00 UTC
    o["status"] = {"phase": "Running"}
    failed_job = job("llm-r0", conditions=[{"type": "Failed", "status": "True"}])

    def failing(code: int):
        message = TerminationMessage(status="failed", exit_code=code).to_json()
        return pod("p0", 0, phase="Failed", status={"containerStatuses": [{"name": "trainer", "state": {
            "terminated": {"exitCode": code, "message": message}}}]})

    plan = plan_training(o, Observed(now=NOW, jobs=[failed_job], pods=[failing(65)]))
    assert C.find(plan.status["conditions"], "Failed")["reason"] == "NonRetryableExitCode"
    plan = plan_training(o, Observed(now=NOW, jobs=[failed_job], pods=[failing(1)]))
    failed = C.find(plan.status["conditions"], "Failed")
    assert plan.status["phase"] == "Failed" and failed["reason"] == "DeadlineExceeded"
    assert "2026-11-22T11:00:00Z has passed, so the workers are not restarted" in failed["message"]
    assert not plan.status.get("restartCount") and "Job" not in [c["kind"] for c in plan.apply]
    # the deadline in the message is in UTC, whatever zone the spec wrote it in
    o["status"] = {"phase": "Queued"}
    queued = job("llm-r0")
    queued["spec"]["suspend"] = True
    never = C.find(plan_training(o, Observed(now=NOW, jobs=[queued])).status["conditions"], "Failed")
    assert "2026-11-22T11:00:00Z passed while no worker was running" in never["message"]


def test_an_edit_made_while_suspended_is_a_new_attempt_on_resume():
    from forge_operator.training.children import ANNOTATION_SPEC_HASH, spec_hash

    before = obj()
    suspended = job("llm-r0")
    suspended["spec"]["suspend"] = True
    suspended["metadata"]["annotations"][ANNOTATION_SPEC_HASH] = spec_hash(ForgeTraining.model_validate(before))
    edited = obj(resources={"numNodes": 2}, scheduling={"suspend": True})
    edited["status"] = {"phase": "Suspended"}
    plan = plan_training(edited, Observed(now=NOW, jobs=[suspended]))
    assert plan.status["phase"] == "Suspended" and not plan.status.get("restartCount")  # nothing runs: later
    edited["spec"]["scheduling"]["suspend"] = False
    plan = plan_training(edited, Observed(now=NOW, jobs=[suspended]))
    assert not plan.patch and plan.deleted("Job") == ["llm-r0"]
    assert plan.status["restarts"][-1]["reason"] == "ResourcesChanged"
    new = next(c for c in plan.apply if c["kind"] == "Job")
    assert new["metadata"]["name"] == "llm-r1" and new["spec"]["parallelism"] == 2
    # the same for a queued Job Kueue has not admitted yet
    queued = obj(resources={"numNodes": 2}, scheduling={"queueName": "team-a"})
    queued["status"] = {"phase": "Queued"}
    plan = plan_training(queued, Observed(now=NOW, jobs=[suspended]))
    assert plan.deleted("Job") == ["llm-r0"] and plan.status["restarts"][-1]["reason"] == "ResourcesChanged"
    assert plan.status["phase"] == "Queued"


def test_an_edit_after_the_deadline_lets_the_trainer_finish():
    from forge_operator.training.children import ANNOTATION_SPEC_HASH

    o = obj(training={"budget": {"maxSteps": 100, "deadline": "2026-11-22T11:55:00Z"}})
    o["status"] = {"phase": "Running"}
    plan = running_plan(o)
    assert plan.status["phase"] == "Running"
    running = job("llm-r0")
    running["metadata"]["annotations"][ANNOTATION_SPEC_HASH] = "an-older-spec"
    pods = [pod(f"p{i}", i, node=f"n{i}") for i in range(4)]
    plan = plan_training(o, Observed(now=NOW, jobs=[running], pods=pods, nodes={f"n{i}": READY for i in range(4)}))
    assert plan.status["phase"] == "Running" and not plan.deleted("Job") and not plan.status.get("restartCount")


def test_a_queued_job_taken_back_by_kueue_is_queued_not_waiting():
    o = obj(scheduling={"queueName": "team-a"})
    o["status"] = {"phase": "Running"}
    preempted = job("llm-r0")
    preempted["spec"]["suspend"] = True  # Kueue evicted the workload
    leaving = [pod("p0", 0, metadata={"deletionTimestamp": "2026-11-22T12:09:00Z"})]
    plan = plan_training(o, Observed(now=NOW, jobs=[preempted], pods=leaving, nodes={"n0": READY}))
    assert plan.status["phase"] == "Queued" and not plan.patch and not plan.deleted("Job")
