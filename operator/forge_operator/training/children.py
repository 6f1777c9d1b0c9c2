"""Pure builders of every child object of a ForgeTraining.

``desired_children`` returns plain dicts ready for server-side apply; nothing
here talks to the API server.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..api import defaults
from ..api.base import PvcLocation, s3_endpoints
from ..api.storage import s3_credentials_env
from ..api.names import (
    ANNOTATION_RESTART_REASON, CONFIG_FILE, CONFIG_MOUNT, CONTAINER_NAME, ENV_IMAGE, ENV_NODE_NAME, ENV_NODE_REGION,
    ENV_NODE_ZONE, ENV_POD_NAME, ENV_POD_NAMESPACE, ENV_RESTART_COUNT, ENV_TORCHRUN_SHUTDOWN_TIMEOUT, ENV_TRAINING_NAME,
    LABEL_ATTEMPT, LAUNCH_COMMAND, LABEL_KUEUE_QUEUE, LABEL_MANAGED_BY, LABEL_NAME, LABEL_REGION, LABEL_TRAINING,
    LABEL_ZONE, MANAGED_BY, METRICS_PORT, PRESTOP_COMMAND, PVC_MOUNT_ROOT, REWARDS_MOUNT_ROOT, SIGNING_KEY_MOUNT,
    RENDEZVOUS_PORT, SCRATCH_MOUNT, SHM_MOUNT, TERMINATION_MESSAGE_PATH, TRAINER_ACCOUNT_PREFIX,
)
from ..api.training import ForgeTraining, PodTemplateMetadata, PodTemplateSpec
from ..k8s.network import DNS_RULE, NetworkSeen, api_server_rules, build_egress_policy, url_rules
from ..k8s.objects import CONTAINER_SECURITY_CONTEXT, POD_SECURITY_CONTEXT, object_meta
from ..k8s.objects import owner_reference as controller_reference
from .translate import cache_on_scratch, s3_locations

ANNOTATION_SPEC_HASH = "forge.dev/spec-digest"  # a Job without it (made by an older operator) is not compared


@dataclass(frozen=True)
class WorkerState:
    """What the pod template depends on besides the spec: decided by the planner from the status. The
    trainer itself always resumes from the newest complete checkpoint, so no step is passed."""

    restart_count: int = 0
    suspend: bool = False
    restart_reason: str = ""
    avoid_nodes: tuple[str, ...] = ()  # nodes blamed twice: kept out by node affinity


def labels(ft: ForgeTraining) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_NAME: "forge-trainer", LABEL_TRAINING: ft.metadata.name}


def owner_reference(ft: ForgeTraining) -> dict[str, Any]:
    return controller_reference(ft.api_version, ft.kind, ft.metadata.name, ft.metadata.uid)


def _meta(ft: ForgeTraining, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return object_meta(name, ft.metadata.namespace, labels(ft) | (extra_labels or {}), owner_reference(ft))


def config_map_name(ft: ForgeTraining) -> str:
    return f"{ft.metadata.name}-config"


def service_name(ft: ForgeTraining) -> str:
    return ft.metadata.name


def service_account_name(ft: ForgeTraining) -> str:
    return ft.spec.resources.service_account_name or trainer_identity(ft)


def trainer_identity(ft: ForgeTraining) -> str:
    """Name of the ServiceAccount, Role and RoleBinding the operator makes for the workers. The prefix
    is what the chart's admission policy recognises them by."""
    return f"{TRAINER_ACCOUNT_PREFIX}{ft.metadata.name}"


def job_name(ft: ForgeTraining, restart_count: int) -> str:
    """One Job per attempt: a restart replaces the whole group with a new Job."""
    return f"{ft.metadata.name}-r{restart_count}"


def rendezvous_host(ft: ForgeTraining, restart_count: int) -> str:
    """Stable DNS name of rank 0: Indexed Job pods are <job>-<index> under the headless Service."""
    return f"{job_name(ft, restart_count)}-0.{service_name(ft)}.{ft.metadata.namespace}.svc"


