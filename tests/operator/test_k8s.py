"""k8s/ without a cluster: the runtime's keys carry the kind, apply outcomes are values; conditions; peering.

A fake client stands in for the API server (objects in a dict); the real runtime, the real
reconcilers and the real planners run on it.
"""

from __future__ import annotations

import copy
import json
from datetime import timedelta

import pytest
from kubernetes.client.rest import ApiException

from forge_operator.evaluation.reconciler import EvalReconciler
from forge_operator.k8s import conditions as C
from forge_operator.k8s.objects import (
    ApplyOutcome, ChildConflict, ChildRef, ChildRejected, Key, Plan, holds, unchanged, with_digest,
)
from forge_operator.k8s.peering import outranked as check
from forge_operator.k8s.runtime import Runtime
from forge_operator.training.lifecycle import record_apply_outcome
from forge_operator.training.reconciler import TrainingReconciler
from operator_support import NOW, forge_eval, training

NS = "team-a"
PLURALS = {"ForgeTraining": "forgetrainings", "ForgeEval": "forgeevals"}


def stored(obj: dict, uid: str) -> dict:
    o = copy.deepcopy(obj)
    o["metadata"].update(namespace=NS, uid=uid, generation=1, resourceVersion="1")
    return o


class FakeApiServer:
    """Objects by (plural, namespace, name); status writes check the resourceVersion like the API server;
    children by (kind, name), applied with the API server's uid precondition."""

    def __init__(self, *objs: dict, refuse: dict[str, str] | None = None, children: list[dict] = ()) -> None:
        self.objects = {(PLURALS[o["kind"]], NS, o["metadata"]["name"]): o for o in objs}
        self.refuse = refuse or {}  # kind -> the API server's message
        self.children = {(c["kind"], c["metadata"]["name"]): copy.deepcopy(c) for c in children}
        self.applied: list[tuple[str, str]] = []
        self.reads: list[tuple[str, str]] = []
        self.events: list[dict] = []
        self.status_writes: list[tuple[str, str]] = []

    def get_custom(self, api_version, plural, namespace, name):
        return copy.deepcopy(self.objects.get((plural, namespace, name)))

    def list(self, api_version, kind, namespace, label_selector="", field_selector=""):
        return []

    def get(self, api_version, kind, name, namespace=None):
        self.reads.append((kind, name))
        return copy.deepcopy(self.children.get((kind, name)))

    def replace_status(self, plural, obj, status, resource_version):
        o = self.objects[(plural, obj["metadata"]["namespace"], obj["metadata"]["name"])]
        if o["metadata"]["resourceVersion"] != resource_version:
            return None
        o["status"] = copy.deepcopy(status)
        o["metadata"]["resourceVersion"] = str(int(resource_version) + 1)
        self.status_writes.append((obj["kind"], obj["metadata"]["name"]))
        return o["metadata"]["resourceVersion"]

    def apply(self, child, field_manager, force=True):
        key = (child["kind"], child["metadata"]["name"])
        existing, uid = self.children.get(key), child["metadata"].get("uid")
        if uid is not None and existing is None:
            raise api_error(409, f"uid mismatch: the provided object specified uid {uid}, and no existing "
                                 f"object was found")
        if uid is not None and existing["metadata"]["uid"] != uid:
            raise api_error(422, f'{key[0]} "{key[1]}" is invalid: metadata.uid: Invalid value: "{uid}": '
                                 f'field is immutable')
        if existing is not None and not force:
            raise api_error(409, "Apply failed with 1 conflict")
        if child["kind"] in self.refuse:
            raise api_error(422, self.refuse[child["kind"]])
        self.applied.append(key)
        stored = copy.deepcopy(child)
        stored["metadata"]["uid"] = existing["metadata"]["uid"] if existing else f"uid-{key[0]}-{key[1]}"
        self.children[key] = stored
        return stored["metadata"]["uid"]

    def patch(self, namespace, patch, field_manager):
        pass

    def delete(self, namespace, delete):
        pass

    def create_event(self, namespace, body):
        self.events.append(body)


def api_error(status: int, message: str) -> ApiException:
    err = ApiException(status=status, reason="Conflict" if status == 409 else "Unprocessable Entity")
    err.body = json.dumps({"message": message})
    return err


@pytest.fixture
def make_runtime():
    made: list[Runtime] = []

    def make(api: FakeApiServer) -> Runtime:
        rt = Runtime(api, [TrainingReconciler(), EvalReconciler()], field_manager="forge-operator",
                     resync_seconds=3600)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


T, E = Key("ForgeTraining", NS, "llm"), Key("ForgeEval", NS, "llm")


