"""The operator at scale: many ForgeTrainings on many kwok nodes, against bare Indexed Jobs as the floor.

Starts its own control plane (the test suite's: etcd, kube-apiserver, controller-manager, scheduler, kwok
with fake 8-GPU nodes; binaries cached in ~/.cache/forge), then in one run:

1. floor: T Indexed Jobs of 2 pods with a headless Service each (what a training is without Forge), until
   every pod runs, then a quiet window;
2. forge: the operator (a real `forge operator` process, default resync) and T ForgeTrainings of 2 nodes x
   8 GPUs, until every worker runs and every training is Running, then the same window.

It prints the time until everything runs, the API server's requests (``apiserver_request_total``) per
training per minute while starting and in the steady window (all clients, and the operator's alone), the
operator's reconcile p50/p99 (its ``forge_operator_reconcile_duration_seconds`` histogram) and its RSS, with
ratios against the floor.

    .venv/bin/python benchmarks/operator_scale.py                        # 10 trainings, 20 nodes (minutes)
    .venv/bin/python benchmarks/operator_scale.py --trainings 200 --nodes 500 --window 120
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "controlplane"))
sys.path.insert(0, str(ROOT / "tests" / "operator"))

from devcluster import GPU_RESOURCE, GPU_TAINT, DevCluster  # noqa: E402
from operator_support import training  # noqa: E402

SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} ([0-9.e+-]+)$')
# requests only the operator makes here (the controllers, the scheduler and kwok use informers and write
# pods and Job status, never these)
OPERATOR = {("GET", "forgetrainings", ""), ("UPDATE", "forgetrainings", "status"), ("APPLY", "jobs", ""),
            ("APPLY", "services", ""), ("APPLY", "configmaps", ""), ("APPLY", "serviceaccounts", ""),
            ("GET", "jobs", ""), ("GET", "services", ""), ("GET", "configmaps", ""), ("GET", "serviceaccounts", ""),
            ("LIST", "pods", ""), ("LIST", "jobs", ""), ("LIST", "events", ""), ("GET", "nodes", "")}


def metrics(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1) == name:
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))), float(m.group(3))))
    return out


class Bench:
    def __init__(self, cluster: DevCluster, window: float):
        self.c, self.window = cluster, window

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.c.kubectl(*args, input=input).stdout

    def requests(self) -> Counter:
        out: Counter = Counter()
        for labels, v in metrics(self.kubectl("get", "--raw", "/metrics"), "apiserver_request_total"):
            if labels.get("verb") not in ("WATCH", "CONNECT"):
                out[labels["verb"], labels.get("resource", ""), labels.get("subresource", "")] += v
        return out

    def running_pods(self, ns: str) -> int:
        pods = json.loads(self.kubectl("get", "pods", "-n", ns, "-o", "json"))["items"]
        return sum(1 for p in pods if p["status"].get("phase") == "Running")

    def wait(self, what: str, ok, timeout: float = 1800) -> float:
        start = time.monotonic()
        while not ok():
            if time.monotonic() - start > timeout:
                raise TimeoutError(what)
            time.sleep(1.0)
        return time.monotonic() - start

    def apply(self, ns: str, items: list[dict]) -> None:
        for i in range(0, len(items), 100):
            self.kubectl("apply", "-n", ns, "-f", "-",
                         input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items[i:i + 100]}))


def floor_objects(n: int, gpus: int) -> list[dict]:
    items = []
    for i in range(n):
        name = f"job-{i}"
        items.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                      "spec": {"clusterIP": "None", "selector": {"job-name": name}}})
        items.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {
            "completions": 2, "parallelism": 2, "completionMode": "Indexed", "backoffLimit": 0,
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


def per_minute(delta: Counter, keys, n: int, seconds: float) -> float:
    total = sum(v for k, v in delta.items() if keys is None or k in keys)
    return total / n / (seconds / 60)


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


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_floor(b: Bench, n: int, gpus: int) -> dict:
    b.kubectl("create", "namespace", "floor")
    before = b.requests()
    t0 = time.monotonic()
    b.apply("floor", floor_objects(n, gpus))
    up = b.wait("floor pods running", lambda: b.running_pods("floor") >= 2 * n)
    started = b.requests()
    time.sleep(b.window)
    steady = b.requests()
    result = {"seconds to running": up, "start": started - before, "start seconds": time.monotonic() - t0 - b.window,
              "steady": steady - started}
    b.kubectl("delete", "namespace", "floor", "--wait=true", "--timeout=600s")
    return result


def run_forge(b: Bench, n: int, gpus: int) -> dict:
    b.kubectl("create", "namespace", "forge")
    b.apply("forge", claims("forge"))
    port = free_port()
    env = os.environ | {"KUBECONFIG": b.c.state.kubeconfig, "FORGE_METRICS_PORT": str(port),
                        "FORGE_HEALTH_ENDPOINT": "", "FORGE_TRAINER_IMAGE": "forge-trainer:bench",
                        "PYTHONPATH": f"{ROOT / 'operator'}:{os.environ.get('PYTHONPATH', '')}"}
    log = open(Path(b.c.dir) / "logs" / "operator.log", "ab")
    op = subprocess.Popen([sys.executable, "-m", "forge_operator", "operator", "--namespace", "forge"],
                          env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        time.sleep(3)
        before = b.requests()
        t0 = time.monotonic()
        b.apply("forge", [training(f"llm-{i}", resources={"numNodes": 2, "gpusPerNode": gpus}) for i in range(n)])

        def all_running() -> bool:
            fts = json.loads(b.kubectl("get", "forgetrainings", "-n", "forge", "-o", "json"))["items"]
            return (sum(1 for f in fts if (f.get("status") or {}).get("phase") == "Running") >= n
                    and b.running_pods("forge") >= 2 * n)

        up = b.wait("trainings running", all_running)
        started = b.requests()
        start_seconds = time.monotonic() - t0
        p50_start, p99_start, count_start = reconcile_quantiles(port)
        time.sleep(b.window)
        steady = b.requests()
        p50, p99, count = reconcile_quantiles(port)
        return {"seconds to running": up, "start": started - before, "start seconds": start_seconds,
                "steady": steady - started, "reconciles": count, "p50": p50, "p99": p99, "rss": rss_mib(op.pid)}
    finally:
        op.terminate()
        try:
            op.wait(30)
        except subprocess.TimeoutExpired:
            op.kill()
            op.wait()
        log.close()


def report(args, floor: dict, forge: dict) -> None:
    n = args.trainings
    rows = [
        ("time until all running (s)", floor["seconds to running"], forge["seconds to running"]),
        ("requests/training/min while starting (all clients)",
         per_minute(floor["start"], None, n, floor["start seconds"]),
         per_minute(forge["start"], None, n, forge["start seconds"])),
        ("requests/training/min steady (all clients)",
         per_minute(floor["steady"], None, n, args.window), per_minute(forge["steady"], None, n, args.window)),
    ]
    print(f"\n{n} trainings x 2 nodes x {args.gpus} GPUs on {args.nodes} kwok nodes, window {args.window:.0f} s\n")
    print(f"| {'':52} | {'floor (Jobs)':>12} | {'forge':>10} | {'ratio':>6} |")
    print(f"|{'-' * 54}|{'-' * 14}|{'-' * 12}|{'-' * 8}|")
    for label, f, g in rows:
        print(f"| {label:52} | {f:12.1f} | {g:10.1f} | {g / f if f else float('nan'):6.2f} |")
    op_start = per_minute(forge["start"], OPERATOR, n, forge["start seconds"])
    op_steady = per_minute(forge["steady"], OPERATOR, n, args.window)
    print(f"\noperator's own requests/training/min: {op_start:.1f} while starting, {op_steady:.1f} steady")
    print(f"  steady, by request: " + ", ".join(
        f"{' '.join(filter(None, k))} {v / n / (args.window / 60):.2f}"
        for k, v in sorted(forge["steady"].items()) if k in OPERATOR and v))
    lists = sum(forge["start"][k] + forge["steady"][k] for k in
                (("LIST", "pods", ""), ("LIST", "jobs", ""), ("GET", "nodes", "")))
    print(f"  LISTs of pods or Jobs and GETs of nodes: {lists:.0f}")
    print(f"operator reconciles: {forge['reconciles']:.0f}, p50 {forge['p50'] * 1000:.1f} ms, "
          f"p99 {forge['p99'] * 1000:.1f} ms")
    print(f"operator RSS: {forge['rss']:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainings", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=20, help="kwok nodes (2 per training at least)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node and per worker")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of the steady window")
    parser.add_argument("--dir", default=None, help="control plane folder (default: a temporary one)")
    args = parser.parse_args()
    if args.nodes < 2 * args.trainings:
        parser.error("--nodes must be at least twice --trainings (one worker of 8 GPUs per node)")
    cluster = DevCluster(args.dir or tempfile.mkdtemp(prefix="forge-scale-"), gpu_nodes=args.nodes,
                         gpus_per_node=args.gpus)
    cluster.up(timeout=600)
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        b = Bench(cluster, args.window)
        b.wait("the CRDs", lambda: "forgetrainings" in cluster.kubectl(
            "api-resources", "--api-group=forge.dev", check=False).stdout, timeout=120)
        floor = run_floor(b, args.trainings, args.gpus)
        forge = run_forge(b, args.trainings, args.gpus)
        report(args, floor, forge)
    finally:
        cluster.down()


if __name__ == "__main__":
    main()
