"""Two operator replicas with kopf peering: one acts, the other stands by and takes over."""

from __future__ import annotations

import pytest

from operator_support import ROOT, OperatorProcess, create_pvcs, training
from test_lifecycle import exit_pod, phase_is, running_workers

pytestmark = pytest.mark.cluster

PAUSED = "Pausing operations in favour of"


def test_standby_replica_pauses_and_takes_over(crds, kube, tmp_path):
    kube.cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "helm" / "forge" / "crds" / "kopf.dev_peerings.yaml"))
    kube.wait_for("peering CRD", lambda: kube("get", "kopfpeerings", check=False).returncode == 0)
    kube.apply({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "forge"}})
    create_pvcs(kube, "corpus", "ckpt", "models")
    replicas = [OperatorProcess(kube.kubeconfig, [kube.namespace], tmp_path / f"op{i}.log",
                                env={"FORGE_PEERING": "forge"}).start() for i in range(2)]
    try:
        standby = kube.wait_for("one replica pausing", lambda: [r for r in replicas if PAUSED in r.log()],
                                timeout=150)
        assert len(standby) == 1, "exactly one replica stands by"
        active = next(r for r in replicas if r is not standby[0])

        kube.apply(training("llm", resources={"numNodes": 1}, failurePolicy={"backoffSeconds": 0}))
        pods = kube.wait_for("running", running_workers(kube, "llm", 1, 0))

        active.kill()
        kube.wait_for("standby resumes", lambda: "Resuming operations" in standby[0].log(), timeout=90)
        exit_pod(kube, pods[0]["metadata"]["name"], 1)
        kube.wait_for("restart handled by the former standby", running_workers(kube, "llm", 1, 1), timeout=60)
        assert kube.wait_for("Running", phase_is(kube, "llm", "Running"))["status"]["restartCount"] == 1
    finally:
        for i, r in enumerate(replicas):
            r.stop()
            print(f"--- replica {i} ---\n{r.log()[-3000:]}")
