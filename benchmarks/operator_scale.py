"""The operator at scale: many ForgeTrainings on many kwok nodes, against bare Indexed Jobs as the floor.

Starts its own control plane (the test suite's: etcd, kube-apiserver, controller-manager, scheduler, kwok
with fake 8-GPU nodes; binaries cached in ~/.cache/forge), then in one run:

1. floor: T Indexed Jobs of N pods with a headless Service each (what a training is without Forge), created
   at --rate per second, until every pod runs, then a quiet window;
2. forge: the operator (a real `forge operator` process, default resync, its watches ready first) and T
   ForgeTrainings of N nodes x 8 GPUs created at the same rate, until every worker runs and every training
   is Running, then the same window; then one worker fails in F trainings at once.

It prints the time until everything runs; per object the time from its create until its workers run and
(trainings) until its status says Running, p50/p95/p99; the API server's requests
(``apiserver_request_total``, less this script's own) per training until all run and per training per
minute in the steady window (all clients, and the operator's alone); the operator's reconcile p50/p99 (its
``forge_operator_reconcile_duration_seconds`` histogram), CPU seconds and peak RSS; and how long the
operator took to record the failed workers' restarts and to have the new groups running.

    .venv/bin/python benchmarks/operator_scale.py                        # 10 trainings, 20 nodes (minutes)
    .venv/bin/python benchmarks/operator_scale.py --trainings 200 --nodes 500 --rate 5 --failures 20
    .venv/bin/python benchmarks/operator_scale.py ... --source DIR      # the operator of another checkout
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from statistics import median

import kubernetes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "controlplane"))
sys.path.insert(0, str(ROOT / "tests" / "operator"))
sys.path.insert(0, str(ROOT / "operator"))

from devcluster import GPU_RESOURCE, GPU_TAINT, KWOK_EXIT_CODE_ANNOTATION, DevCluster  # noqa: E402
from forge_operator.api.base import GROUP, VERSION  # noqa: E402
from forge_operator.api.names import LABEL_ATTEMPT, LABEL_TRAINING  # noqa: E402
from forge_operator.training.reconciler import PLURAL  # noqa: E402
from operator_support import training  # noqa: E402

EXIT_CODE_ANNOTATION = KWOK_EXIT_CODE_ANNOTATION
LABEL_INDEX = "batch.kubernetes.io/job-completion-index"

GET_NODES = ("GET", "nodes", "")
SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} ([0-9.e+-]+)$')
# requests only the operator makes here (the controllers, the scheduler and kwok use informers and write
# pods and Job status, never these)
OPERATOR = {(verb, resource, "") for verb in ("GET", "APPLY", "LIST") for resource in (
    "jobs", "services", "configmaps", "serviceaccounts", "roles", "rolebindings", "networkpolicies")} | {
    ("GET", "forgetrainings", ""), ("UPDATE", "forgetrainings", "status"), ("LIST", "forgetrainings", ""),
    ("LIST", "forgeevals", ""), ("LIST", "pods", ""), ("LIST", "events", ""), ("GET", "nodes", ""),
    ("LIST", "nodes", ""), ("LIST", "endpointslices", "")}


def metrics(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1) == name:
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))), float(m.group(3))))
    return out


class Bench:
    """Drives the cluster through the Python client and counts its own requests, which are taken out of the
    API server's counts: what is left is what the controllers, kwok and the operator asked for."""

    def __init__(self, cluster: DevCluster, window: float):
        self.c, self.window = cluster, window
        api = kubernetes.config.new_client_from_config(cluster.state.kubeconfig)
        self.core, self.batch = kubernetes.client.CoreV1Api(api), kubernetes.client.BatchV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.own: Counter = Counter()  # (verb, resource, subresource) of this script's requests

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.c.kubectl(*args, input=input).stdout

    def requests(self) -> Counter:
        """The API server's request counts by (verb, resource, subresource), less this script's own."""
        out: Counter = Counter()
        for labels, v in metrics(self.kubectl("get", "--raw", "/metrics"), "apiserver_request_total"):
            if labels.get("verb") not in ("WATCH", "CONNECT"):
                out[labels["verb"], labels.get("resource", ""), labels.get("subresource", "")] += v
        out.subtract(self.own)
        self.own["GET", "", ""] += 1  # this read of /metrics
        return out

    def pods(self, ns: str) -> list[dict]:
        self.own["LIST", "pods", ""] += 1
        return self.core.list_namespaced_pod(ns, _preload_content=False).json()["items"]

    def running_pods(self, ns: str) -> int:
        return sum(1 for p in self.pods(ns) if p["status"].get("phase") == "Running")

    def trainings(self) -> dict[str, dict]:
        """Each training's status, by name."""
        self.own["LIST", "forgetrainings", ""] += 1
        items = self.custom.list_namespaced_custom_object(GROUP, VERSION, "forge", PLURAL)["items"]
        return {f["metadata"]["name"]: f.get("status") or {} for f in items}

    def wait(self, what: str, ok, since: float | None = None, timeout: float = 1800, interval: float = 0.2) -> float:
        """Seconds from ``since`` (default: now) until ``ok()``."""
        start = time.monotonic() if since is None else since
        while not ok():
            if time.monotonic() - start > timeout:
                raise TimeoutError(what)
            time.sleep(interval)
        return time.monotonic() - start

    def create(self, ns: str, items: list[dict]) -> None:
        """Creates each object with one request, as ``kubectl create`` does (those requests count)."""
        for item in items:
            if item["kind"] == "Service":
                self.core.create_namespaced_service(ns, item)
            elif item["kind"] == "Job":
                self.batch.create_namespaced_job(ns, item)
            else:
                self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, item)

    def annotate(self, ns: str, pod: str, annotations: dict[str, str]) -> None:
        self.own["PATCH", "pods", ""] += 1
        self.core.patch_namespaced_pod(pod, ns, {"metadata": {"annotations": annotations}})


