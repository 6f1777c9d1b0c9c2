"""Start and stop a real Kubernetes control plane on 127.0.0.1, for tests and people.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as
plain processes on free loopback ports; kwok fakes the GPU node pool. Real nodes
(kubelet + containerd, ``tests/realnode/node.py``) make the CPU node pool; they run
the trainer and operator images, so the Helm chart installs as on a cluster. A
default StorageClass (``forge-local``) binds claims to a set of hostPath volumes.
Binaries come from ``scripts/controlplane-build`` (built from Go modules, cached per machine).

    python3 tests/controlplane/devcluster.py up [--dir D] [--gpu-nodes N] [--cpu-nodes N]
    python3 tests/controlplane/devcluster.py down [--dir D]

``up`` writes ``D/kubeconfig`` and ``D/state.json`` (the PIDs); ``down`` stops
every process by PID. Only the standard library is used, so people can run it
without the project's virtualenv; the pytest fixture imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_DIR = ROOT / ".dev-cluster"

# Fake GPU pool, shaped like a real one: a product label as NVIDIA's GPU
# feature discovery sets it, and the taint GPU node pools carry so that only
# pods asking for GPUs (with the matching toleration) land there.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
# Node pools as managed clusters label them (GKE's cloud.google.com/gke-nodepool, EKS' eks.amazonaws.com/nodegroup)
NODE_POOL_LABEL = "forge.dev/node-pool"
GPU_POOL, CPU_POOL = "gpu", "cpu"
# The default StorageClass: static hostPath volumes made by `up`, bound when a pod first uses the claim
STORAGE_CLASS = "forge-local"
VOLUME_SIZE = "20Gi"
# Annotating a pod with this ends its containers with that exit code (see kwok-stages.yaml).
KWOK_EXIT_CODE_ANNOTATION = "kwok.forge.dev/exit-code"

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_binaries() -> Path:
    """Build (or find in the cache) the control-plane binaries; return their folder."""
    out = subprocess.run(
        [str(ROOT / "scripts" / "controlplane-build")],
        check=True, stdout=subprocess.PIPE, text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class ClusterState:
    dir: str
    server: str
    token: str
    kubeconfig: str
    pids: dict[str, int] = field(default_factory=dict)
    real_nodes: dict[str, str] = field(default_factory=dict)  # name -> token

    @classmethod
    def load(cls, directory: Path) -> "ClusterState":
        return cls(**json.loads((directory / "state.json").read_text()))

    def save(self) -> None:
        Path(self.dir, "state.json").write_text(json.dumps(asdict(self), indent=2))


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()}"


class DevCluster:
    """One control plane in one folder. Use ``up()``/``down()`` or as a context manager."""

    def __init__(self, directory: Path | str = DEFAULT_DIR, gpu_nodes: int = 4,
                 gpus_per_node: int = 8, node_monitor_grace_seconds: int = 20, real_nodes: int = 0,
                 local_volumes: int = 0):
        self.dir = Path(directory).resolve()
        self.gpu_nodes = gpu_nodes
        self.local_volumes = local_volumes  # hostPath PersistentVolumes of the forge-local StorageClass
        # kubelet + containerd nodes (tests/realnode/node.py); started by start_real_nodes()
        self.real_node_names = [f"real-node-{i}" for i in range(real_nodes)]
        self.gpus_per_node = gpus_per_node
        self.node_monitor_grace_seconds = node_monitor_grace_seconds
        self.state: ClusterState | None = None

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> "DevCluster":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, timeout: float = 120.0) -> ClusterState:
        bin_dir = build_binaries()
        if (self.dir / "state.json").exists():
            self.down()
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "logs").mkdir(parents=True)
        ports = {name: free_port() for name in (
            "etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")}
        token = secrets.token_hex(16)
        server = f"https://127.0.0.1:{ports['apiserver']}"
        self.state = ClusterState(dir=str(self.dir), server=server, token=token,
                                  kubeconfig=str(self.dir / "kubeconfig"),
                                  real_nodes={n: secrets.token_hex(16) for n in self.real_node_names})
        self._write_credentials(token)
        try:
            self._start(bin_dir, "etcd", self._etcd_args(ports))
            self._start(bin_dir, "kube-apiserver", self._apiserver_args(ports))
            self._wait_ready(timeout)
            self._write_kubeconfig()
            self._start(bin_dir, "kube-controller-manager", self._controller_manager_args(ports))
            self._start(bin_dir, "kube-scheduler", self._scheduler_args(ports))
            self._start(bin_dir, "kwok", self._kwok_args(ports))
            self.add_gpu_nodes(self.gpu_nodes)
            self.add_local_volumes(self.local_volumes)
            self._wait_nodes_ready(timeout)
            self._wait_default_service_account(timeout)
        except BaseException:
            self.down()
            raise
        return self.state

    def down(self) -> None:
        """Stop every process this cluster started, by PID; SIGKILL the stubborn."""
        state = self.state
        if state is None and (self.dir / "state.json").exists():
            state = ClusterState.load(self.dir)
        if state is None:
            return
        for node in self.real_nodes(state):
            node.down()
        for name in reversed(list(state.pids)):
            _terminate(state.pids[name])
        (self.dir / "state.json").unlink(missing_ok=True)
        self.state = None

    # -- nodes ---------------------------------------------------------------
    def real_nodes(self, state: ClusterState | None = None) -> list:
        """The real nodes (kubelet + containerd) of this cluster; see tests/realnode/node.py."""
        state = state or self.state
        if not state or not state.real_nodes:
            return []
        sys.path.insert(0, str(ROOT / "tests" / "realnode"))
        from node import RealNode
        return [RealNode(self, name, token, index=i) for i, (name, token) in enumerate(state.real_nodes.items())]

    def start_real_nodes(self, images=(), timeout: float = 180.0) -> list:
        """Start every real node (its binaries built if needed), with ``images`` imported; wait until Ready."""
        nodes = self.real_nodes()
        for node in nodes:
            node.up(images, timeout=timeout)
        return nodes

    def add_gpu_nodes(self, count: int, start: int = 0) -> list[str]:
        names = [f"gpu-node-{i}" for i in range(start, start + count)]
        if not names:
            return []
        docs = [self.gpu_node_manifest(n) for n in names]
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
        return names

    def gpu_node_manifest(self, name: str) -> dict:
        capacity = {"cpu": "96", "memory": "1Ti", "pods": "110", GPU_RESOURCE: str(self.gpus_per_node)}
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                "labels": {
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64", "type": "kwok", NODE_POOL_LABEL: GPU_POOL,
                    GPU_PRODUCT_LABEL: GPU_PRODUCT, "nvidia.com/gpu.count": str(self.gpus_per_node),
                },
            },
            "spec": {"taints": [GPU_TAINT]},
            "status": {"capacity": capacity, "allocatable": capacity},
        }

    def add_local_volumes(self, count: int) -> None:
        """The default StorageClass ``forge-local`` and ``count`` hostPath volumes of it, under
        ``<dir>/volumes``. Binding waits for the first pod that uses a claim (as for local volumes)."""
        if not count:
            return
        items: list[dict] = [{
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS,
                         "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Retain",
        }]
        for i in range(count):
            path = self.dir / "volumes" / f"pv-{i}"
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)  # hostPath volumes get no fsGroup: writable by the workers' uid 10001
            items.append({
                "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{STORAGE_CLASS}-{i}"},
                "spec": {"storageClassName": STORAGE_CLASS, "capacity": {"storage": VOLUME_SIZE},
                         "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                         "persistentVolumeReclaimPolicy": "Retain",
                         "hostPath": {"path": str(path), "type": "Directory"}},
            })
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    def volume_path(self, namespace: str, claim: str) -> Path:
        """The host folder of the volume a claim is bound to."""
        pvc = json.loads(self.kubectl("-n", namespace, "get", "pvc", claim, "-o", "json").stdout)
        pv = json.loads(self.kubectl("get", "pv", pvc["spec"]["volumeName"], "-o", "json").stdout)
        return Path(pv["spec"]["hostPath"]["path"])

    # -- helpers for callers -------------------------------------------------
    def wait_established(self, *what: str, timeout: float = 60.0) -> None:
        """Wait until the CRDs ``what`` names (``crd/NAME ...`` or ``-f PATH``) are Established. ``kubectl wait
        --for=condition=Established`` fails instead of waiting when it reads a CRD whose status has no
        conditions yet, right after the apply."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.kubectl("get", *what, "-o", "json", check=False)
            if out.returncode == 0:
                doc = json.loads(out.stdout)
                items = doc.get("items", []) if doc.get("kind") == "List" else [doc]
                if items and all(any(c.get("type") == "Established" and c.get("status") == "True"
                                     for c in (i.get("status") or {}).get("conditions") or []) for i in items):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRDs {' '.join(what)} not Established after {timeout:.0f}s: {out.stderr.strip()}")
            time.sleep(0.5)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """kubectl against this cluster, with a discovery cache of its own (the cache is keyed by
        host:port, and another cluster may have had this port before). ``check`` raises with stderr."""
        assert self.state is not None, "cluster is not up"
        cache = Path(self.state.kubeconfig).parent / "kubectl-cache"
        out = subprocess.run(
            ["kubectl", "--kubeconfig", self.state.kubeconfig, "--cache-dir", str(cache), *args],
            input=input, text=True, capture_output=True,
        )
        if check and out.returncode != 0:
            raise KubectlError(out.returncode, out.args, out.stdout, out.stderr)
        return out

    def env(self) -> dict[str, str]:
        assert self.state is not None
        return {"KUBECONFIG": self.state.kubeconfig}

    # -- internals -----------------------------------------------------------
    def _write_credentials(self, token: str) -> None:
        d = self.dir
        subprocess.run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"],
                       check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
                       check=True, capture_output=True)
        assert self.state is not None
        nodes = "".join(f'{t},system:node:{n},{n},"system:nodes"\n' for n, t in self.state.real_nodes.items())
        (d / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n{nodes}')
        (d / "certs").mkdir()

    def _write_kubeconfig(self) -> None:
        """Once the API server has made its self-signed serving certificate, trust exactly that."""
        assert self.state is not None
        ca = self.dir / "certs" / "apiserver.crt"
        Path(self.state.kubeconfig).write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "forge-dev",
            "clusters": [{"name": "forge-dev", "cluster": {"server": self.state.server,
                                                          "certificate-authority": str(ca)}}],
            "users": [{"name": "admin", "user": {"token": self.state.token}}],
            "contexts": [{"name": "forge-dev", "context": {"cluster": "forge-dev", "user": "admin",
                                                          "namespace": "default"}}],
        }, indent=2))

    def _etcd_args(self, p: dict[str, int]) -> list[str]:
        client, peer = f"http://127.0.0.1:{p['etcd']}", f"http://127.0.0.1:{p['etcd-peer']}"
        return ["--name", "default", "--data-dir", str(self.dir / "etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}", "--unsafe-no-fsync",
                "--log-level", "warn"]

    def _apiserver_args(self, p: dict[str, int]) -> list[str]:
        d = self.dir
        return ["--etcd-servers", f"http://127.0.0.1:{p['etcd']}",
                "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
                "--secure-port", str(p["apiserver"]), "--cert-dir", str(d / "certs"),
                "--service-cluster-ip-range", "10.96.0.0/16",
                "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file", str(d / "sa.pub"),
                "--service-account-signing-key-file", str(d / "sa.key"),
                "--token-auth-file", str(d / "tokens.csv"),
                # kubelets (real nodes) authorized as real clusters do it: Node authorizer + NodeRestriction
                "--authorization-mode", "Node,RBAC" if self.real_node_names else "RBAC",
                "--allow-privileged=true",
                # as strict as the strictest clusters (OpenShift): an owner reference with
                # blockOwnerDeletion needs update on the owner's finalizers
                "--enable-admission-plugins",
                "OwnerReferencesPermissionEnforcement" + (",NodeRestriction" if self.real_node_names else ""),
                "--endpoint-reconciler-type", "none", "--v", "1",
                # a real node's name does not resolve: reach its kubelet (logs, exec) by address
                "--kubelet-preferred-address-types", "InternalIP,Hostname"]

    def _component_kubeconfig(self) -> str:
        assert self.state is not None
        return self.state.kubeconfig

    def _controller_manager_args(self, p: dict[str, int]) -> list[str]:
        g = self.node_monitor_grace_seconds
        return ["--kubeconfig", self._component_kubeconfig(), "--leader-elect=false",
                "--bind-address", "127.0.0.1", "--secure-port", str(p["controller-manager"]),
                "--service-account-private-key-file", str(self.dir / "sa.key"),
                "--root-ca-file", str(self.dir / "certs" / "apiserver.crt"),
                "--use-service-account-credentials=false",
                "--node-monitor-period", "2s", "--node-monitor-grace-period", f"{g}s",
                "--v", "1"]

    def _scheduler_args(self, p: dict[str, int]) -> list[str]:
        return ["--kubeconfig", self._component_kubeconfig(), "--leader-elect=false",
                "--bind-address", "127.0.0.1", "--secure-port", str(p["scheduler"]), "--v", "1"]

    def _kwok_args(self, p: dict[str, int]) -> list[str]:
        return ["--kubeconfig", self._component_kubeconfig(),
                "--config", str(HERE / "kwok-stages.yaml"),
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                "--server-address", f"127.0.0.1:{p['kwok']}",
                "--node-ip", "127.0.0.1", "--cidr", "127.100.0.1/16",
                "--node-lease-duration-seconds", "40"]

    def _start(self, bin_dir: Path, name: str, args: list[str]) -> None:
        assert self.state is not None
        log = open(self.dir / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen([str(bin_dir / name), *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.dir)
        log.close()
        self.state.pids[name] = proc.pid
        self.state.save()
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at once with {proc.returncode}; "
                               f"see {self.dir / 'logs' / (name + '.log')}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _get(self, path: str) -> tuple[int, bytes]:
        assert self.state is not None
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(self.state.server + path,
                                     headers={"Authorization": f"Bearer {self.state.token}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait(self, what: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.state is not None
            for name, pid in self.state.pids.items():
                if not _alive(pid):
                    raise RuntimeError(f"{name} died while waiting for {what}:\n{self.log_tail(name)}")
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"control plane: {what} not reached in {timeout:.0f}s (logs in {self.dir / 'logs'})")

    def _wait_ready(self, timeout: float) -> None:
        self._wait("kube-apiserver /readyz", lambda: self._get("/readyz")[0] == 200, timeout)

    def _wait_nodes_ready(self, timeout: float) -> None:
        def ready() -> bool:
            status, body = self._get("/api/v1/nodes")
            if status != 200:
                return False
            nodes = json.loads(body)["items"]
            ready_count = sum(
                any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
                for n in nodes)
            return ready_count >= self.gpu_nodes
        self._wait(f"{self.gpu_nodes} Ready GPU nodes", ready, timeout)

    def _wait_default_service_account(self, timeout: float) -> None:
        self._wait("the default ServiceAccount",
                   lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200, timeout)


def _session_leader(pid: int) -> bool:
    """Whether ``pid`` leads a session of its own, as every process started here does
    (start_new_session): a pid kept in a state file that another process has since been given does
    not, so stopping a cluster long after its processes died never signals a stranger."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3]) == pid
    except (OSError, ValueError, IndexError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _terminate(pid: int, grace: float = 10.0) -> None:
    if not _session_leader(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while _alive(pid):
        time.sleep(0.05)


def _start_cpu_pool(cluster: DevCluster) -> None:
    """The real nodes, with the trainer and operator images imported under their own names and the
    names the Helm chart's values give them."""
    sys.path.insert(0, str(ROOT / "tests" / "realnode"))
    from images import operator_image, trainer_image
    images = [trainer_image(), operator_image()]
    try:
        for node in cluster.start_real_nodes(images):
            print(f"node {node.name} Ready: " + ", ".join(f"{k} {v:.1f}s" for k, v in node.timings.items()))
    except BaseException:
        cluster.down()
        raise
    for image in images:
        print(f"image {image.name}, also {', '.join(image.aliases)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev-cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "build", "status"])
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="state folder (default: %(default)s)")
    parser.add_argument("--gpu-nodes", type=int, default=4, help="fake GPU nodes to create")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpu-nodes", "--real-nodes", dest="cpu_nodes", type=int, default=0,
                        help="real nodes (kubelet, containerd, runc; needs root) as the CPU node pool, "
                             "with the trainer and operator images imported")
    parser.add_argument("--volumes", type=int, default=8,
                        help=f"hostPath PersistentVolumes of the default StorageClass {STORAGE_CLASS}")
    args = parser.parse_args(argv)
    cluster = DevCluster(args.dir, gpu_nodes=args.gpu_nodes, gpus_per_node=args.gpus_per_node,
                         real_nodes=args.cpu_nodes, local_volumes=args.volumes)
    if args.command == "build":
        print(build_binaries())
    elif args.command == "up":
        t0 = time.monotonic()
        state = cluster.up()
        print(f"control plane up in {time.monotonic() - t0:.1f}s: {state.server}")
        if args.cpu_nodes:
            _start_cpu_pool(cluster)
        print(f"export KUBECONFIG={state.kubeconfig}")
    elif args.command == "down":
        cluster.down()
        print("control plane stopped")
    else:
        path = Path(args.dir) / "state.json"
        if not path.exists():
            print("down")
            return 1
        state = ClusterState.load(Path(args.dir))
        for name, pid in state.pids.items():
            print(f"{name:25} pid {pid:<8} {'running' if _alive(pid) else 'DEAD'}")
        print(f"KUBECONFIG={state.kubeconfig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
