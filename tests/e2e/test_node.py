"""The real node itself: it registered as a kubelet does, and it runs the trainer image's pods."""

from __future__ import annotations

import json
import time

from conftest import TIMINGS


def _pod(name: str, image: str, script: str, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                                     "command": ["python", "-c", script],
                                     "securityContext": {"allowPrivilegeEscalation": False,
                                                         "capabilities": {"drop": ["ALL"]}}}],
                     **spec}}


def _terminated(kube, name: str, timeout: float = 180.0) -> dict:
    def done():
        pod = kube.get("pod", name)
        for cs in pod.get("status", {}).get("containerStatuses", []):
            if "terminated" in cs.get("state", {}):
                return cs["state"]["terminated"]
        return None
    return kube.wait_for(f"pod {name} to terminate", done, timeout=timeout, interval=1)


def test_the_kubelet_registered_as_a_node_with_the_node_authorizer(cluster, node):
    got = json.loads(cluster.kubectl("get", "node", node.name, "-o", "json").stdout)
    assert got["metadata"]["labels"]["forge.dev/real-node"] == "true"
    assert got["status"]["nodeInfo"]["kubeletVersion"] == "v1.36.3"
    assert got["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    # its identity is system:node:<name>, which the Node authorizer confines (no listing of Secrets)
    as_node = cluster.kubectl("--token", cluster.state.real_nodes[node.name], "get", "secrets", "-A", check=False)
    assert as_node.returncode != 0 and f'"system:node:{node.name}" cannot list resource "secrets"' in as_node.stderr


def test_a_trainer_image_pod_runs_as_the_trainer_user_and_reports_its_exit_code(kube, image):
    script = ("import os, torch, forge_trainer.train, tiktoken, kubernetes; "
              "open('/dev/termination-log', 'w').write(f'uid={os.getuid()} torch={torch.__version__}'); "
              "raise SystemExit(3)")
    t = time.monotonic()
    kube.apply(_pod("probe", image.name, script))
    state = _terminated(kube, "probe")
    TIMINGS["pod start to exit (trainer image, import torch)"] = time.monotonic() - t
    assert state["exitCode"] == 3, state
    assert state["message"].startswith("uid=10001 torch=2.11.0"), state


def test_pods_resolve_each_other_by_headless_service_name_and_connect(kube, image):
    """What the static rendezvous needs: <hostname>.<subdomain>.<namespace>.svc resolves to the pod."""
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "workers"},
                "spec": {"clusterIP": "None", "selector": {"role": "worker"},
                         "ports": [{"name": "p", "port": 29400}]}})
    server = _pod("server", image.name, (
        "import socket; s = socket.socket(); s.bind(('', 29400)); s.listen(); c, _ = s.accept(); "
        "c.sendall(b'hello'); c.close()"), hostname="rank0", subdomain="workers")
    server["metadata"]["labels"]["role"] = "worker"
    kube.apply(server)
    client = _pod("client", image.name, (
        "import socket, time\n"
        f"name = 'rank0.workers.{kube.namespace}.svc'\n"
        "for _ in range(60):\n"
        "    try:\n"
        "        c = socket.create_connection((name, 29400), timeout=5); break\n"
        "    except OSError as e:\n"
        "        err = e; time.sleep(1)\n"
        "else:\n"
        "    raise SystemExit(f'{name}: {err}')\n"
        "open('/dev/termination-log', 'w').write(c.recv(5).decode())\n"))
    kube.apply(client)
    state = _terminated(kube, "client")
    assert state["exitCode"] == 0 and state["message"] == "hello", state
