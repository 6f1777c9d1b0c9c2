"""A real Kubernetes node next to the dev control plane: containerd + runc + CNI + kubelet.

The kubelet registers with the control plane of ``tests/controlplane/devcluster.py`` as
``system:node:<name>`` (a token in group ``system:nodes``; the API server runs the Node
authorizer and the NodeRestriction admission plugin when real nodes are asked for).
containerd runs pods with runc; the bridge CNI plugin gives them addresses on a bridge of
their own (10.244.<n>.0/24), and CoreDNS, listening on the bridge's address, resolves the
cluster's Service and pod names (a headless Service's ``<hostname>.<subdomain>``), which
the training's rendezvous needs. Binaries come from ``scripts/realnode-build``; images
from ``tests/realnode/images.py`` (the sandbox image is our own pause binary).

What is not there: kube-proxy. The `kubernetes` Service's ClusterIP is an address of the bridge,
where a TCP proxy (serviceproxy.py) forwards to the API server, so pods reach the API server
as in a cluster; other ClusterIPs are not routed (the service range is unreachable from the
host, so nothing leaves the machine). No hostPort (portmap needs iptables). Everything runs as root; the kubelet
and containerd state lives under the node's folder, except what they always write to the
host (``kubepods`` cgroups, the bridge); ``down`` removes that too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CGROUP_ROOT = Path("/sys/fs/cgroup")
SERVICE_CIDR = "10.96.0.0/16"   # devcluster.py's --service-cluster-ip-range
API_SERVICE_IP = "10.96.0.1"    # the `kubernetes` Service's ClusterIP (the range's first address)
NODE_LABEL = "forge.dev/real-node"


def build_binaries() -> Path:
    out = subprocess.run([str(ROOT / "scripts" / "realnode-build")], check=True,
                         stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class NodeNet:
    index: int

    @property
    def bridge(self) -> str:
        return f"forge{self.index}"

    @property
    def subnet(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def gateway(self) -> str:
        return f"10.244.{self.index}.1"


class RealNode:
    """One node; ``cluster`` is a started DevCluster whose tokens.csv has this node's token."""

    def __init__(self, cluster, name: str, token: str, index: int = 0, bin_dir: Path | None = None):
        self.cluster, self.name, self.token = cluster, name, token
        self.net = NodeNet(index)
        self._bin = bin_dir
        self.dir = Path(cluster.dir) / "nodes" / name
        self.socket = self.dir / "containerd" / "containerd.sock"
        # containerd's root (images, unpacked layers) outlives the cluster: importing the 5 GB trainer
        # image takes minutes on a busy machine, once. One real-node cluster per machine at a time.
        self.containerd_root = Path(os.environ.get("FORGE_CONTAINERD_ROOT") or
                                    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                    / "forge" / "containerd" / f"node-{index}")
        self.timings: dict[str, float] = {}

    @property
    def bin(self) -> Path:
        if self._bin is None:
            self._bin = build_binaries()
        return self._bin

    # -- lifecycle -----------------------------------------------------------
    def up(self, images=(), timeout: float = 120.0) -> None:
        """Start containerd, import ``images`` (plus the sandbox image), start CoreDNS and the kubelet,
        and wait until the Node is Ready."""
        from devcluster import CPU_POOL, NODE_POOL_LABEL  # both folders are on sys.path with this module
        from images import pause_image

        t0 = time.monotonic()
        for sub in ("containerd", "kubelet", "cni/conf", "cni/ipam", "pod-logs", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        pause = pause_image(self.bin)
        self._network()
        self._write_containerd_config(pause.name)
        self._start("containerd", [str(self.bin / "containerd"), "--config", str(self.dir / "containerd" / "config.toml")])
        self._wait("containerd socket", lambda: self.ctr("version").returncode == 0, timeout)
        for image in (pause, *images):
            t = time.monotonic()
            imported = image.install(self.bin / "ctr", str(self.socket))
            self.timings[f"import {image.name}" + ("" if imported else " (present)")] = time.monotonic() - t
        self._start("coredns", [str(self.bin / "coredns"), "-conf", str(self._write_corefile())])
        api_port = self.cluster.state.server.rsplit(":", 1)[1]
        self._start("kubernetes-service-proxy", [sys.executable, str(HERE / "serviceproxy.py"), API_SERVICE_IP, "443",
                                                 "127.0.0.1", api_port])
        self._write_kubelet_files()
        self._start("kubelet", [
            str(self.bin / "kubelet"), "--config", str(self.dir / "kubelet" / "config.yaml"),
            "--kubeconfig", str(self.dir / "kubelet" / "kubeconfig"),
            "--root-dir", str(self.dir / "kubelet" / "root"), "--cert-dir", str(self.dir / "kubelet" / "pki"),
            # the kubelet refuses a loopback node IP: the node's address is its bridge's
            "--hostname-override", self.name, "--node-ip", self.net.gateway,
            "--node-labels", f"{NODE_LABEL}=true,{NODE_POOL_LABEL}={CPU_POOL}", "--v", "1"])
        self._wait(f"node {self.name} Ready", self._ready, timeout)
        self.timings["node join"] = time.monotonic() - t0

    def down(self) -> None:
        """Stop the kubelet, every pod's containers (runc, by PID), containerd and its shims, and
        CoreDNS; remove the mounts, network namespaces, cgroups, bridge and route they left."""
        pids = self._pids()
        _terminate(pids.pop("kubelet", 0))
        if _alive(pids.get("containerd", 0)):  # its root is kept: leave no pod behind in it
            self.crictl("rmp", "--all", "--force")
        _terminate(pids.pop("coredns", 0))
        _terminate(pids.pop("kubernetes-service-proxy", 0))
        for pid in self._shim_pids():
            _kill_tree(pid)
        _terminate(pids.pop("containerd", 0))
        for pid in self._shim_pids():
            _kill_tree(pid)
        self._unmount_all()
        self._remove_cgroups()
        subprocess.run(["ip", "link", "del", self.net.bridge], capture_output=True)
        subprocess.run(["ip", "route", "del", "unreachable", SERVICE_CIDR], capture_output=True)
        (self.dir / "pids.json").unlink(missing_ok=True)

    # -- helpers ---------------------------------------------------------------
    def ctr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "ctr"), "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True)

    def crictl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "crictl"), "--runtime-endpoint", f"unix://{self.socket}",
                               "--image-endpoint", f"unix://{self.socket}", *args], capture_output=True, text=True)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # -- internals -------------------------------------------------------------
    def _network(self) -> None:
        """The bridge, made before the first pod so that CoreDNS can listen on its address; the bridge
        plugin adopts it. The service range unreachable: without kube-proxy, traffic to a ClusterIP
        would otherwise leave the machine by the default route."""
        net = self.net
        subprocess.run(["ip", "link", "del", net.bridge], capture_output=True)
        for cmd in (["ip", "link", "add", net.bridge, "type", "bridge"],
                    ["ip", "addr", "add", f"{net.gateway}/24", "dev", net.bridge],
                    ["ip", "link", "set", net.bridge, "up"]):
            subprocess.run(cmd, check=True, capture_output=True)
        subprocess.run(["ip", "route", "replace", "unreachable", SERVICE_CIDR], check=True, capture_output=True)
        # the `kubernetes` Service's address is the node's own: the service proxy listens there
        subprocess.run(["ip", "addr", "add", f"{API_SERVICE_IP}/32", "dev", net.bridge], check=True, capture_output=True)
        (self.dir / "cni" / "conf" / "10-forge.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "forge",
            "plugins": [{"type": "bridge", "bridge": net.bridge, "isGateway": True, "ipMasq": False,
                         "hairpinMode": True,
                         "ipam": {"type": "host-local", "dataDir": str(self.dir / "cni" / "ipam"),
                                  "ranges": [[{"subnet": net.subnet, "gateway": net.gateway}]],
                                  "routes": [{"dst": "0.0.0.0/0"}]}}],
        }, indent=2))

    def _write_containerd_config(self, sandbox_image: str) -> None:
        d = self.dir / "containerd"
        (d / "config.toml").write_text(f"""version = 3
root = "{self.containerd_root}"
state = "{d / 'state'}"

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{sandbox_image}"

[plugins.'io.containerd.cri.v1.runtime']
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower its own oom_score_adj below the parent's
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["{self.bin}"]
  conf_dir = "{self.dir / 'cni' / 'conf'}"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  BinaryName = "{self.bin / 'runc'}"
  SystemdCgroup = false

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
""")

    def _write_corefile(self) -> Path:
        path = self.dir / "Corefile"
        path.write_text(f"""cluster.local:53 {{
    bind {self.net.gateway}
    errors
    kubernetes cluster.local {{
        kubeconfig {self.cluster.state.kubeconfig} forge-dev
        pods insecure
    }}
}}
.:53 {{
    bind {self.net.gateway}
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
""")
        return path

    def _write_kubelet_files(self) -> None:
        from devcluster import free_port

        d = self.dir / "kubelet"
        (d / "resolv.conf").write_text("")
        ca = Path(self.cluster.dir) / "certs" / "apiserver.crt"
        (d / "kubeconfig").write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "node",
            "clusters": [{"name": "forge-dev", "cluster": {"server": self.cluster.state.server,
                                                          "certificate-authority": str(ca)}}],
            "users": [{"name": self.name, "user": {"token": self.token}}],
            "contexts": [{"name": "node", "context": {"cluster": "forge-dev", "user": self.name}}],
        }, indent=2))
        (d / "config.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.net.gateway, "port": free_port(), "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            # the API server reaches the kubelet (logs, exec) without credentials of its own
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "clusterDNS": [self.net.gateway], "clusterDomain": "cluster.local",
            "resolvConf": str(d / "resolv.conf"), "podLogsDir": str(self.dir / "pod-logs"),
            # a shared build machine's disk is often fuller than the defaults allow
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "5s", "fileCheckFrequency": "5s",
        }, indent=2))

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / "logs" / f"{name}.log", "ab")
        env = os.environ | {"PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.dir, env=env)
        log.close()
        pids = self._pids()
        pids[name] = proc.pid
        (self.dir / "pids.json").write_text(json.dumps(pids))
        time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at once with {proc.returncode}:\n{self.log_tail(name)}")

    def _pids(self) -> dict[str, int]:
        path = self.dir / "pids.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _wait(self, what: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, pid in self._pids().items():
                if not _alive(pid):
                    raise RuntimeError(f"{name} died while waiting for {what}:\n{self.log_tail(name)}")
            if ok():
                return
            time.sleep(0.5)
        raise TimeoutError(f"real node {self.name}: {what} not reached in {timeout:.0f}s "
                           f"(logs in {self.dir / 'logs'}):\n{self.log_tail('kubelet')}")

    def _ready(self) -> bool:
        out = self.cluster.kubectl("get", "node", self.name, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        conditions = json.loads(out.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _shim_pids(self) -> list[int]:
        """containerd's shims outlive it (they are re-parented): find them by their socket folder."""
        state = str(self.dir / "containerd")
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and state.encode() in environ + b"".join(cmd):
                pids.append(int(proc.name))
        return pids

    def _unmount_all(self) -> None:
        prefix = str(self.dir) + "/"
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)

    def _remove_cgroups(self) -> None:
        for controller in CGROUP_ROOT.iterdir():
            top = controller / "kubepods"
            if top.is_dir() and not top.is_symlink():
                for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                    try:
                        path.rmdir()
                    except OSError:
                        pass
                try:
                    top.rmdir()
                except OSError:
                    pass


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def _terminate(pid: int, grace: float = 15.0) -> None:
    from devcluster import _session_leader  # loaded: devcluster imports this module

    if not _alive(pid) or not _session_leader(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _kill_tree(pid: int) -> None:
    """SIGKILL a shim and the containers under it (runc's init processes are its children)."""
    children = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().split(")")[-1].split()[1]) == pid:
                    children.append(int(proc.name))
            except (OSError, ValueError, IndexError):
                pass
    for child in children:
        _kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
