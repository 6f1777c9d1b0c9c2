"""Shared fixtures: one real control plane per test session, a fresh namespace per test.

The control plane is the one `scripts/dev-cluster` starts (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok with fake GPU nodes). If it
cannot be built or started, every test that needs it errors: nothing skips.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "controlplane"))

from devcluster import DevCluster  # noqa: E402
from kubetest import Kube  # noqa: E402

GPU_NODES = 4


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
    cluster.kubectl("wait", "--for", "condition=Established", "--timeout=60s",
                    "crd/forgetrainings.forge.dev", "crd/forgeevals.forge.dev")
    # discovery must list the kinds before kubectl can use them
    deadline = time.monotonic() + 30
    while "forgetrainings" not in cluster.kubectl("api-resources", "--api-group=forge.dev", check=False).stdout:
        if time.monotonic() > deadline:
            raise TimeoutError("forge.dev kinds never appeared in discovery")
        time.sleep(0.5)
    return cluster


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