def floor_objects(n: int, workers: int, gpus: int) -> list[dict]:
    items = []
    for i in range(n):
        name = f"job-{i}"
        items.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                      "spec": {"clusterIP": "None", "selector": {"job-name": name}}})
        items.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {
            "completions": workers, "parallelism": workers, "completionMode": "Indexed", "backoffLimit": 0,
            "template": {"spec": {
                "subdomain": name, "restartPolicy": "Never", "tolerations": [{**GPU_TAINT, "operator": "Equal"}],
                "containers": [{"name": "worker", "image": "forge-trainer:bench",
                                "resources": {"limits": {GPU_RESOURCE: str(gpus)}}}]}}}})
    return items


def claims(ns: str) -> list[dict]:
    items = []
    for claim in ("corpus", "ckpt", "models"):
        pv = f"{ns}-{claim}"
        items.append({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                      "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteMany"],
                               "storageClassName": "", "hostPath": {"path": f"/tmp/forge-bench/{pv}"},
                               "claimRef": {"namespace": ns, "name": claim}}})
        items.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
                      "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                               "resources": {"requests": {"storage": "100Gi"}}}})
    return items


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of sorted values."""
    return values[min(len(values), max(1, math.ceil(q / 100 * len(values)))) - 1] if values else float("nan")


def total(delta: Counter, keys) -> float:
    return sum(v for k, v in delta.items() if keys is None or k in keys)


def per_minute(delta: Counter, keys, n: int, seconds: float) -> float:
    return total(delta, keys) / n / (seconds / 60)


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """A quantile of a Prometheus histogram (upper bound, cumulative count), interpolated in its bucket."""
    total = buckets[-1][1]
    if not total:
        return float("nan")
    rank, lo, below = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * ((rank - below) / max(count - below, 1e-9))
        lo, below = le, count
    return lo


def reconcile_quantiles(port: int) -> tuple[float, float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    buckets = sorted((float(l["le"]), v) for l, v in metrics(text, "forge_operator_reconcile_duration_seconds_bucket")
                     if l.get("kind") == "ForgeTraining")
    count = sum(v for l, v in metrics(text, "forge_operator_reconcile_duration_seconds_count")
                if l.get("kind") == "ForgeTraining")
    return quantile(buckets, 0.5), quantile(buckets, 0.99), count


def serving(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except OSError:
        return False


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the peak resident set
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """Creates objects at a fixed rate in a thread of its own while the caller polls, and keeps, per name,
    when it was created, when all its workers ran and (trainings) when its status said Running."""

    def __init__(self, b: Bench, ns: str, items: list[dict], rate: float):
        self.b, self.ns, self.items, self.rate = b, ns, items, rate
        self.names = [i["metadata"]["name"] for i in items if i["kind"] != "Service"]
        self.created: dict[str, float] = {}
        self.pods_running: dict[str, float] = {}
        self.status_running: dict[str, float] = {}
        self._thread = threading.Thread(target=self._create, daemon=True)

    def _create(self) -> None:
        """One training, or one Job with its Service, every 1/rate seconds."""
        t0, unit = time.monotonic(), 0
        for item in self.items:
            if self.rate and (due := t0 + unit / self.rate - time.monotonic()) > 0:
                time.sleep(due)
            self.b.create(self.ns, [item])
            if item["kind"] != "Service":
                self.created[item["metadata"]["name"]] = time.monotonic()
                unit += 1

    def run(self, workers: int, owner_label: str, trainings: bool) -> float:
        """Seconds from the first create until every object's workers (and status) say Running."""
        t0 = time.monotonic()
        self._thread.start()

        def done() -> bool:
            now = time.monotonic()
            running = Counter(p["metadata"]["labels"].get(owner_label) for p in self.b.pods(self.ns)
                              if p["status"].get("phase") == "Running")
            for name in self.created.keys() - self.pods_running.keys():
                if running[name] >= workers:
                    self.pods_running[name] = now
            if trainings:
                for name, status in self.b.trainings().items():
                    if name not in self.status_running and status.get("phase") == "Running":
                        self.status_running[name] = now
            return len(self.pods_running) == len(self.names) and (
                not trainings or len(self.status_running) == len(self.names))

        up = self.b.wait(f"{self.ns}: all running", done, since=t0)
        self._thread.join()
        return up

    def latencies(self, reached: dict[str, float]) -> list[float]:
        return sorted(reached[n] - self.created[n] for n in self.names)


