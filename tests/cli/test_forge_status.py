"""`forge status` on the real control plane: found and shown the way kubectl finds and shows things."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "operator"))
from operator_support import training  # noqa: E402

pytestmark = pytest.mark.cluster


def forge_status(*args: str, kubeconfig: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    env["HOME"] = str(ROOT / "tests" / "no-such-home")  # never the developer's own ~/.kube/config
    return subprocess.run([sys.executable, "-m", "forge_operator", "status", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_status_lists_shows_and_explains_like_kubectl(kube, crds, tmp_path):
    kube.apply(training("llm"))
    kube.apply(training("other"))

    listed = forge_status("-n", kube.namespace, kubeconfig=kube.kubeconfig)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["NAMESPACE", "NAME", "PHASE"]
    assert sorted(r.split()[1] for r in rows) == ["llm", "other"]

    # the current context's namespace is the default, as for kubectl
    own = tmp_path / "kubeconfig"
    own.write_text(Path(kube.kubeconfig).read_text())
    subprocess.run(["kubectl", "--kubeconfig", str(own), "config", "set-context", "--current",
                    f"--namespace={kube.namespace}"], check=True, capture_output=True)
    one = forge_status("llm", kubeconfig=str(own))
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines()[1].split()[:2] == [kube.namespace, "llm"]

    everywhere = forge_status("-A", "-o", "json", kubeconfig=kube.kubeconfig)
    assert everywhere.returncode == 0, everywhere.stderr
    names = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in json.loads(everywhere.stdout)["items"]}
    assert {(kube.namespace, "llm"), (kube.namespace, "other")} <= names

    as_yaml = forge_status("other", "-n", kube.namespace, "-o", "yaml", kubeconfig=kube.kubeconfig)
    assert yaml.safe_load(as_yaml.stdout)["metadata"]["name"] == "other"


def test_status_says_what_is_wrong_without_a_traceback(kube, crds, tmp_path):
    missing = forge_status("nope", "-n", kube.namespace, kubeconfig=kube.kubeconfig)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f'forge status: forgetraining "nope" not found in namespace "{kube.namespace}"'

    empty = forge_status("-n", kube.namespace, kubeconfig=kube.kubeconfig)
    assert empty.returncode == 0 and empty.stdout == ""
    assert empty.stderr.strip() == f"No ForgeTrainings found in namespace {kube.namespace}."

    nowhere = forge_status(kubeconfig=str(tmp_path / "absent"))
    assert nowhere.returncode == 1 and "Traceback" not in nowhere.stderr
    assert nowhere.stderr.startswith("forge status: no cluster to ask:")

    no_cluster = forge_status(kubeconfig=None)  # no $KUBECONFIG, no ~/.kube/config, not in a pod
    assert no_cluster.returncode == 1 and no_cluster.stderr.startswith("forge status: no cluster to ask:")

    unknown_context = forge_status("--context", "nope", kubeconfig=kube.kubeconfig)
    assert unknown_context.returncode == 1 and "no context named 'nope'" in unknown_context.stderr


@pytest.mark.parametrize("args", [["status", "--namespce", "x"], ["status", "--name", "x"],
                                  ["train", "f.yaml", "--vol", "a=b"], ["status", "-A", "-n", "x"]])
def test_misspelt_shortened_or_conflicting_options_are_refused(args):
    out = subprocess.run([sys.executable, "-m", "forge_operator", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "error:" in out.stderr