def build_config_map(ft: ForgeTraining, trainer_yaml: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(ft, config_map_name(ft)),
            "data": {CONFIG_FILE: trainer_yaml}}


def build_service(ft: ForgeTraining) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(ft, service_name(ft)),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {LABEL_TRAINING: ft.metadata.name, LABEL_MANAGED_BY: MANAGED_BY},
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT},
                           {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT}]},
    }


def build_rbac(ft: ForgeTraining) -> list[dict[str, Any]]:
    """The workers' identity: they may read and annotate pods (rank 0 reports progress on its own pod;
    the chart's admission policy confines that to its own pod's progress annotation).

    With ``resources.serviceAccountName`` the workers run as the user's ServiceAccount and the operator
    grants it nothing: binding pod rights to an account other pods may share is the user's call."""
    if ft.spec.resources.service_account_name:
        return []
    name = trainer_identity(ft)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(ft, name)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(ft, name),
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(ft, name),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ft.metadata.namespace}]},
    ]


def _claims(ft: ForgeTraining) -> dict[str, bool]:
    """Every PVC the workers mount -> whether it must be writable."""
    spec = ft.spec
    inputs: list[PvcLocation] = [s.location.pvc for s in spec.data.sources if s.location.pvc]
    if spec.data.validation and spec.data.validation.source and spec.data.validation.source.location.pvc:
        inputs.append(spec.data.validation.source.location.pvc)
    if spec.model.base and spec.model.base.pvc:
        inputs.append(spec.model.base.pvc)
    if spec.tokenizer.source and spec.tokenizer.source.pvc:
        inputs.append(spec.tokenizer.source.pvc)
    inputs += [r.python.pvc for r in spec.rewards or [] if r.python and r.python.pvc]
    claims: dict[str, bool] = {}
    for loc in inputs:
        claims[loc.claim_name] = claims.get(loc.claim_name, False) or loc.read_only is False
    for loc in (spec.checkpoint.location.pvc, spec.output.location.pvc):
        if loc is not None:
            claims[loc.claim_name] = True
    return claims


def s3_secret_env(ft: ForgeTraining) -> list[dict[str, Any]]:
    """boto3's credential variables from the Secret of the training's S3 locations (they share one)."""
    return s3_credentials_env(s3_locations(ft.spec).values())


