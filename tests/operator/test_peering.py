"""Two operator replicas with kopf peering: one acts, the other stands by and takes over."""

from __future__ import annotations

import time

import pytest

from operator_support import ROOT, OperatorProcess, create_pvcs, training
from test_lifecycle import exit_pod, phase_is, running_workers

pytestmark = [pytest.mark.cluster, pytest.mark.slow]  # the standby takes over once the peer's 60 s lease lapses


def serving(replica: OperatorProcess) -> bool:
    """kopf starts paused; it logs when peering lets it act, and when a higher priority makes it pause."""
    log = replica.log()
    return log.rfind("Resuming operations") > log.rfind("Pausing operations")


def test_standby_replica_pauses_and_takes_over(crds, kube, tmp_path):
    kube.cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "helm" / "forge" / "crds" / "kopf.dev_peerings.yaml"))
    kube.wait_for("peering CRD", lambda: kube("get", "kopfpeerings", check=False).returncode == 0)
    kube.apply({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "forge"}})
    create_pvcs(kube, "corpus", "ckpt", "models")
    replicas = [OperatorProcess(kube.kubeconfig, [kube.namespace], tmp_path / f"op{i}.log",
                                env={"FORGE_PEERING": "forge"}) for i in range(2)]
    try:
        # one after the other, as a rolling Deployment starts them
        replicas[0].start()
        kube.wait_for("first replica serving", lambda: serving(replicas[0]), timeout=120)
        replicas[1].start()
        kube.wait_for("both replicas in the peering object", lambda: len(
            kube.get("kopfpeering", "forge").get("status") or {}) == 2, timeout=120)
        time.sleep(3)  # both have seen each other
        active = kube.wait_for("exactly one replica serving", lambda: (
            s := [r for r in replicas if serving(r)]) and len(s) == 1 and s[0], timeout=60)
        standby = next(r for r in replicas if r is not active)

        kube.apply(training("llm", resources={"numNodes": 1}, failurePolicy={"backoffSeconds": 0}))
        pods = kube.wait_for("running", running_workers(kube, "llm", 1, 0))

        active.kill()
        kube.wait_for("standby resumes", lambda: serving(standby), timeout=120)
        exit_pod(kube, pods[0]["metadata"]["name"], 1)
        kube.wait_for("restart handled by the former standby", running_workers(kube, "llm", 1, 1), timeout=60)
        assert kube.wait_for("Running", phase_is(kube, "llm", "Running"))["status"]["restartCount"] == 1
    finally:
        for i, r in enumerate(replicas):
            r.stop()
            print(f"--- replica {i} ---\n{r.log()[-3000:]}")