@pytest.mark.parametrize("a, b, same", [
    (T, E, False),                                   # same name and namespace, two kinds
    (T, Key("ForgeTraining", NS, "llm"), True),
    (T, Key("ForgeTraining", "team-b", "llm"), False),
    (T, Key("ForgeTraining", NS, "llm2"), False),
])
def test_the_kind_is_part_of_the_key(a, b, same):
    assert (a == b) is same and (len({a, b}) == 1) is same


@pytest.mark.parametrize("deleted, left", [
    ([E], [T]),          # deleting the eval leaves the training's timer
    ([T], [E]),          # and the other way round
    ([T, E], []),
    ([Key("ForgeEval", NS, "other")], [E, T]),
])
def test_forgetting_one_kind_leaves_the_other_kinds_timer(make_runtime, deleted, left):
    rt = make_runtime(FakeApiServer())
    for key in (T, E):
        rt.requeue(key, 3600)
    for key in deleted:
        rt.on_event(key, deleted=True)
    assert rt.pending() == sorted(left)


def test_a_requeue_replaces_only_the_same_kinds_timer(make_runtime):
    rt = make_runtime(FakeApiServer())
    rt.requeue(T, 3600)
    first = rt._timers[T]
    rt.requeue(E, 3600)
    assert rt._timers[T] is first and rt.pending() == [E, T]
    rt.requeue(T, 3600)
    assert rt._timers[T] is not first and first.finished.is_set()  # the old timer was cancelled


@pytest.mark.parametrize("key, written", [(T, "ForgeTraining"), (E, "ForgeEval")])
def test_a_reconcile_goes_to_its_kinds_planner_and_writes_only_its_status(make_runtime, key, written):
    api = FakeApiServer(stored(training("llm"), "uid-t"), stored(forge_eval(), "uid-e"))
    rt = make_runtime(api)
    plan = rt.reconcile(key)
    assert api.status_writes == [(written, "llm")]
    other = ("forgeevals" if written == "ForgeTraining" else "forgetrainings", NS, "llm")
    assert "status" not in api.objects[other]
    assert {e["involvedObject"]["kind"] for e in api.events} == {written}
    if written == "ForgeEval":
        # its model is the training of the same name, not finished: it waits, and looks again later
        assert plan.status["phase"] == "Pending" and not plan.apply and plan.requeue_after is not None
        running = next(c for c in plan.status["conditions"] if c["type"] == "Running")
        assert (running["status"], running["reason"]) == ("False", "WaitingForModel")
    else:
        assert plan.status["phase"] == "Pending" and ("Job", "llm-r0") in api.applied
        assert rt.pending() == [T]  # resync timer of the training only


def test_an_object_gone_forgets_only_its_own_key(make_runtime):
    rt = make_runtime(FakeApiServer(stored(forge_eval(), "uid-e")))
    rt.requeue(T, 3600)
    rt.requeue(E, 3600)
    assert rt.reconcile(T) is None  # no such training: its timer goes, the eval's stays
    assert rt.pending() == [E]


def test_a_refused_child_reaches_the_kind_as_a_value(make_runtime):
    api = FakeApiServer(stored(training("llm"), "uid-t"), refuse={"Job": "spec.template.spec.containers[0]"
                                                                          ".env[0].name: Required value"})
    seen: list[ApplyOutcome] = []
    rt = make_runtime(api)
    kind = rt.kinds["ForgeTraining"]
    original = kind.after_apply
    kind.after_apply = lambda plan, old, outcome, now: (seen.append(outcome), original(plan, old, outcome, now))
    rt.reconcile(T)
    assert seen[0].rejected == ChildRejected("Job", "llm-r0", "spec.template.spec.containers[0].env[0].name: "
                                                              "Required value")
    assert [c.kind for c in seen[0].accepted] == ["ConfigMap", "Service", "ServiceAccount", "Role", "RoleBinding",
                                                  "NetworkPolicy"]
    invalid = next(c for c in api.objects[("forgetrainings", NS, "llm")]["status"]["conditions"]
                   if c["type"] == "Invalid")
    assert invalid["reason"] == "ChildRejected" and "Job llm-r0" in invalid["message"]
    assert [e["reason"] for e in api.events].count("ChildRejected") == 1


USERS_CONFIG = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"mine": "yes"},
                "metadata": {"name": "llm-config", "namespace": NS, "uid": "uid-users"}}
NOT_OURS = "no owner reference to ForgeTraining llm, not labelled app.kubernetes.io/managed-by=forge-operator"


def invalid_of(api: FakeApiServer) -> dict | None:
    return C.find(api.objects[("forgetrainings", NS, "llm")]["status"].get("conditions"), "Invalid")