def _tolerations(ft: ForgeTraining) -> list[dict[str, Any]]:
    r = ft.spec.resources
    out = list(ft.spec.pod_setting("tolerations") or [])
    if r.gpus_per_node > 0 and not any(t.get("key") == r.gpu_resource_name for t in out):
        out.append({"key": r.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"})
    return out


def _container_resources(ft: ForgeTraining) -> dict[str, Any]:
    r = ft.spec.resources
    amounts: dict[str, Any] = {}
    if r.cpu is not None:
        amounts["cpu"] = str(r.cpu)
    if r.memory is not None:
        amounts["memory"] = str(r.memory)
    if r.gpus_per_node > 0:
        amounts[r.gpu_resource_name] = str(r.gpus_per_node)
    for name, amount in ((ft.spec.pod_template and ft.spec.pod_template.extended_resources) or {}).items():
        amounts.setdefault(name, str(amount))  # the spec's own fields win (admission refuses these anyway)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def avoiding(affinity: dict[str, Any] | None, nodes: tuple[str, ...]) -> dict[str, Any] | None:
    """The spec's affinity, with the nodes kept out: `kubernetes.io/hostname NotIn nodes` required."""
    if not nodes:
        return affinity
    return requiring(affinity, [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": list(nodes)}])


def requiring(affinity: dict[str, Any] | None, expressions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``affinity`` with node selector requirements added to every required node selector term (terms are
    ORed, so each must carry them), or as the only term."""
    if not expressions:
        return affinity
    out = copy.deepcopy(affinity or {})
    required = out.setdefault("nodeAffinity", {}).setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    required["nodeSelectorTerms"] = [{**t, "matchExpressions": [*(t.get("matchExpressions") or []), *expressions]}
                                     for t in terms]
    return out


def residency_requirements(ft: ForgeTraining) -> list[dict[str, Any]]:
    """spec.residency as node selector requirements on the well-known topology labels."""
    res = ft.spec.residency
    if res is None:
        return []
    return [{"key": key, "operator": "In", "values": list(values)}
            for key, values in ((LABEL_REGION, res.regions), (LABEL_ZONE, res.zones)) if values]


def torchrun_command(ft: ForgeTraining, restart_count: int) -> list[str]:
    """torchrun (through ``forge_trainer.launch``, which makes a rendezvous timeout recognisable) with
    the static rendezvous: the node rank is the Job's completion index, node rank 0 hosts the store
    under its stable DNS name, and every node waits up to ``failurePolicy.rendezvousTimeoutSeconds``
    for the others (rank 0 for all to join; the others for rank 0's name to resolve and accept)."""
    r = ft.spec.resources
    return [
        *LAUNCH_COMMAND, f"--nnodes={r.num_nodes}", f"--nproc-per-node={max(1, r.gpus_per_node)}",
        "--node-rank=$(JOB_COMPLETION_INDEX)", "--rdzv-backend=static",
        f"--rdzv-endpoint={rendezvous_host(ft, restart_count)}:{RENDEZVOUS_PORT}",
        f"--rdzv-id={ft.metadata.uid or ft.metadata.name}-r{restart_count}",
        f"--rdzv-conf=timeout={ft.spec.failure_policy.rendezvous_timeout_seconds}",
        # the operator restarts the whole group; torchrun must not half-restart it
        "--max-restarts=0",
        "-m", "forge_trainer", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}",
    ]


def torchrun_shutdown_timeout(grace_period_seconds: int) -> int:
    """How long torchrun (torch >= 2.12) waits for its workers after forwarding SIGTERM: most of the
    pod's grace period, leaving 30 s for torchrun itself; never less than its own default of 30 s."""
    return max(30, grace_period_seconds - 30)


def _field_env(name: str, path: str) -> dict[str, Any]:
    """An environment variable from the downward API."""
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _volumes_and_mounts(ft: ForgeTraining) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The worker's own volumes and their mounts: the config, shared memory, the claims, node-local
    scratch, reward ConfigMaps and the signing key (the spec's own volumes come after these)."""
    r = ft.spec.resources
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(ft)}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": str(r.shm_size)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "shm", "mountPath": SHM_MOUNT},
    ]
    for claim, writable in sorted(_claims(ft).items()):
        volumes.append({"name": f"pvc-{claim}", "persistentVolumeClaim": {"claimName": claim,
                                                                         "readOnly": not writable}})
        mounts.append({"name": f"pvc-{claim}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": not writable})
    if cache_on_scratch(ft.spec):  # node-local: prepared data, S3 copies, checkpoints on their way up
        volumes.append({"name": "scratch", "emptyDir": {}})
        mounts.append({"name": "scratch", "mountPath": SCRATCH_MOUNT})
    for cm in sorted({r.python.config_map.name for r in ft.spec.rewards or [] if r.python and r.python.config_map}):
        volumes.append({"name": f"rewards-{cm}", "configMap": {"name": cm}})
        mounts.append({"name": f"rewards-{cm}", "mountPath": f"{REWARDS_MOUNT_ROOT}/{cm}", "readOnly": True})
    key = ft.spec.provenance.signing_key_secret
    if key is not None:  # every worker pod has it (one pod template); only rank 0 reads it
        volumes.append({"name": "signing-key", "secret": {"secretName": key.name, "defaultMode": 0o440,
                                                         "items": [{"key": key.key, "path": key.key}]}})
        mounts.append({"name": "signing-key", "mountPath": SIGNING_KEY_MOUNT, "readOnly": True})
    return volumes + (ft.spec.pod_setting("volumes") or []), mounts + (ft.spec.pod_setting("volume_mounts") or [])


def _worker_env(ft: ForgeTraining, state: WorkerState, image: str) -> list[dict[str, Any]]:
    """The worker's environment: who it is, what provenance records of where it runs, the S3
    credentials, then the spec's own variables."""
    env: list[dict[str, Any]] = [
        _field_env(ENV_POD_NAME, "metadata.name"),
        _field_env(ENV_POD_NAMESPACE, "metadata.namespace"),
        {"name": ENV_TRAINING_NAME, "value": ft.metadata.name},
        {"name": ENV_RESTART_COUNT, "value": str(state.restart_count)},
        # what provenance.json records of where the model was made
        {"name": ENV_IMAGE, "value": image},
        _field_env(ENV_NODE_NAME, "spec.nodeName"),
        _field_env(ENV_NODE_REGION, f"metadata.labels['{LABEL_REGION}']"),
        _field_env(ENV_NODE_ZONE, f"metadata.labels['{LABEL_ZONE}']"),
    ]
    user_env = ft.spec.pod_setting("env") or []
    if not any(e.get("name") == ENV_TORCHRUN_SHUTDOWN_TIMEOUT for e in user_env):  # the spec's wins
        env.append({"name": ENV_TORCHRUN_SHUTDOWN_TIMEOUT,
                    "value": str(torchrun_shutdown_timeout(ft.spec.resources.termination_grace_period_seconds))})
    return env + s3_secret_env(ft) + user_env


def build_pod_template(ft: ForgeTraining, state: WorkerState, image: str) -> dict[str, Any]:
    """The worker pod."""
    r = ft.spec.resources
    volumes, mounts = _volumes_and_mounts(ft)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME, "image": image, "command": torchrun_command(ft, state.restart_count),
        "env": _worker_env(ft, state, image), "volumeMounts": mounts,
        "ports": [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    # The kubelet runs preStop before it sends SIGTERM to PID 1 (torchrun): the hook sends SIGTERM to
    # the workers and waits until they have checkpointed and exited, bounded by the grace period.
    # Otherwise torchrun forwards SIGTERM and SIGKILLs them after 30 s (fixed before torch 2.12).
    container["lifecycle"] = {"preStop": {"exec": {"command": list(PRESTOP_COMMAND)}}}
    if r.image_pull_policy:
        container["imagePullPolicy"] = r.image_pull_policy
    pt = ft.spec.pod_template or PodTemplateSpec()
    container["securityContext"] |= copy.deepcopy(pt.container_security_context or {})
    resources = _container_resources(ft)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT) | copy.deepcopy(pt.security_context or {}),
        "subdomain": service_name(ft),
        "serviceAccountName": service_account_name(ft),
        "terminationGracePeriodSeconds": r.termination_grace_period_seconds,
        "containers": [container],
        "volumes": volumes,
    }
    tolerations = _tolerations(ft)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    affinity = requiring(avoiding(ft.spec.pod_setting("affinity"), state.avoid_nodes), residency_requirements(ft))
    for key, value in (("nodeSelector", ft.spec.pod_setting("node_selector")), ("affinity", affinity),
                       ("priorityClassName", r.priority_class_name)):
        if value:
            pod_spec[key] = value
    if secrets := ft.spec.pod_setting("image_pull_secrets"):
        pod_spec["imagePullSecrets"] = [{"name": n} for n in secrets]
    meta = pt.metadata or PodTemplateMetadata()
    return {
        "metadata": {"labels": (meta.labels or {}) | labels(ft) | {LABEL_ATTEMPT: str(state.restart_count)},
                     "annotations": (meta.annotations or {}) | {"prometheus.io/scrape": "true",
                                                                "prometheus.io/port": str(METRICS_PORT)}},
        "spec": pod_spec,
    }


# what running workers do not depend on: the operator acts on these itself
SPEC_NOT_HASHED = {"scheduling": True, "failure_policy": True, "evaluation": True,
                   "ttl_seconds_after_finished": True, "training": {"budget": {"max_gpu_hours"}}}


def spec_hash(ft: ForgeTraining) -> str:
    """Digest of what running workers depend on in the spec; a change means a controlled restart.

    Made from the spec as written (fields left at their defaults do not count), never from the
    objects the operator renders from it: a new operator release that renders pods or the trainer
    configuration differently (a new default image, a new hook) restarts no running training; its
    next attempt gets the new rendering. Left out too: suspension and the queue (they change the
    Job in place), the failure policy, the evaluation, the TTL and ``budget.maxGpuHours``, which the
    operator itself acts on.
    """
    written = ft.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude=SPEC_NOT_HASHED)
    return hashlib.sha256(json.dumps(written, sort_keys=True).encode()).hexdigest()[:16]


def build_job(ft: ForgeTraining, state: WorkerState, image: str, hash_: str) -> dict[str, Any]:
    n = ft.spec.resources.num_nodes
    extra_labels = {LABEL_ATTEMPT: str(state.restart_count)}
    if ft.spec.scheduling.queue_name:
        extra_labels[LABEL_KUEUE_QUEUE] = ft.spec.scheduling.queue_name
    meta = _meta(ft, job_name(ft, state.restart_count), extra_labels)
    meta["annotations"] = {ANNOTATION_SPEC_HASH: hash_}
    if state.restart_reason:
        meta["annotations"][ANNOTATION_RESTART_REASON] = state.restart_reason
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
        "spec": {
            "completionMode": "Indexed", "completions": n, "parallelism": n,
            # any failed rank fails the Job at once; the operator then restarts the whole group
            "backoffLimit": 0,
            "suspend": state.suspend,
            "template": build_pod_template(ft, state, image),
        },
    }


def network_policy_name(ft: ForgeTraining) -> str:
    return ft.metadata.name


def egress_urls(spec: dict[str, Any]) -> list[str]:
    """The URLs of a training's spec (as a dict) that its workers reach: HTTP reward services, S3 endpoints."""
    rewards = spec.get("rewards") or []
    urls = [(r.get("http") or {}).get("url") for r in rewards if isinstance(r, dict)]
    return [u for u in urls if isinstance(u, str)] + s3_endpoints(spec)


def build_network_policy(ft: ForgeTraining, seen: NetworkSeen) -> dict[str, Any]:
    """The cluster's side of ``network.egress: Restricted``: the workers talk to each other, DNS, the
    API server, the spec's HTTP reward services and S3 endpoint, and Prometheus scrapes their metrics port."""
    own = {"podSelector": {"matchLabels": labels(ft)}}  # the worker pods of every attempt
    urls = egress_urls(ft.spec.model_dump(mode="json", by_alias=True, exclude_none=True))
    return build_egress_policy(
        _meta(ft, network_policy_name(ft)), labels(ft),
        ingress=[{"from": [copy.deepcopy(own)]}, {"ports": [{"protocol": "TCP", "port": METRICS_PORT}]}],
        egress=[{"to": [copy.deepcopy(own)]}, copy.deepcopy(DNS_RULE), *api_server_rules(seen),
                *url_rules(urls, ft.metadata.namespace, seen)])


def desired_children(ft: ForgeTraining, trainer_yaml: str, state: WorkerState, *, image: str | None = None,
                     include_job: bool = True, network: NetworkSeen = NetworkSeen()) -> list[dict[str, Any]]:
    """Every object the training needs, in apply order.

    The trainer configuration is written with the Job only, when an attempt starts: the workers of
    an attempt read the configuration it started with, also when they start later (a resume, Kueue's
    admission) under an operator that translates the spec differently. An edit is a new attempt.
    With ``network.egress: Restricted`` a NetworkPolicy locks the workers in at the cluster level too."""
    image = ft.spec.resources.image or image or defaults.TRAINER_IMAGE
    children = [build_service(ft), *build_rbac(ft)]
    if ft.spec.network.egress == "Restricted":
        children.append(build_network_policy(ft, network))
    if include_job:
        children = [build_config_map(ft, trainer_yaml), *children, build_job(ft, state, image, spec_hash(ft))]
    return children
