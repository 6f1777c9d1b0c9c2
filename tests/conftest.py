"""Shared fixtures: one real control plane per test session, a fresh namespace per test.

The control plane is the one `scripts/dev-cluster` starts (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok with fake GPU nodes). If it
cannot be built or started, every test that needs it errors: nothing skips.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "controlplane"))
sys.path.insert(0, str(ROOT / "tests" / "s3server"))

from devcluster import DevCluster  # noqa: E402
from kubetest import Kube  # noqa: E402
from s3server import S3Server, build as build_s3server  # noqa: E402

GPU_NODES = 4

# tests/e2e runs real pods on a real node (minutes of set-up): only with FORGE_E2E=1 (scripts/test --e2e)
collect_ignore_glob = [] if os.environ.get("FORGE_E2E") == "1" else ["e2e/*"]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> DevCluster:
    """A running control plane; stopped by PID at the end of the session, also after failures."""
    c = DevCluster(tmp_path_factory.mktemp("controlplane"), gpu_nodes=GPU_NODES)
    c.up()
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="session")
def crds(cluster: DevCluster) -> DevCluster:
    """The Forge CRDs installed and Established."""
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    established = '{.items[*].status.conditions[?(@.type=="Established")].status}'
    # both Established, and discovery lists the kinds (kubectl needs that before it can use them)
    deadline = time.monotonic() + 60
    while True:
        crds = cluster.kubectl("get", "crd", "forgetrainings.forge.dev", "forgeevals.forge.dev", "-o",
                               f"jsonpath={established}", check=False)
        kinds = cluster.kubectl("api-resources", "--api-group=forge.dev", check=False)
        if crds.stdout.split() == ["True", "True"] and "forgetrainings" in kinds.stdout:
            return cluster
        if time.monotonic() > deadline:
            raise TimeoutError(f"the forge.dev CRDs never became usable: Established={crds.stdout!r} "
                               f"{crds.stderr.strip()} {kinds.stderr.strip()}")
        time.sleep(0.5)


@pytest.fixture
def kube(cluster: DevCluster, request) -> Kube:
    """A fresh namespace for one test, deleted afterwards."""
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:6]}"
    name = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name)
    cluster.kubectl("create", "namespace", name)
    k = Kube(cluster, name)
    k.wait_for("default ServiceAccount", lambda: k("get", "sa", "default", check=False).returncode == 0)
    try:
        yield k
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def s3server(tmp_path_factory) -> S3Server:
    """A real S3-compatible server (versitygw) on a free loopback port; stopped by PID at the end.
    Errors (no skip) when scripts/s3server-build cannot build it."""
    server = S3Server.start(build_s3server(), tmp_path_factory.mktemp("s3server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3server: S3Server) -> str:
    """A fresh bucket of the S3 server for one test."""
    return s3server.create_bucket(f"forge-{uuid.uuid4().hex[:12]}")