def test_an_object_of_a_childs_name_that_is_not_ours_is_never_applied(make_runtime):
    api = FakeApiServer(stored(training("llm"), "uid-t"), children=[USERS_CONFIG])
    rt = make_runtime(api)
    seen: list[ApplyOutcome] = []
    kind = rt.kinds["ForgeTraining"]
    original = kind.after_apply
    kind.after_apply = lambda plan, old, outcome, now: (seen.append(outcome), original(plan, old, outcome, now))
    for _ in range(2):
        rt.reconcile(T)
    assert seen[0] == ApplyOutcome((), conflict=ChildConflict("ConfigMap", "llm-config", NOT_OURS))
    assert api.applied == [] and api.children[("ConfigMap", "llm-config")] == USERS_CONFIG  # untouched
    invalid = invalid_of(api)
    assert (invalid["status"], invalid["reason"]) == ("True", "ChildConflict")
    assert invalid["message"].startswith(f"ConfigMap llm-config exists and is not this training's ({NOT_OURS})")
    reasons = [e["reason"] for e in api.events]
    assert reasons.count("ChildConflict") == 1 and "Created" not in reasons  # no Job was created

    del api.children[("ConfigMap", "llm-config")]  # the user renames theirs: the training goes on
    rt.reconcile(T)
    assert ("ConfigMap", "llm-config") in api.applied and ("Job", "llm-r0") in api.applied
    assert invalid_of(api) is None


@pytest.mark.parametrize("label, owner, ours", [
    ("forge-operator", "uid-t", True),
    ("forge-operator", "uid-other-training", False),   # the children of a deleted training of the same name
    (None, "uid-t", False),
    ("someone-else", "uid-t", False),
])
def test_ours_means_our_owner_reference_and_our_label(make_runtime, label, owner, ours):
    existing = copy.deepcopy(USERS_CONFIG)
    existing["metadata"]["ownerReferences"] = [{"kind": "ForgeTraining", "name": "llm", "uid": owner}]
    if label:
        existing["metadata"]["labels"] = {"app.kubernetes.io/managed-by": label}
    api = FakeApiServer(stored(training("llm"), "uid-t"), children=[existing])
    make_runtime(api).reconcile(T)
    assert (("ConfigMap", "llm-config") in api.applied) is ours
    assert (invalid_of(api) is None) is ours


def test_children_known_to_be_ours_are_applied_without_reading_them_and_a_replaced_one_is_not(make_runtime):
    api = FakeApiServer(stored(training("llm"), "uid-t"))
    rt = make_runtime(api)
    rt.reconcile(T)
    assert len(api.reads) == len(api.applied) == 7  # read once (absent), then created
    api.reads.clear()
    rt.reconcile(T)
    assert api.reads == []  # applied with their uids as preconditions: one request each
    # someone deletes our Service and makes their own of the same name
    api.children[("Service", "llm")] = {"apiVersion": "v1", "kind": "Service",
                                        "metadata": {"name": "llm", "namespace": NS, "uid": "uid-theirs"}}
    api.applied.clear()
    rt.reconcile(T)
    assert api.applied == [("ConfigMap", "llm-config")]  # stopped at the Service, which is not applied
    assert api.children[("Service", "llm")]["metadata"] == {"name": "llm", "namespace": NS, "uid": "uid-theirs"}
    assert invalid_of(api)["reason"] == "ChildConflict" and "Service llm" in invalid_of(api)["message"]


class Cached(FakeApiServer):
    """The API server with a cache in front that holds its children as they are now (an informer in step)."""

    def cached(self, api_version, kind, name, namespace=None, labels=None):
        return copy.deepcopy(self.children.get((kind, name)))


def test_a_child_the_cache_holds_unchanged_is_not_applied_again(make_runtime):
    api = Cached(stored(training("llm"), "uid-t"))
    rt = Runtime(api, [TrainingReconciler()], field_manager="forge-operator", resync_seconds=3600, reader=api)
    try:
        rt.reconcile(T)
        applied_first = list(api.applied)
        assert all("forge.dev/applied-digest" in c["metadata"]["annotations"] for c in api.children.values())
        api.applied.clear()
        rt.reconcile(T)
        assert api.applied == [] and api.reads == [("ConfigMap", "llm-config"), ("Service", "llm"),
                                                   *[(k, n) for k, n in applied_first[2:]]]  # the first reads only
        # someone changes a value the operator sets: applied again, once
        api.children[("Service", "llm")]["spec"]["publishNotReadyAddresses"] = False
        rt.reconcile(T)
        assert api.applied == [("Service", "llm")]
        assert api.children[("Service", "llm")]["spec"]["publishNotReadyAddresses"] is True
    finally:
        rt.close()


