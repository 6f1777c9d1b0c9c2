"""The Helm chart, with a real helm: lint, render in both RBAC modes, install into the test control plane.

The operator's pods do not run on the test cluster (kwok nodes only); what is
checked there is what an administrator would check after `helm install`: the
CRDs, the objects, and what the operator's ServiceAccount may and may not do.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from forge_operator import kopf_app
from forge_operator.api.names import ANNOTATION_PROGRESS, TRAINER_ACCOUNT_PREFIX
from forge_operator.api.training import ForgeTraining
from forge_operator.cli import runner
from forge_operator.training.children import WorkerState, build_rbac, desired_children
from forge_operator.training.translate import trainer_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "forge"
NAMESPACED = {"watchNamespaces": ["team-a", "team-b"]}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# Every grant the operator needs in a namespace it watches, and no other: (apiGroup, resource) -> verbs.
CHILD_VERBS = {"create", "get", "list", "watch", "patch", "delete"}
NAMESPACE_GRANTS = {
    ("forge.dev", "forgetrainings"): {"get", "list", "watch"},
    ("forge.dev", "forgeevals"): {"create", "get", "list", "watch", "patch"},  # a training's evaluation
    ("forge.dev", "forgetrainings/status"): {"update", "patch"},
    ("forge.dev", "forgeevals/status"): {"update", "patch"},
    ("forge.dev", "forgetrainings/finalizers"): {"update"},  # blockOwnerDeletion on the children
    ("forge.dev", "forgeevals/finalizers"): {"update"},
    ("batch", "jobs"): CHILD_VERBS,
    ("", "configmaps"): CHILD_VERBS,
    ("", "services"): CHILD_VERBS,
    ("", "serviceaccounts"): CHILD_VERBS,
    ("rbac.authorization.k8s.io", "roles"): CHILD_VERBS,
    ("rbac.authorization.k8s.io", "rolebindings"): CHILD_VERBS,
    ("networking.k8s.io", "networkpolicies"): CHILD_VERBS,  # network.egress Restricted
    ("", "pods"): {"get", "list", "watch", "patch", "delete"},
    ("", "events"): {"create", "patch", "list"},  # list: a Job's FailedCreate, only while it lacks pods
    ("", "persistentvolumeclaims"): {"get"},  # the claims of workers the scheduler cannot place
    ("kueue.x-k8s.io", "localqueues"): {"get"},  # the LocalQueue of a queued training
}
NODE_GRANTS = {("", "nodes"): {"get", "list", "watch"}}
# in `default` only, both modes: the `kubernetes` Service's EndpointSlices (the trainings' NetworkPolicies)
API_SERVER_GRANTS = {("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"}}


def grants(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], f"wildcard grant: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(docs: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(docs)["env"]}


def example_training(namespace: str) -> ForgeTraining:
    o = yaml.safe_load((ROOT / "examples" / "pretrain-dense.yaml").read_text())
    o["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), generation=1)
    return ForgeTraining.model_validate(o)


def api_server_role(docs: list[dict], namespace: str) -> None:
    """The Role in `default` that reads the API server's EndpointSlices, bound to the operator."""
    [role] = [r for r in of_kind(docs, "Role") if r["metadata"]["namespace"] == "default"]
    [binding] = [b for b in of_kind(docs, "RoleBinding") if b["metadata"]["namespace"] == "default"]
    assert grants(role["rules"]) == API_SERVER_GRANTS
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]


# --------------------------------------------------------------------------- lint and render
@pytest.mark.parametrize("values", [{}, NAMESPACED, {"peering": {"enabled": False}, "replicas": 1},
                                    {"metrics": {"serviceMonitor": {"enabled": True}}}],
                         ids=["cluster-wide", "namespaced", "standalone", "servicemonitor"])
def test_lint(helm, values):
    helm("lint", "--strict", str(CHART), "--values", helm.values_file(values))