def run_floor(b: Bench, n: int, workers: int, gpus: int, rate: float) -> dict:
    b.kubectl("create", "namespace", "floor")
    before = b.requests()
    t0 = time.monotonic()
    launch = Launch(b, "floor", floor_objects(n, workers, gpus), rate)
    up = launch.run(workers, "job-name", trainings=False)
    started = b.requests()
    start_seconds = time.monotonic() - t0
    time.sleep(b.window)
    steady = b.requests()
    result = {"seconds to running": up, "start": started - before, "start seconds": start_seconds,
              "steady": steady - started, "pods running": launch.latencies(launch.pods_running)}
    b.kubectl("delete", "namespace", "floor", "--wait=true", "--timeout=600s")
    return result


def bench_training(i: int, workers: int, gpus: int) -> dict:
    # a failed worker restarts the group at once (no backoff): the recovery time is the operator's own
    return training(f"llm-{i}", resources={"numNodes": workers, "gpusPerNode": gpus},
                    failurePolicy={"backoffSeconds": 0})


def run_forge(b: Bench, n: int, workers: int, gpus: int, rate: float, failures: int, source: Path = ROOT) -> dict:
    b.kubectl("create", "namespace", "forge")
    b.kubectl("apply", "-n", "forge", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": claims("forge")}))
    port, health = free_port(), f"http://127.0.0.1:{free_port()}/healthz"
    env = os.environ | {"KUBECONFIG": b.c.state.kubeconfig, "FORGE_METRICS_PORT": str(port),
                        "FORGE_HEALTH_ENDPOINT": health, "FORGE_TRAINER_IMAGE": "forge-trainer:bench",
                        "PYTHONPATH": f"{source / 'operator'}:{source / 'trainer-image'}"}
    log = open(Path(b.c.dir) / "logs" / "operator.log", "ab")
    op = subprocess.Popen([sys.executable, "-m", "forge_operator", "operator", "--namespace", "forge"],
                          env=env, stdout=log, stderr=subprocess.STDOUT, cwd=source)
    try:
        # kopf's liveness endpoint answers once the startup handler and the login are done; the watches
        # start right after
        b.wait("the operator", lambda: serving(health), timeout=300)
        time.sleep(2)
        before = b.requests()
        cpu_before = cpu_seconds(op.pid)
        t0 = time.monotonic()
        launch = Launch(b, "forge", [bench_training(i, workers, gpus) for i in range(n)], rate)
        up = launch.run(workers, LABEL_TRAINING, trainings=True)
        started = b.requests()
        start_seconds = time.monotonic() - t0
        cpu_start = cpu_seconds(op.pid) - cpu_before
        time.sleep(b.window)
        steady = b.requests()
        p50, p99, count = reconcile_quantiles(port)
        result = {"seconds to running": up, "start": started - before, "start seconds": start_seconds,
                  "steady": steady - started, "reconciles": count, "p50": p50, "p99": p99,
                  "pods running": launch.latencies(launch.pods_running),
                  "status running": launch.latencies(launch.status_running), "cpu start": cpu_start,
                  "cpu steady": cpu_seconds(op.pid) - cpu_before - cpu_start}
        result["recovery"] = recover(b, min(failures, n), workers)
        result["rss"] = peak_rss_mib(op.pid)
        return result
    finally:
        op.terminate()
        try:
            op.wait(30)
        except subprocess.TimeoutExpired:
            op.kill()
            op.wait()
        log.close()


def recover(b: Bench, k: int, workers: int) -> list[tuple[float, float]]:
    """Fails rank 1's container in each of the first ``k`` trainings (exit code 1, through the kwok stage
    the test control plane has for it) and returns, per training, the seconds until the operator
    recorded the restart (``status.restarts``) and until the new group was Running."""
    if k == 0:
        return []
    restarts = {name: s.get("restartCount", 0) for name, s in b.trainings().items()}
    names = [f"llm-{i}" for i in range(k)]
    pods = {p["metadata"]["labels"].get(LABEL_TRAINING): p["metadata"]["name"] for p in b.pods("forge")
            if p["metadata"]["labels"].get(LABEL_TRAINING) in names
            and p["metadata"]["labels"].get(LABEL_INDEX) == "1" and p["status"].get("phase") == "Running"}
    t0 = time.monotonic()
    for name in names:
        b.annotate("forge", pods[name], {EXIT_CODE_ANNOTATION: "1"})
    detected: dict[str, float] = {}
    running: dict[str, float] = {}

    def recovered() -> bool:
        now = time.monotonic() - t0
        fts = b.trainings()
        # Running workers of each training's new attempt (the attempt label counts the restarts)
        new: Counter = Counter(p["metadata"]["labels"].get(LABEL_TRAINING) for p in b.pods("forge")
                               if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
                               and int(p["metadata"]["labels"].get(LABEL_ATTEMPT, 0)) > restarts.get(
                                   p["metadata"]["labels"].get(LABEL_TRAINING), 0))
        for name in names:
            s = fts.get(name, {})
            if name not in detected and s.get("restartCount", 0) > restarts[name]:
                detected[name] = now
            if name in detected and name not in running and s.get("phase") == "Running" and new[name] >= workers:
                running[name] = now
        return len(running) == len(names)

    b.wait("groups running again", recovered, timeout=600, interval=0.25)
    return [(detected[n], running[n]) for n in names]


def report(args, floor: dict, forge: dict) -> None:
    n = args.trainings
    rows = [
        ("time from the first create until all running (s)", floor["seconds to running"], forge["seconds to running"]),
        *[(f"create -> all its workers Running, p{q} (s)", pct(floor["pods running"], q), pct(forge["pods running"], q))
          for q in (50, 95, 99)],
        *[(f"create -> status Running, p{q} (s)", float("nan"), pct(forge["status running"], q)) for q in (50, 95, 99)],
        ("requests per training until all running (all clients)",
         total(floor["start"], None) / n, total(forge["start"], None) / n),
        ("requests/training/min steady (all clients)",
         per_minute(floor["steady"], None, n, args.window), per_minute(forge["steady"], None, n, args.window)),
    ]
    rate = f"{args.rate:g}/s" if args.rate else "as fast as one client creates them"
    print(f"\n{n} trainings x {args.workers} nodes x {args.gpus} GPUs on {args.nodes} kwok nodes, created {rate}, "
          f"window {args.window:.0f} s\n")
    print(f"| {'':55} | {'floor (Jobs)':>12} | {'forge':>10} | {'ratio':>6} |")
    print(f"|{'-' * 57}|{'-' * 14}|{'-' * 12}|{'-' * 8}|")
    for label, f, g in rows:
        print(f"| {label:55} | {f:12.1f} | {g:10.1f} | {g / f if f == f and f else float('nan'):6.2f} |")
    op_start = total(forge["start"], OPERATOR) / n
    op_steady = per_minute(forge["steady"], OPERATOR, n, args.window)
    print(f"\noperator's own requests: {op_start:.1f} per training until all running, "
          f"{op_steady:.1f} per training per minute steady")
    print(f"  until all running, by request: " + ", ".join(
        f"{' '.join(filter(None, k))} {v / n:.2f}" for k, v in sorted(forge["start"].items()) if k in OPERATOR and v))
    print(f"  steady, by request: " + ", ".join(
        f"{' '.join(filter(None, k))} {v / n / (args.window / 60):.2f}"
        for k, v in sorted(forge["steady"].items()) if k in OPERATOR and v))
    lists = sum(forge["start"][k] + forge["steady"][k] for k in (("LIST", "pods", ""), ("LIST", "jobs", ""), GET_NODES))
    print(f"  LISTs of pods or Jobs and GETs of nodes: {lists:.0f} (GETs of nodes by all clients: "
          f"{floor['start'][GET_NODES] + floor['steady'][GET_NODES]:.0f} in the floor's run)")
    print(f"operator reconciles: {forge['reconciles']:.0f}, p50 {forge['p50'] * 1000:.1f} ms, "
          f"p99 {forge['p99'] * 1000:.1f} ms")
    if rec := forge["recovery"]:
        detect, again = sorted(d for d, _ in rec), sorted(r for _, r in rec)
        print(f"a worker failed in {len(rec)} trainings at once: restart recorded after p50 {median(detect):.1f} s "
              f"(max {detect[-1]:.1f} s), new group Running after p50 {median(again):.1f} s (max {again[-1]:.1f} s)")
    print(f"operator CPU: {forge['cpu start']:.1f} s until all running, {forge['cpu steady']:.1f} s in the "
          f"{args.window:.0f} s window; peak RSS {forge['rss']:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainings", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="nodes (worker pods) per training")
    parser.add_argument("--nodes", type=int, default=20, help="kwok nodes (--workers per training at least)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node and per worker")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="trainings (and floor Jobs) created per second; 0: one after another without pause")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of the steady window")
    parser.add_argument("--failures", type=int, default=5,
                        help="trainings in which one worker fails at the end, to time the recovery")
    parser.add_argument("--source", type=Path, default=ROOT,
                        help="a checkout whose operator runs (e.g. a worktree of an earlier commit, to compare)")
    parser.add_argument("--dir", default=None, help="control plane folder (default: a temporary one)")
    args = parser.parse_args()
    if args.nodes < args.workers * args.trainings:
        parser.error("--nodes must be at least --workers x --trainings (one worker of --gpus GPUs per node)")
    cluster = DevCluster(args.dir or tempfile.mkdtemp(prefix="forge-scale-"), gpu_nodes=args.nodes,
                         gpus_per_node=args.gpus)
    cluster.up(timeout=600)
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        b = Bench(cluster, args.window)
        b.wait("the CRDs", lambda: "forgetrainings" in cluster.kubectl(
            "api-resources", "--api-group=forge.dev", check=False).stdout, timeout=120)
        floor = run_floor(b, args.trainings, args.workers, args.gpus, args.rate)
        forge = run_forge(b, args.trainings, args.workers, args.gpus, args.rate, args.failures, args.source.resolve())
        report(args, floor, forge)
    finally:
        cluster.down()


if __name__ == "__main__":
    main()
