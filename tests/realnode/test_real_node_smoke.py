"""A real node in every test run: a kubelet (built from the API server's own module) with containerd
and runc joins the test control plane and runs one pod to its end.

The whole real-node suite (the trainer image, 2-worker trainings, kills, evictions, the install guide)
is ``tests/e2e`` (``scripts/test --e2e``, minutes per test). This one pod, in the operator image (257 MB,
imported in seconds; the trainer image is 5 GB), shows on every run that the chain still works: the
node registers as ``system:node:<name>``, the pod passes Pod Security ``restricted``, runs as the
image's user, and its exit code and termination message come back through the real kubelet.
"""

from __future__ import annotations

import os

import pytest
from devcluster import DevCluster
from images import operator_image
from kubetest import Kube

pytestmark = pytest.mark.slow

SCRIPT = ("import os, sys, forge_operator, kopf; "
          "open('/dev/termination-log', 'w').write(f'uid={os.getuid()} python={sys.version_info[0]}.{sys.version_info[1]}'); "
          "raise SystemExit(3)")


def test_a_pod_runs_on_a_real_kubelet_and_reports_its_exit_code_and_message(tmp_path_factory):
    assert os.geteuid() == 0, "a real node (kubelet, containerd, runc, mounts, cgroups) needs root"
    image = operator_image()
    # a short folder: containerd's sockets live in it, and a unix socket's path has at most 104 bytes
    cluster = DevCluster(tmp_path_factory.mktemp("rn"), gpu_nodes=0, real_nodes=1)
    cluster.up()
    try:
        [node] = cluster.start_real_nodes([image])
        kube = Kube(cluster, "smoke")
        cluster.kubectl("create", "namespace", "smoke")
        cluster.kubectl("label", "namespace", "smoke", "pod-security.kubernetes.io/enforce=restricted")
        kube.apply({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5, "nodeName": node.name,
                     "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "main", "image": image.name, "imagePullPolicy": "Never",
                                     "command": ["python", "-c", SCRIPT],
                                     "securityContext": {"allowPrivilegeEscalation": False,
                                                         "capabilities": {"drop": ["ALL"]}}}]}})

        def terminated():
            for cs in kube.get("pod", "probe").get("status", {}).get("containerStatuses", []):
                if "terminated" in cs.get("state", {}):
                    return cs["state"]["terminated"]
            return None

        state = kube.wait_for("the pod to end on the real node", terminated, timeout=180, interval=1)
        assert state["exitCode"] == 3, state
        assert state["message"] == "uid=10001 python=3.11", state
        pod = kube.wait_for("phase Failed", lambda: (p := kube.get("pod", "probe"))["status"]["phase"] == "Failed" and p,
                            timeout=60, interval=1)
        assert pod["spec"]["nodeName"] == node.name
    finally:
        cluster.down()
