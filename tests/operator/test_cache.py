"""The reads the planners make, answered from the caches (pure: kopf's index is a mapping of stores), and the
runtime's coalescing of triggers of one object."""

from __future__ import annotations

import json
from unittest import mock

import pytest

from forge_operator.k8s.cache import CachedReader, IndexedKind, Informer, PerNamespace, parse_selector
from forge_operator.k8s.objects import NotAllowed


def pod(name: str, training: str, **labels: str) -> dict:
    return {"metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "forge",
                                                  "forge.dev/training": training, **labels}}}


class Api:
    """Records what reaches the API (anything the caches do not answer)."""

    def __init__(self):
        self.calls = []

    def get(self, *args, **kw):
        self.calls.append(("get", args))
        return None

    def list(self, *args, **kw):
        self.calls.append(("list", args))
        return []


def test_parse_selector_takes_equality_and_existence_only():
    assert parse_selector("a=b, c,d==e") == {"a": "b", "c": None, "d": "e"}
    assert parse_selector("a!=b") is None
    assert parse_selector("a in (b)") is None


def test_children_come_from_the_index_of_their_training_and_the_rest_from_the_api():
    pods = IndexedKind("forge.dev/training")
    pods.index = {("ns", "llm"): [pod("a", "llm", **{"forge.dev/attempt": "0"}),
                                  pod("b", "llm", **{"forge.dev/attempt": "1"})],
                  ("ns", "other"): [pod("c", "other")]}
    api = Api()
    reader = CachedReader(api, {("v1", "Pod"): pods})
    sel = "app.kubernetes.io/managed-by=forge,forge.dev/training=llm"
    assert [p["metadata"]["name"] for p in reader.list("v1", "Pod", "ns", sel)] == ["a", "b"]
    assert [p["metadata"]["name"] for p in reader.list("v1", "Pod", "ns", sel + ",forge.dev/attempt=1")] == ["b"]
    assert reader.list("v1", "Pod", "elsewhere", sel) == []
    assert api.calls == []
    reader.list("v1", "Pod", "ns", "app=x")  # names no training: the API answers
    reader.list("v1", "Event", "ns", field_selector="reason=FailedCreate")
    assert [c[1][1] for c in api.calls] == ["Pod", "Event"]


def test_before_kopf_hands_over_its_index_the_api_answers():
    api = Api()
    CachedReader(api, {("v1", "Pod"): IndexedKind("forge.dev/training")}).list("v1", "Pod", "ns", "forge.dev/training=x")
    assert api.calls == [("list", ("v1", "Pod", "ns", "forge.dev/training=x", ""))]


class Listing:
    """A list function as the kubernetes client's: the raw response of one LIST."""

    def __init__(self, items: list[dict]):
        self.items, self.calls = items, []

    def __call__(self, *args, **kw):
        self.calls.append((args, kw))
        data = json.dumps({"metadata": {"resourceVersion": "7"}, "items": self.items})
        return type("Response", (), {"data": data})()


def listed(informer: Informer) -> Informer:
    informer._relist()  # what its thread does first
    return informer


def test_informers_answer_the_reads_they_cover_and_nothing_else():
    slices = Listing([{"metadata": {"name": "kubernetes", "namespace": "default",
                                    "labels": {"kubernetes.io/service-name": "kubernetes"}}}])
    api_server = listed(Informer(slices, "default", label_selector="kubernetes.io/service-name=kubernetes"))
    assert slices.calls == [(("default",), {"_preload_content": False,
                                            "label_selector": "kubernetes.io/service-name=kubernetes"})]
    services = listed(Informer(Listing([{"metadata": {"name": "scorer", "namespace": "rewards"}, "spec": {}}])))
    api = Api()
    reader = CachedReader(api, {}, {("discovery.k8s.io/v1", "EndpointSlice"):
                                    lambda ns: api_server if ns == "default" else None,
                                    ("v1", "Service"): lambda ns: services if ns == "rewards" else None})
    sel = "kubernetes.io/service-name=kubernetes"
    assert [s["metadata"]["name"] for s in reader.list("discovery.k8s.io/v1", "EndpointSlice", "default", sel)] == [
        "kubernetes"]
    assert reader.get("v1", "Service", "scorer", "rewards")["metadata"]["name"] == "scorer"
    assert reader.get("v1", "Service", "gone", "rewards") is None  # the informer holds every Service there
    assert api.calls == []
    reader.list("discovery.k8s.io/v1", "EndpointSlice", "default", "app=other")  # not what the informer holds
    reader.list("discovery.k8s.io/v1", "EndpointSlice", "kube-system", sel)  # nor where
    reader.get("v1", "Service", "scorer", "elsewhere")
    assert [(c[0], c[1][1], c[1][2]) for c in api.calls] == [
        ("list", "EndpointSlice", "default"), ("list", "EndpointSlice", "kube-system"), ("get", "Service", "scorer")]


def test_a_namespace_is_watched_from_its_first_read_on():
    made = []

    def make(ns):
        made.append(ns)
        return Informer(Listing([]), ns)

    per_namespace = PerNamespace(make)
    with mock.patch.object(Informer, "start", lambda self: self):
        assert per_namespace("a") is per_namespace("a") and per_namespace("b") is not None
        assert per_namespace("") is None
    assert made == ["a", "b"]


def test_an_informer_refused_reads_as_the_api_would():
    informer = Informer(Listing([]))
    informer.allowed = False
    with pytest.raises(NotAllowed):
        informer.get("x")
