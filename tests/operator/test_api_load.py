"""The operator's load on the API server, counted by the API server itself (``apiserver_request_total`` and
``apiserver_watch_events_total`` on its /metrics): its watches carry only its own children, it reads them
from its caches (no LIST of pods or Jobs, no GET of a Node per reconcile), and what one reconcile costs
does not grow with the number of trainings or of other pods in the namespace."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter

import pytest

from devcluster import DevCluster
from kubetest import Kube
from operator_support import ROOT, OperatorProcess, create_pvcs, training
from test_lifecycle import running_workers

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} ([0-9.e+-]+)$')
# Requests only the operator makes on this control plane (the controllers, the scheduler and kwok read
# through their informers and write pods and Job status, never these): its reads of trainings and children,
# its writes of training status and of children, its LISTs, its GETs of Nodes.
OPERATOR = {("GET", "forgetrainings", ""), ("UPDATE", "forgetrainings", "status"), ("APPLY", "jobs", ""),
            ("APPLY", "services", ""), ("APPLY", "configmaps", ""), ("APPLY", "serviceaccounts", ""),
            ("GET", "jobs", ""), ("GET", "services", ""), ("GET", "configmaps", ""),
            ("LIST", "pods", ""), ("LIST", "jobs", ""), ("LIST", "events", ""), ("GET", "nodes", ""),
            ("LIST", "endpointslices", ""), ("APPLY", "roles", ""), ("APPLY", "rolebindings", ""),
            ("APPLY", "networkpolicies", "")}
# the children every reconcile of a running training would apply: applied only when they would change
CHILDREN_APPLIED = [("APPLY", kind, "") for kind in ("services", "serviceaccounts", "roles", "rolebindings",
                                                      "networkpolicies")]


@pytest.fixture(scope="module")
def quiet_kube(tmp_path_factory):
    """A control plane of its own: the counters are the API server's, for every client, and on the shared
    one the namespace controller's clean-up of earlier tests' namespaces (a LIST of every kind in each)
    would be counted with the operator's requests."""
    c = DevCluster(tmp_path_factory.mktemp("api-load-controlplane"), gpu_nodes=4)
    c.up()
    try:
        c.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        c.wait_established("crd/forgetrainings.forge.dev", "crd/forgeevals.forge.dev")
        ns = f"api-load-{uuid.uuid4().hex[:6]}"
        c.kubectl("create", "namespace", ns)
        kube = Kube(c, ns)
        kube.wait_for("default ServiceAccount", lambda: kube("get", "sa", "default", check=False).returncode == 0)
        yield kube
    finally:
        c.down()


def scrape(kube, metric: str) -> Counter:
    """One counter of the API server's /metrics, summed by (verb, resource, subresource)."""
    text = kube.cluster.kubectl("get", "--raw", "/metrics").stdout
    out: Counter = Counter()
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m or m.group(1) != metric:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        out[labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", "")] += float(m.group(3))
    return out


def requests(kube) -> Counter:
    return scrape(kube, "apiserver_request_total")


def pod_watch_events(kube) -> float:
    return sum(v for (_, resource, _), v in scrape(kube, "apiserver_watch_events_total").items() if resource == "pods")


def other_pods(kube, prefix: str, count: int) -> list[str]:
    """Pods that are not the operator's (one carries a training's label but not our managed-by label); a node
    selector no node matches keeps them Pending, so all they do is what the test does to them."""
    names = [f"{prefix}-{i}" for i in range(count)]
    labels = [{"app": "other"}, {"forge.dev/training": "llm-0", "app": "imposter"}]
    kube.apply({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": n, "labels": labels[i % 2]},
         "spec": {"nodeSelector": {"forge.dev/no-such-node": "x"},
                  "containers": [{"name": "c", "image": "busybox:1"}]}} for i, n in enumerate(names)]})
    return names


def touch(kube, names: list[str], value: str) -> None:
    """One change of each named pod: one watch event each, for every watcher that sees it."""
    kube("annotate", "--overwrite", "pods", *names, f"forge.test/touched={value}")


