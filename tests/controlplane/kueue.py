"""The real Kueue controller, run against a test control plane (DevCluster).

``scripts/kueue-build`` builds it from its Go module (tests/controlplane/kueue) and keeps its CRDs beside
the binary. Kueue runs as a process on this machine with its webhooks served but not registered: the
API server never calls them, which is what Forge needs (it creates its Jobs suspended, with the
queue-name label, itself; the defaults the webhooks would add are in the CRDs' schemas). Its servers
(webhook, metrics) need certificates: self-signed ones are made with openssl; the metrics server reads
them from the path Kueue fixes (/etc/kueue/metrics/certs) when it does not manage certificates itself.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

from devcluster import ROOT, DevCluster, _alive, _terminate, free_port

METRICS_CERTS = Path("/etc/kueue/metrics/certs")  # fixed in Kueue's main.go


def build_kueue() -> Path:
    """Build (or find in the cache) the Kueue binary and its CRDs; return their folder."""
    out = subprocess.run([str(ROOT / "scripts" / "kueue-build")], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def self_signed(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "tls.crt").exists() and (folder / "tls.key").exists():
        return
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(folder / "tls.key"), "-out", str(folder / "tls.crt")],
                   check=True, capture_output=True)


class Kueue:
    """One Kueue controller process for one cluster; ``start`` installs its CRDs and waits until healthy."""

    def __init__(self, cluster: DevCluster, directory: Path) -> None:
        self.cluster, self.dir = cluster, directory
        self.proc: subprocess.Popen | None = None
        self.bin = build_kueue()

    def install_crds(self) -> None:
        self.cluster.kubectl("apply", "--server-side", "-f", str(self.bin / "crds"))
        self.cluster.wait_established("-f", str(self.bin / "crds"))
        deadline = time.monotonic() + 60
        while "localqueues" not in self.cluster.kubectl("api-resources", "--api-group=kueue.x-k8s.io",
                                                         check=False).stdout:
            if time.monotonic() > deadline:
                raise TimeoutError("the Kueue CRDs never showed in discovery")
            time.sleep(0.5)

    def start(self) -> "Kueue":
        self.install_crds()
        self.cluster.kubectl("create", "namespace", "kueue-system", check=False)
        self.dir.mkdir(parents=True, exist_ok=True)
        self_signed(self.dir / "webhook-certs")
        self_signed(METRICS_CERTS)
        self.health = free_port()
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health}"},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "webhook": {"port": free_port(), "host": "127.0.0.1", "certDir": str(self.dir / "webhook-certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": ["batch/job"]},
        }
        (self.dir / "config.yaml").write_text(json.dumps(config))
        log = open(self.dir / "kueue.log", "w")
        self.proc = subprocess.Popen(
            [str(self.bin / "kueue"), "--config", str(self.dir / "config.yaml"),
             # the on-demand visibility API server wants certificates under /visibility: not needed here
             "--feature-gates=VisibilityOnDemand=false", "--zap-log-level=2"],
            env={"KUBECONFIG": self.cluster.state.kubeconfig, "PATH": "/usr/bin:/bin"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Kueue did not become ready:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and _alive(self.proc.pid):
            _terminate(self.proc.pid)
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        path = self.dir / "kueue.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