def test_cluster_wide_by_default(helm):
    docs = helm.template(release="forge", namespace="forge-system")
    assert sorted(d["kind"] for d in docs) == sorted([
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment", "ClusterKopfPeering",
        "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "Role", "RoleBinding"])
    api_server_role(docs, "forge-system")
    assert "matchResources" not in one(docs, "ValidatingAdmissionPolicyBinding")["spec"]  # every namespace
    role = one(docs, "ClusterRole")
    assert grants(role["rules"]) == NAMESPACE_GRANTS | NODE_GRANTS | {
        ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"}}
    binding = one(docs, "ClusterRoleBinding")
    sa = one(docs, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "forge-system"}]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert "args" not in container(docs)  # no --namespace: every namespace
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == env(docs)[kopf_app.ENV_PEERING] == "forge"


def test_namespaced_mode_grants_nothing_cluster_wide(helm):
    docs = helm.template(NAMESPACED | {"rbac": {"readNodes": False}}, namespace="forge-system")
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    assert not of_kind(docs, "ClusterKopfPeering")
    api_server_role(docs, "forge-system")
    roles = {r["metadata"]["namespace"]: r for r in of_kind(docs, "Role") if r["metadata"]["namespace"] != "default"}
    bindings = {b["metadata"]["namespace"]: b for b in of_kind(docs, "RoleBinding")
                if b["metadata"]["namespace"] != "default"}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for ns, role in roles.items():
        assert grants(role["rules"]) == NAMESPACE_GRANTS | {
            ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"}}
        assert bindings[ns]["subjects"][0]["namespace"] == "forge-system"
    assert container(docs)["args"] == ["--namespace", "team-a", "--namespace", "team-b"]
    assert {p["metadata"]["namespace"] for p in of_kind(docs, "KopfPeering")} == {"team-a", "team-b"}
    # the worker-pod policy applies in the watched namespaces only
    selector = one(docs, "ValidatingAdmissionPolicyBinding")["spec"]["matchResources"]["namespaceSelector"]
    assert selector["matchExpressions"] == [{"key": "kubernetes.io/metadata.name", "operator": "In",
                                             "values": ["team-a", "team-b"]}]


def test_namespaced_mode_can_read_nodes_and_nothing_else_cluster_wide(helm):
    docs = helm.template(NAMESPACED)  # rbac.readNodes defaults to true
    [cluster_role] = of_kind(docs, "ClusterRole")
    assert grants(cluster_role["rules"]) == NODE_GRANTS
    [binding] = of_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]


@pytest.mark.parametrize("values", [{}, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_the_operator_may_apply_every_child_it_builds(helm, values):
    """Server-side apply of each child needs create+patch; granting the trainer Role needs its verbs (escalation)."""
    docs = helm.template(values)
    rules = of_kind(docs, "ClusterRole") + of_kind(docs, "Role")
    held = grants([r for role in rules for r in role["rules"]])
    ft = example_training("team-a")
    for child in desired_children(ft, trainer_config(ft).to_yaml(), WorkerState(), image="trainer:1"):
        group = child["apiVersion"].rpartition("/")[0]
        resource = {"NetworkPolicy": "networkpolicies"}.get(child["kind"], child["kind"].lower() + "s")
        assert {"create", "patch", "get"} <= held[(group, resource)], child["kind"]
    [trainer_role] = [c for c in build_rbac(ft) if c["kind"] == "Role"]
    for (group, resource), verbs in grants(trainer_role["rules"]).items():
        assert verbs <= held[(group, resource)], f"cannot grant {resource} {verbs} to the trainer"


def test_operator_container_matches_what_the_operator_reads(helm):
    docs = helm.template({"trainerImage": "registry.internal/forge/trainer:7", "resyncSeconds": 30,
                          "reconcileWorkers": 4})
    c = container(docs)
    e = env(docs)
    assert e[kopf_app.ENV_TRAINER_IMAGE] == "registry.internal/forge/trainer:7"
    assert float(e[kopf_app.ENV_RESYNC_SECONDS]) == 30
    assert int(e[kopf_app.ENV_RECONCILE_WORKERS]) == 4
    assert int(e[kopf_app.ENV_METRICS_PORT]) == 8000
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert e[runner.ENV_HEALTH_ENDPOINT] == f"http://0.0.0.0:{ports['health']}/healthz"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert ports["metrics"] == 8000
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["selector"].items() <= pod_labels(docs).items()


def test_the_charts_operator_settings_default_to_the_operators_own():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["resyncSeconds"] == kopf_app.RESYNC_SECONDS
    assert values["reconcileWorkers"] == kopf_app.RECONCILE_WORKERS


def pod_labels(docs: list[dict]) -> dict[str, str]:
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]


def test_air_gapped_values_leave_no_outside_reference(helm):
    values = {"image": {"repository": "registry.internal/forge/forge-operator",
                        "digest": "sha256:" + "a" * 64, "pullPolicy": "Never"},
              "trainerImage": "registry.internal/forge/forge-trainer:0.1.0",
              "imagePullSecrets": [{"name": "internal-registry"}],
              "nodeSelector": {"node-role.kubernetes.io/control": "true"},
              "tolerations": [{"key": "control", "operator": "Exists", "effect": "NoSchedule"}],
              "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}}}
    docs = helm.template(values)
    text = json.dumps(docs)
    assert "ghcr.io" not in text and "docker.io" not in text
    c = container(docs)
    assert c["image"] == "registry.internal/forge/forge-operator@sha256:" + "a" * 64
    assert c["imagePullPolicy"] == "Never"
    assert c["resources"]["requests"] == values["resources"]["requests"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "internal-registry"}]
    assert pod["nodeSelector"] == values["nodeSelector"] and pod["tolerations"] == values["tolerations"]


def test_image_tag_defaults_to_the_app_version(helm):
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container(helm.template())["image"] == f"ghcr.io/forge-dev/forge-operator:{app_version}"
    assert container(helm.template({"image": {"tag": "0.2.0-rc1"}}))["image"].endswith(":0.2.0-rc1")


def test_service_monitor_is_optional(helm):
    assert not of_kind(helm.template(), "ServiceMonitor")
    docs = helm.template({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    sm = one(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= one(docs, "Service")["metadata"]["labels"].items()
    docs = helm.template({"metrics": {"enabled": False}})
    assert not of_kind(docs, "Service") and kopf_app.ENV_METRICS_PORT not in env(docs)


def test_standalone_mode_has_no_peering(helm):
    docs = helm.template({"peering": {"enabled": False}, "replicas": 1})
    assert kopf_app.ENV_PEERING not in env(docs)
    assert not of_kind(docs, "ClusterKopfPeering")
    assert ("kopf.dev", "clusterkopfpeerings") not in grants(one(docs, "ClusterRole")["rules"])


def test_nothing_breaks_an_install(helm):
    """No webhooks, no hooks, no lookups of live objects (kubeflow/trainer#2404)."""
    for values in ({}, NAMESPACED, {"metrics": {"serviceMonitor": {"enabled": True}}}):
        for d in helm.template(values):
            assert "Webhook" not in d["kind"], d["kind"]
            assert "helm.sh/hook" not in (d["metadata"].get("annotations") or {})
    templates = "".join(p.read_text() for p in (CHART / "templates").iterdir())
    assert "lookup" not in templates


@pytest.mark.parametrize("values, error", [
    ({"replicas": 3, "peering": {"enabled": False}}, "needs peering.enabled"),
    ({"watchNamespaces": ["Team_A"]}, "does not match pattern"),
    ({"watchNamespaces": ["team-a", "team-a"]}, "items at 0 and 1 are equal"),
    ({"replica": 2}, "additional properties 'replica' not allowed"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"image": {"digest": "latest"}}, "digest"),
    ({"metrics": {"port": 0}}, "port"),
])
def test_bad_values_are_refused(helm, values, error):
    assert error in helm.template_error(values)


def test_the_chart_and_the_image_agree():
    """The chart runs the image's ENTRYPOINT as the numeric user the Dockerfile creates."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    assert f"USER {uid}:{values['podSecurityContext']['runAsGroup']}" in dockerfile
    assert 'ENTRYPOINT ["forge", "operator"]' in dockerfile
    assert ".[operator]" in dockerfile and "trainer]" not in dockerfile  # the image never installs torch
    assert f"EXPOSE {values['metrics']['port']} {values['health']['port']}" in dockerfile


def test_the_worker_pod_policy_knows_the_workers_and_their_annotation(helm):
    policy = one(helm.template(release="forge", namespace="forge-system"), "ValidatingAdmissionPolicy")
    condition = policy["spec"]["matchConditions"][0]["expression"]
    assert f":{TRAINER_ACCOUNT_PREFIX}')" in condition
    assert all(f"'{ANNOTATION_PROGRESS}'" in v["expression"] for v in policy["spec"]["validations"][1:])


def test_the_operator_runs_without_the_trainers_dependencies():
    """What the image installs (`forge[operator]`, no torch) is enough to start `forge operator`."""
    blocked = ["torch", "transformers", "accelerate", "tokenizers", "tiktoken", "safetensors", "pyarrow", "tqdm"]
    code = ("import sys\n"
            f"for m in {blocked!r}: sys.modules[m] = None\n"
            "import forge_operator.kopf_app, forge_operator.cli.runner\n"
            "from forge_operator.cli import main\n"
            "main(['operator', '--help'])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--namespace" in out.stdout, out.stderr


# --------------------------------------------------------------------------- installed into the control plane
def can_i(cluster, sa: str, verb: str, resource: str, namespace: str | None, subresource: str = "") -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={sa}"]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    if subresource:
        args.append(f"--subresource={subresource}")
    out = cluster.kubectl(*args, check=False)
    assert out.stdout.strip() in ("yes", "no"), out.stderr
    return out.stdout.strip() == "yes"


class Release:
    def __init__(self, helm, cluster, values: dict, watch: list[str]):
        tag = uuid.uuid4().hex[:6]
        self.helm, self.cluster = helm, cluster
        self.name, self.namespace = f"forge-{tag}", f"forge-system-{tag}"
        self.watch = [f"{ns}-{tag}" for ns in watch]
        # the fake nodes carry the GPU taint: tolerating it lets kwok "run" the operator pods
        self.values = values | {"tolerations": [GPU_TOLERATION]} | (
            {"watchNamespaces": self.watch} if self.watch else {})

    def install(self) -> "Release":
        for ns in self.watch:
            self.cluster.kubectl("create", "namespace", ns)
        # --wait: Helm 4 waits for crds/ to be served only with a wait strategy (Helm 3 always did);
        # without it the peering objects can race the CRDs they need (see docs/install.md)
        self.helm("install", self.name, str(CHART), "--namespace", self.namespace, "--create-namespace",
                  "--wait", "--timeout", "90s", "--values", self.helm.values_file(self.values))
        return self

    def uninstall(self) -> None:
        self.helm("uninstall", self.name, "--namespace", self.namespace, check=False)
        for ns in [self.namespace, *self.watch]:
            self.cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)

    @property
    def sa(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"


@pytest.fixture(scope="module")
def installs(helm, cluster):
    """Two releases side by side: one cluster-wide, one watching two namespaces."""
    h = copy.copy(helm)
    h.kubeconfig = cluster.state.kubeconfig
    wide = Release(h, cluster, {}, [])
    narrow = Release(h, cluster, {"rbac": {"readNodes": False}}, ["team-a", "team-b"])
    try:
        yield wide.install(), narrow.install()
    finally:
        wide.uninstall()
        narrow.uninstall()


@pytest.mark.cluster
def test_install_creates_the_crds_and_the_operator(installs, cluster):
    wide, narrow = installs
    crds = json.loads(cluster.kubectl("get", "crd", "-o", "json").stdout)["items"]
    names = {c["metadata"]["name"] for c in crds}
    assert {"forgetrainings.forge.dev", "forgeevals.forge.dev",
            "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"} <= names
    for release in installs:
        objs = json.loads(cluster.kubectl("get", "deployment,serviceaccount,service", "-n", release.namespace,
                                          "-l", f"app.kubernetes.io/instance={release.name}", "-o", "json").stdout)
        assert sorted(o["kind"] for o in objs["items"]) == ["Deployment", "Service", "ServiceAccount"]
        deployment = next(o for o in objs["items"] if o["kind"] == "Deployment")
        assert deployment["status"].get("availableReplicas") == 2  # helm --wait saw it available
    assert cluster.kubectl("get", "clusterkopfpeering", wide.name, check=False).returncode == 0
    for ns in narrow.watch:
        assert cluster.kubectl("get", "kopfpeering", narrow.name, "-n", ns, check=False).returncode == 0
    cluster_roles = json.loads(cluster.kubectl("get", "clusterrole,clusterrolebinding", "-o", "json", "-l",
                                               f"app.kubernetes.io/instance={narrow.name}").stdout)["items"]
    assert cluster_roles == []


@pytest.mark.cluster
def test_installed_crds_equal_the_files(installs, cluster):
    for folder in (CHART / "crds", ROOT / "crds"):
        out = cluster.kubectl("diff", "--server-side", "-f", str(folder), check=False)
        assert out.returncode == 0, f"the cluster's CRDs differ from {folder.relative_to(ROOT)}:\n{out.stdout}{out.stderr}"


@pytest.mark.cluster
def test_cluster_wide_operator_may_do_its_work_everywhere(installs, cluster):
    wide, _ = installs
    for ns in ("default", wide.namespace):
        assert can_i(cluster, wide.sa, "create", "jobs.batch", ns)
        assert can_i(cluster, wide.sa, "patch", "forgetrainings.forge.dev", ns, subresource="status")
        assert can_i(cluster, wide.sa, "delete", "pods", ns)
        assert not can_i(cluster, wide.sa, "update", "forgetrainings.forge.dev", ns)  # spec is the user's
        assert not can_i(cluster, wide.sa, "get", "secrets", ns)
    assert can_i(cluster, wide.sa, "list", "jobs.batch", None)
    assert can_i(cluster, wide.sa, "get", "nodes", None)
    assert can_i(cluster, wide.sa, "watch", "nodes", None)
    assert can_i(cluster, wide.sa, "list", "endpointslices.discovery.k8s.io", "default")
    assert can_i(cluster, wide.sa, "watch", "endpointslices.discovery.k8s.io", "default")
    assert can_i(cluster, wide.sa, "watch", "services", wide.namespace)
    assert not can_i(cluster, wide.sa, "create", "clusterroles.rbac.authorization.k8s.io", None)


@pytest.mark.cluster
def test_namespaced_operator_is_confined_to_its_namespaces(installs, cluster):
    _, narrow = installs
    for ns in narrow.watch:
        assert can_i(cluster, narrow.sa, "create", "jobs.batch", ns)
        assert can_i(cluster, narrow.sa, "patch", "forgetrainings.forge.dev", ns, subresource="status")
        assert can_i(cluster, narrow.sa, "patch", "kopfpeerings.kopf.dev", ns)
    for ns in ("default", narrow.namespace):
        assert not can_i(cluster, narrow.sa, "list", "jobs.batch", ns)
        assert not can_i(cluster, narrow.sa, "list", "forgetrainings.forge.dev", ns)
    assert not can_i(cluster, narrow.sa, "list", "jobs.batch", None)
    assert not can_i(cluster, narrow.sa, "get", "nodes", None)
    assert can_i(cluster, narrow.sa, "list", "endpointslices.discovery.k8s.io", "default")  # that alone there
    assert not can_i(cluster, narrow.sa, "list", "endpointslices.discovery.k8s.io", narrow.watch[0])


@pytest.mark.cluster
def test_the_operator_may_block_the_deletion_of_the_trainings_it_owns(installs, cluster):
    """The children's owner references set blockOwnerDeletion, which needs update on the owner's
    finalizers where the API server enforces it (OpenShift does; so does the test control plane)."""
    wide, narrow = installs
    for release, namespaces in ((wide, ["default", wide.namespace]), (narrow, narrow.watch)):
        for ns in namespaces:
            for kind in ("forgetrainings.forge.dev", "forgeevals.forge.dev"):  # a ForgeEval owns its Job
                assert can_i(cluster, release.sa, "update", kind, ns, subresource="finalizers")
                assert not can_i(cluster, release.sa, "update", kind, ns)  # spec is the user's
    assert not can_i(cluster, narrow.sa, "update", "forgetrainings.forge.dev", "default", subresource="finalizers")
    assert not can_i(cluster, narrow.sa, "update", "forgeevals.forge.dev", "default", subresource="finalizers")


@pytest.mark.cluster
def test_the_operator_may_make_a_trainings_forgeeval_and_report_on_it(installs, cluster):
    """A training with spec.evaluation creates its ForgeEval (server-side apply: create + patch); the
    operator writes each ForgeEval's status, never another's spec, and only where it watches."""
    wide, narrow = installs
    for release, namespaces in ((wide, ["default", wide.namespace]), (narrow, narrow.watch)):
        for ns in namespaces:
            for verb in ("create", "patch", "get", "list", "watch"):
                assert can_i(cluster, release.sa, verb, "forgeevals.forge.dev", ns)
            assert can_i(cluster, release.sa, "patch", "forgeevals.forge.dev", ns, subresource="status")
            assert not can_i(cluster, release.sa, "delete", "forgeevals.forge.dev", ns)
    for verb in ("create", "list"):
        assert not can_i(cluster, narrow.sa, verb, "forgeevals.forge.dev", "default")


@pytest.mark.cluster
@pytest.mark.parametrize("which", [0, 1], ids=["cluster-wide", "namespaced"])
def test_the_api_server_lets_the_operator_apply_a_trainings_children(installs, cluster, which):
    """Not can-i on paper: the API server itself (RBAC escalation checks included) accepts, as the
    operator's ServiceAccount, a server-side apply of every child the operator builds. For real, not
    dry-run: binding the trainer Role is only checked against a Role that exists, and the owner
    references' blockOwnerDeletion against the training (OwnerReferencesPermissionEnforcement is on).
    The Job is suspended, so no worker takes the cluster's fake GPUs."""
    release = installs[which]
    ns = release.watch[0] if release.watch else release.namespace
    ft = example_training(ns)
    # the owner must exist, or the garbage collector removes the children while they are applied
    owner = ft.to_dict()
    owner["metadata"] = {"name": ft.metadata.name, "namespace": ns}
    cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=json.dumps(owner))
    ft.metadata.uid = json.loads(cluster.kubectl("get", "forgetraining", ft.metadata.name, "-n", ns, "-o",
                                                 "json").stdout)["metadata"]["uid"]
    children = desired_children(ft, trainer_config(ft).to_yaml(), WorkerState(suspend=True), image="trainer:1")
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": children})
    out = cluster.kubectl("apply", "--server-side", "--field-manager=forge-operator",
                          f"--as={release.sa}", "-n", ns, "-f", "-", input=manifest, check=False)
    assert out.returncode == 0, out.stderr
    assert {line.split()[0].split("/")[0] for line in out.stdout.splitlines()} >= {
        "configmap", "service", "serviceaccount", "role.rbac.authorization.k8s.io",
        "rolebinding.rbac.authorization.k8s.io", "networkpolicy.networking.k8s.io", "job.batch"}
    if release.watch:  # and nowhere else
        out = cluster.kubectl("apply", "--server-side", "--dry-run=server", f"--as={release.sa}",
                              "-n", "default", "-f", "-", input=manifest.replace(f'"{ns}"', '"default"'),
                              check=False)
        assert out.returncode != 0 and "forbidden" in out.stderr


@pytest.mark.cluster
def test_a_worker_may_update_only_its_own_pods_progress_annotation(installs, cluster):
    """The workers' Role may patch pods; the chart's ValidatingAdmissionPolicy narrows what the workers'
    ServiceAccount may do to its own pod's forge.dev/progress annotation (with its pod-bound token)."""
    ns = f"workers-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    try:
        ft = example_training(ns)
        rbac = build_rbac(ft)
        other = copy.deepcopy(rbac)  # the same grant for another account: the policy leaves it alone
        for obj in other:
            obj["metadata"]["name"] = "ci-bot"
        other[2]["roleRef"]["name"] = other[2]["subjects"][0]["name"] = "ci-bot"
        for child in [*rbac, *other]:
            child["metadata"].pop("ownerReferences", None)  # no ForgeTraining owns them here
            cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=json.dumps(child))
        worker = rbac[0]["metadata"]["name"]
        assert worker.startswith(TRAINER_ACCOUNT_PREFIX)

        def pod(name: str, account: str) -> dict:
            return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
                    "spec": {"serviceAccountName": account, "containers": [{"name": "c", "image": "trainer:1"}]}}

        for name, account in (("worker-0", worker), ("worker-1", worker), ("ci", "ci-bot")):
            cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=json.dumps(pod(name, account)))

        def token(account: str, pod_name: str) -> str:
            return cluster.kubectl("create", "token", account, "-n", ns, "--bound-object-kind", "Pod",
                                   "--bound-object-name", pod_name).stdout.strip()

        def patch(name: str, body: dict, as_token: str) -> subprocess.CompletedProcess:
            return cluster.kubectl("patch", "pod", name, "-n", ns, f"--token={as_token}", "--type=merge", "-p",
                                   json.dumps(body), check=False)

        mine, ci = token(worker, "worker-0"), token("ci-bot", "ci")
        label = {"metadata": {"labels": {"app": "changed"}}}
        deadline = time.monotonic() + 30  # the API server compiles a new policy within seconds
        while (out := patch("worker-0", label, mine)).returncode == 0 and time.monotonic() < deadline:
            patch("worker-0", {"metadata": {"labels": {"app": "worker-0"}}}, mine)
            time.sleep(1)
        assert out.returncode != 0 and "only the forge.dev/progress annotation" in out.stderr, out.stderr
        progress = {"metadata": {"annotations": {"forge.dev/progress": '{"step": 7}'}}}
        assert patch("worker-0", progress, mine).returncode == 0
        for target in ("worker-1", "ci"):  # any other pod, a worker's or not
            out = patch(target, progress, mine)
            assert out.returncode != 0 and "only its own pod" in out.stderr, out.stderr
        assert patch("worker-0", {"metadata": {"annotations": {"note": "x"}}}, mine).returncode != 0
        # a token that is not bound to the pod is refused too
        unbound = cluster.kubectl("create", "token", worker, "-n", ns).stdout.strip()
        assert patch("worker-0", progress, unbound).returncode != 0
        # other accounts with the same grant are not the policy's business
        assert patch("worker-0", label, ci).returncode == 0
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.cluster
@pytest.mark.parametrize("values", [{}, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_the_operator_pod_passes_pod_security_restricted(helm, cluster, values):
    """The API server's PodSecurity admission, in a namespace that enforces `restricted`, admits the
    operator's pod as the chart renders it (and refuses one without the chart's securityContexts)."""
    ns = f"restricted-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    try:
        cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
        template = one(helm.template(values, namespace=ns), "Deployment")["spec"]["template"]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "operator", "namespace": ns},
               "spec": template["spec"] | {"serviceAccountName": "default"}}
        bare = copy.deepcopy(pod)
        bare["spec"].pop("securityContext")
        bare["spec"]["containers"][0].pop("securityContext")
        for manifest, admitted in ((pod, True), (bare, False)):
            out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(manifest), check=False)
            assert (out.returncode == 0) is admitted, out.stderr
            assert admitted or 'violates PodSecurity "restricted:latest"' in out.stderr
        sc = template["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
        csc = template["spec"]["containers"][0]["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]}
        assert csc["readOnlyRootFilesystem"] is True
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.cluster
def test_the_operator_runs_as_its_service_account_and_is_refused_nothing(installs, cluster, tmp_path):
    """`forge operator` with each release's ServiceAccount token, as in its pod: starting, peering and
    reconciling a training, it makes no request the chart's RBAC refuses (kopf's own scanning of every
    CRD and Namespace would be refused: the operator turns it off)."""
    sys.path.insert(0, str(ROOT / "tests" / "operator"))
    from operator_support import OperatorProcess

    kubeconfig = json.loads(Path(cluster.state.kubeconfig).read_text())
    for release in installs:
        namespace = release.watch[0] if release.watch else release.namespace
        token = cluster.kubectl("create", "token", release.name, "-n", release.namespace).stdout.strip()
        path = tmp_path / f"{release.name}.kubeconfig"
        path.write_text(json.dumps(kubeconfig | {"users": [{"name": "admin", "user": {"token": token}}]}))
        op = OperatorProcess(str(path), release.watch, tmp_path / f"{release.name}.log",
                             env={"FORGE_PEERING": release.name}).start()
        try:
            training = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(training))
            deadline = time.monotonic() + 60
            while not json.loads(cluster.kubectl("get", "forgetraining", "quickstart", "-n", namespace, "-o", "json")
                                 .stdout).get("status", {}).get("phase"):
                assert time.monotonic() < deadline and op.proc.poll() is None, op.log()[-3000:]
                time.sleep(0.5)
            time.sleep(3)  # the watches kopf starts in the background
        finally:
            op.stop()
            cluster.kubectl("delete", "forgetraining", "quickstart", "-n", namespace, "--wait=false", check=False)
        assert "forbidden" not in op.log().lower(), op.log()[-3000:]