def small(i: int) -> dict:
    return training(f"llm-{i}", resources={"numNodes": 2, "gpusPerNode": 1})


def measure(kube, workers: list[str], rounds: int) -> tuple[Counter, float]:
    """Change each worker pod ``rounds`` times and wait for the operator to settle; the operator's requests
    meanwhile, and the reconciles they were (each reads its training once). A round of changes first, not
    counted: the reconciles that start a training (its children applied while the watches that will
    hold them list and deliver them) are over before the count starts."""
    touch(kube, workers, f"warm-{len(workers)}")
    kube.wait_for("the operator settled", _settled(kube), timeout=60)
    before = requests(kube)
    for r in range(rounds):
        touch(kube, workers, f"{r}-{len(workers)}")
    settled = kube.wait_for("the operator settled", _settled(kube), timeout=60)
    delta = Counter({k: settled[k] - before[k] for k in OPERATOR if settled[k] - before[k]})
    return delta, delta[("GET", "forgetrainings", "")]


def _settled(kube):
    """A predicate: the API server's request counters, once the operator read no training for 1.5 s."""
    def check():
        n = requests(kube)[("GET", "forgetrainings", "")]
        time.sleep(1.5)
        again = requests(kube)
        return again if again[("GET", "forgetrainings", "")] == n else None
    return check


def test_per_reconcile_requests_do_not_grow_with_other_pods_or_trainings(quiet_kube, tmp_path):
    kube = quiet_kube
    create_pvcs(kube, "corpus", "ckpt", "models")
    # a long resync: only events trigger reconciles in the measured windows
    op = OperatorProcess(kube.kubeconfig, [kube.namespace], tmp_path / "operator.log", resync=3600).start()
    try:
        kube.apply(small(0))
        workers = [p["metadata"]["name"] for p in kube.wait_for("llm-0 runs", running_workers(kube, "llm-0", 2, 0))]
        one, reconciles_one = measure(kube, workers, rounds=2)

        others = other_pods(kube, "other", 40)
        for i in range(1, 4):
            kube.apply(small(i))
        for i in range(1, 4):
            workers += [p["metadata"]["name"] for p in
                        kube.wait_for(f"llm-{i} runs", running_workers(kube, f"llm-{i}", 2, 0))]
        many, reconciles_many = measure(kube, workers, rounds=2)

        # 40 other pods changed twice: their events never reach the operator's watch
        watched = pod_watch_events(kube)
        for r in range(2):
            touch(kube, others, f"o{r}")
        kube.wait_for("the operator settled", _settled(kube), timeout=60)
        per_event_with_operator = (pod_watch_events(kube) - watched) / (2 * len(others))
    finally:
        op.stop()
        print(op.log()[-4000:])
    # the same changes with the operator stopped: the watchers that remain (scheduler, controllers, kwok)
    watched = pod_watch_events(kube)
    for r in range(2):
        touch(kube, others, f"s{r}")
    per_event_without = (pod_watch_events(kube) - watched) / (2 * len(others))

    print(json.dumps({"one training": {str(k): v for k, v in one.items()}, "reconciles": reconciles_one,
                      "four trainings and 40 other pods": {str(k): v for k, v in many.items()},
                      "reconciles ": reconciles_many,
                      "pod watch events per other pod's change": [per_event_with_operator, per_event_without]},
                     indent=1))
    for delta in (one, many):
        assert not any(delta[k] for k in (("LIST", "pods", ""), ("LIST", "jobs", ""), ("GET", "nodes", ""),
                                          ("LIST", "endpointslices", ""), *CHILDREN_APPLIED)), delta
    assert reconciles_one >= 2 and reconciles_many >= 8
    per_reconcile_one = sum(one.values()) / reconciles_one
    per_reconcile_many = sum(many.values()) / reconciles_many
    assert per_reconcile_many <= per_reconcile_one + 0.5, (per_reconcile_one, per_reconcile_many)
    assert per_event_with_operator == pytest.approx(per_event_without, abs=0.05)