@pytest.mark.parametrize("live, wanted, held", [
    ({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": 2}}, True),  # defaults and other fields aside
    ({"a": [{"port": 1, "protocol": "TCP"}]}, {"a": [{"port": 1}]}, True),
    ({"a": [{"port": 1}, {"port": 2}]}, {"a": [{"port": 1}]}, False),  # an item more is a change
    ({"a": {"c": 2}}, {"a": {"c": 3}}, False),
    ({}, {"a": None}, False),
])
def test_what_a_live_object_holds(live, wanted, held):
    assert holds(live, wanted) is held


def test_a_new_digest_means_a_new_apply_even_where_the_live_object_holds_every_value():
    child = {"metadata": {"name": "x", "labels": {"a": "1"}}, "spec": {"p": 1}}
    live = with_digest(child)
    assert unchanged(live, with_digest(child))
    fewer = {"metadata": {"name": "x"}, "spec": {"p": 1}}  # a label dropped: the apply removes it
    assert holds(live, {"spec": {"p": 1}}) and not unchanged(live, with_digest(fewer))


REFUSED = {"type": "Invalid", "status": "True", "reason": "ChildRejected", "lastTransitionTime": "2026-11-22T11:00:00Z",
           "message": "the API server refused Job llm-r1: env[0].name: Required value"}
ACCEPTED_ALL = (ChildRef("ConfigMap", "llm-config"), ChildRef("Service", "llm"), ChildRef("Job", "llm-r1"))


@pytest.mark.parametrize("before, outcome, reason_after, events", [
    # a new refusal: reported, one event
    ([], ApplyOutcome((ChildRef("Service", "llm"),), ChildRejected("Job", "llm-r1", "env[0].name: Required value")),
     "ChildRejected", ["ChildRejected"]),
    # the same refusal again: no new event
    ([REFUSED], ApplyOutcome((), ChildRejected("Job", "llm-r1", "env[0].name: Required value")),
     "ChildRejected", []),
    # no Job in this apply (suspended, finished): the refusal is not over
    ([REFUSED], ApplyOutcome((ChildRef("Service", "llm"),)), "ChildRejected", []),
    # the Job accepted: over
    ([REFUSED], ApplyOutcome(ACCEPTED_ALL), None, []),
    # a conflict: reported once, and over when every planned child is applied
    ([], ApplyOutcome((), conflict=ChildConflict("ServiceAccount", "forge-trainer-llm", "no owner reference")),
     "ChildConflict", ["ChildConflict"]),
    ([{**REFUSED, "reason": "ChildConflict"}], ApplyOutcome((ChildRef("Service", "llm"),)), None, []),
    # an invalid spec is the planner's business, not the apply's
    ([{**REFUSED, "reason": "InvalidSpec"}], ApplyOutcome(ACCEPTED_ALL), "InvalidSpec", []),
])
def test_apply_outcomes_on_the_invalid_condition(before, outcome, reason_after, events):
    plan = Plan(status={"observedGeneration": 1, "conditions": copy.deepcopy(before)},
                apply=[{"kind": r.kind, "metadata": {"name": r.name}} for r in outcome.accepted])
    record_apply_outcome(plan, {"conditions": before}, outcome, NOW)
    invalid = next((c for c in plan.status["conditions"] if c["type"] == "Invalid"), None)
    assert (invalid or {}).get("reason") == reason_after
    assert [e.reason for e in plan.events] == events



def test_set_condition_keeps_transition_time_when_status_unchanged():
    first = C.set_condition([], "Running", True, "A", "m", NOW)
    second = C.set_condition(first, "Running", True, "B", "m2", NOW + timedelta(hours=1))
    assert second[0]["lastTransitionTime"] == first[0]["lastTransitionTime"] and second[0]["reason"] == "B"
    third = C.set_condition(second, "Running", False, "C", "m3", NOW + timedelta(hours=2))
    assert third[0]["lastTransitionTime"] == "2026-11-22T14:00:00Z"


@pytest.mark.parametrize("peers, outranked", [
    ({}, False),
    ({"me": {"priority": 50, "lifetime": 60, "lastseen": "2026-11-22T11:59:30+00:00"}}, False),
    ({"other": {"priority": 90, "lifetime": 60, "lastseen": "2026-11-22T11:59:30+00:00"}}, True),
    ({"other": {"priority": 90, "lifetime": 60, "lastseen": "2026-11-22T11:58:00+00:00"}}, False),  # dead
    ({"other": {"priority": 10, "lifetime": 60, "lastseen": "2026-11-22T11:59:30"}}, False),
])
def test_a_replica_outranked_by_a_live_peer_stands_down(peers, outranked):
    assert check(peers, 50, NOW) is outranked
