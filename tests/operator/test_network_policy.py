"""The NetworkPolicy of spec.network.egress Restricted: what it allows (pure), and on the test control plane
that the operator applies it and deletes it when the spec turns egress Unrestricted.

The test API server stores NetworkPolicies but nothing enforces them (no network plugin): the control-plane
test checks the object, not the traffic."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from forge_operator.api.names import METRICS_PORT
from forge_operator.api.training import ForgeTraining
from forge_operator.k8s.network import NetworkSeen
from forge_operator.training.children import WorkerState, build_network_policy, desired_children
from forge_operator.k8s.objects import NotAllowed
from forge_operator.training.observe import Observed, read
from forge_operator.training.planner import plan_training
from forge_operator.training.translate import trainer_config
from operator_support import NOW, obj, training

ROOT = Path(__file__).resolve().parents[2]
WORKERS = {"app.kubernetes.io/managed-by": "forge-operator", "app.kubernetes.io/name": "forge-trainer",
           "forge.dev/training": "llm"}
OWN_PODS = {"podSelector": {"matchLabels": WORKERS}}
DNS = {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
API_SERVER_SLICE = {"metadata": {"name": "kubernetes", "namespace": "default"}, "addressType": "IPv4",
                    "endpoints": [{"addresses": ["172.18.0.3"]}, {"addresses": ["172.18.0.2"]}],
                    "ports": [{"name": "https", "protocol": "TCP", "port": 6443}]}
SCORER = {"metadata": {"name": "scorer", "namespace": "rewards"},
          "spec": {"selector": {"app": "scorer"}, "ports": [{"port": 8080, "targetPort": "http", "protocol": "TCP"}]}}


def grpo(name: str = "llm", *urls: str) -> dict:
    manifest = yaml.safe_load((ROOT / "examples" / "grpo.yaml").read_text())
    manifest["metadata"] = {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 1}
    manifest["spec"]["rewards"] += [{"name": f"http-{i}", "http": {"url": url}} for i, url in enumerate(urls)]
    return manifest


def policy_of(manifest: dict, seen: NetworkSeen) -> dict:
    ft = ForgeTraining.model_validate(manifest)
    [policy] = [c for c in desired_children(ft, trainer_config(ft).to_yaml(), WorkerState(), network=seen)
                if c["kind"] == "NetworkPolicy"]
    return policy


def test_the_policy_allows_the_group_dns_the_api_server_and_the_reward_services():
    manifest = grpo("llm", "http://scorer.rewards.svc:8080/score", "https://judge.team.svc.cluster.local/v1",
                    "http://10.0.0.7:9000/score", "http://scorer.rewards.svc:8080/other", "http://local:8000/",
                    "https://api.example.com/score")
    seen = NetworkSeen(api_server=(API_SERVER_SLICE,),
                       services={("rewards", "scorer"): SCORER, ("team", "judge"): None, ("ns", "local"): None})
    policy = policy_of(manifest, seen)
    assert policy["metadata"]["name"] == "llm" and policy["metadata"]["labels"] == WORKERS
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert policy["spec"] == {
        "podSelector": {"matchLabels": WORKERS},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [OWN_PODS]}, {"ports": [{"protocol": "TCP", "port": METRICS_PORT}]}],
        "egress": [
            {"to": [OWN_PODS]},
            DNS,
            {"to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}, {"ipBlock": {"cidr": "172.18.0.3/32"}}],
             "ports": [{"protocol": "TCP", "port": 6443}]},
            # the Service was read: its pods, on the target port of the URL's port
            {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "rewards"}},
                     "podSelector": {"matchLabels": {"app": "scorer"}}}],
             "ports": [{"protocol": "TCP", "port": "http"}]},
            # not readable: the URL's port (443 for https) to any pod of its namespace
            {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "team"}}}],
             "ports": [{"protocol": "TCP", "port": 443}]},
            {"to": [{"ipBlock": {"cidr": "10.0.0.7/32"}}], "ports": [{"protocol": "TCP", "port": 9000}]},
            # a Service's name alone: in the training's namespace (api.example.com cannot be expressed)
            {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns"}}}],
             "ports": [{"protocol": "TCP", "port": 8000}]},
        ],
    }


def test_the_services_read_are_those_the_reward_urls_name():
    from forge_operator.k8s.network import url_services
    urls = ["http://scorer.rewards.svc:8080/a", "http://scorer.rewards.svc.cluster.local/b", "http://judge/",
            "http://10.0.0.7/", "https://api.example.com/", "http://localhost:8000/", "http://[::1]:80/"]
    assert url_services(urls, "ns") == [("rewards", "scorer"), ("ns", "judge")]


class Reader:
    """What the API server answers the operator: ``denied`` kinds answer 403."""

    def __init__(self, objects: dict, denied: set[str] = frozenset()):
        self.objects, self.denied, self.calls = objects, denied, []

    def list(self, api_version, kind, namespace, label_selector="", field_selector=""):
        self.calls.append(("list", kind, namespace, label_selector))
        if kind in self.denied:
            raise NotAllowed(kind)
        return [o for (k, ns, _), o in self.objects.items() if k == kind and ns == namespace]

    def get(self, api_version, kind, name, namespace=None):
        self.calls.append(("get", kind, namespace, name))
        if kind in self.denied:
            raise NotAllowed(kind)
        return self.objects.get((kind, namespace, name))


def test_observe_reads_the_api_servers_slices_and_the_reward_services_only_with_egress_restricted():
    manifest = grpo("llm", "http://scorer.rewards.svc:8080/score", "http://judge:8000/")
    objects = {("EndpointSlice", "default", "kubernetes"): API_SERVER_SLICE, ("Service", "rewards", "scorer"): SCORER}
    seen = read(Reader(objects), manifest, NOW).network
    assert seen == NetworkSeen(api_server=(API_SERVER_SLICE,),
                               services={("rewards", "scorer"): SCORER, ("ns", "judge"): None})
    denied = read(Reader(objects, {"EndpointSlice", "Service"}), manifest, NOW).network
    assert denied == NetworkSeen(api_server=None, services={("rewards", "scorer"): None, ("ns", "judge"): None})
    manifest["spec"]["network"] = {"egress": "Unrestricted"}
    reader = Reader(objects)
    assert read(reader, manifest, NOW).network == NetworkSeen()
    assert ("get", "NetworkPolicy", "ns", "llm") in reader.calls and not any(c[1] == "EndpointSlice" for c in reader.calls)


def test_without_the_api_servers_endpoints_the_policy_allows_its_usual_ports_anywhere():
    policy = policy_of(obj(), NetworkSeen(api_server=None))
    assert policy["spec"]["egress"] == [{"to": [OWN_PODS]}, DNS, {"ports": [{"protocol": "TCP", "port": 443},
                                                                            {"protocol": "TCP", "port": 6443}]}]


def test_an_ipv6_api_server_is_one_address():
    slice_ = copy.deepcopy(API_SERVER_SLICE) | {"addressType": "IPv6", "endpoints": [{"addresses": ["fd00::1"]}]}
    ft = ForgeTraining.model_validate(obj())
    assert build_network_policy(ft, NetworkSeen(api_server=(slice_,)))["spec"]["egress"][2] == {
        "to": [{"ipBlock": {"cidr": "fd00::1/128"}}], "ports": [{"protocol": "TCP", "port": 6443}]}


def test_the_policy_is_applied_before_the_workers_and_only_when_egress_is_restricted():
    ft = ForgeTraining.model_validate(obj())
    kinds = [c["kind"] for c in desired_children(ft, trainer_config(ft).to_yaml(), WorkerState())]
    assert kinds.index("NetworkPolicy") < kinds.index("Job")
    open_ = ForgeTraining.model_validate(obj(network={"egress": "Unrestricted"}))
    assert "NetworkPolicy" not in [c["kind"] for c in desired_children(open_, "", WorkerState())]


def test_the_planner_applies_the_policy_from_what_it_read_and_deletes_it_once_egress_is_unrestricted():
    seen = NetworkSeen(api_server=(API_SERVER_SLICE,))
    plan = plan_training(obj(), Observed(now=NOW, network=seen))
    [policy] = plan.applies("NetworkPolicy")
    assert policy["spec"]["egress"][2]["ports"] == [{"protocol": "TCP", "port": 6443}]
    assert not plan.deleted("NetworkPolicy")

    existing = {"metadata": {"name": "llm", "ownerReferences": [{"uid": "uid-1"}]}}
    plan = plan_training(obj(network={"egress": "Unrestricted"}), Observed(now=NOW, network_policy=existing))
    assert not plan.applies("NetworkPolicy") and plan.deleted("NetworkPolicy") == ["llm"]


# --------------------------------------------------------------------------- on the test control plane
def api_server_rules(kube) -> list[dict]:
    """What the policy should allow to reach the API server, from its EndpointSlices in `default` now."""
    slices = json.loads(kube.cluster.kubectl("-n", "default", "get", "endpointslices", "-l",
                                             "kubernetes.io/service-name=kubernetes", "-o", "json").stdout)["items"]
    if not slices:
        return [{"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]}]
    return [{"to": [{"ipBlock": {"cidr": f"{a}/32"}} for a in sorted({a for e in s["endpoints"] for a in e["addresses"]})],
             "ports": [{"protocol": p["protocol"], "port": p["port"]} for p in s["ports"]]} for s in slices]


def the_policy(kube, egress: list[dict]):
    def check():
        items = kube.get("networkpolicies")["items"]
        return items[0] if items and items[0]["spec"]["egress"] == egress else None
    return check


@pytest.mark.cluster
def test_the_operator_applies_the_policy_and_deletes_it_when_egress_is_unrestricted(kube, operator):
    """The test API server runs without its endpoint reconciler, so at first the `kubernetes` Service has no
    EndpointSlice (the fallback ports); then one is published as a real API server does."""
    kube.apply(training("llm", resources={"numNodes": 1, "gpusPerNode": 0}))
    policy = kube.wait_for("the NetworkPolicy", the_policy(kube, [{"to": [OWN_PODS]}, DNS, *api_server_rules(kube)]))
    assert policy["metadata"]["name"] == "llm"
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "ForgeTraining"
    assert policy["spec"]["podSelector"] == {"matchLabels": WORKERS}
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == [{"from": [OWN_PODS]},
                                         {"ports": [{"protocol": "TCP", "port": METRICS_PORT}]}]
    pods = kube.wait_for("a worker pod", lambda: kube.get("pods", selector="forge.dev/training=llm")["items"])
    assert WORKERS.items() <= pods[0]["metadata"]["labels"].items()  # the workers are what it selects

    slice_ = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
              "metadata": {"name": f"apiserver-{kube.namespace}"[:63], "namespace": "default",
                           "labels": {"kubernetes.io/service-name": "kubernetes"}},
              "endpoints": [{"addresses": ["192.0.2.10"]}], "ports": [{"name": "https", "protocol": "TCP", "port": 6443}]}
    kube.cluster.kubectl("apply", "-f", "-", input=json.dumps(slice_))
    try:
        rules = api_server_rules(kube)
        assert {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}], "ports": [{"protocol": "TCP", "port": 6443}]} in rules
        kube.wait_for("the API server's address in the policy", the_policy(kube, [{"to": [OWN_PODS]}, DNS, *rules]))
    finally:
        kube.cluster.kubectl("-n", "default", "delete", "endpointslice", slice_["metadata"]["name"])

    kube("patch", "forgetraining", "llm", "--type=merge", "-p", json.dumps({"spec": {"network": {"egress": "Unrestricted"}}}))
    kube.wait_for("the NetworkPolicy deleted", lambda: not kube.get("networkpolicies")["items"])
