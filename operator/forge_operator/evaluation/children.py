"""Pure builders of a ForgeEval's children: the ConfigMap with the evaluator's configuration, the
NetworkPolicy of network.egress Restricted, and the Job of one pod that runs ``python -m forge_trainer.eval``."""

from __future__ import annotations

import copy
from typing import Any

from ..api.base import PvcLocation, StorageLocation, s3_endpoints
from ..api.eval import ForgeEval
from ..api.names import (
    CONFIG_MOUNT, EVAL_COMMAND, EVAL_CONFIG_FILE, EVAL_CONTAINER_NAME, LABEL_EVAL, LABEL_MANAGED_BY, LABEL_NAME,
    MANAGED_BY, PVC_MOUNT_ROOT, REWARDS_MOUNT_ROOT, SCRATCH_MOUNT, TERMINATION_MESSAGE_PATH,
)
from ..api.rewards import reward_config_maps
from ..api.storage import s3_credentials_env
from ..k8s.network import DNS_RULE, NetworkSeen, build_egress_policy, url_rules
from ..k8s.objects import CONTAINER_SECURITY_CONTEXT, POD_SECURITY_CONTEXT, object_meta, owner_reference
from .translate import s3_locations


def job_name(fe: ForgeEval) -> str:
    """The evaluation's Job and ConfigMap (a training's are <name>-rN and <name>-config: no clash)."""
    return f"{fe.metadata.name}-eval"


def labels(fe: ForgeEval) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_NAME: "forge-eval", LABEL_EVAL: fe.metadata.name}


def pod_path(loc: PvcLocation) -> str:
    """Where a PVC path is inside the evaluation pod."""
    return "/".join(p for p in (PVC_MOUNT_ROOT, loc.claim_name, loc.path.strip("/")) if p)


def _meta(fe: ForgeEval) -> dict[str, Any]:
    return object_meta(job_name(fe), fe.metadata.namespace, labels(fe),
                       owner_reference(fe.api_version, fe.kind, fe.metadata.name, fe.metadata.uid))


def _claims(fe: ForgeEval, model: StorageLocation, baseline: StorageLocation | None) -> dict[str, bool]:
    """Every claim the pod mounts -> writable (the model's: the results go next to it)."""
    claims = {s.data.pvc.claim_name: False for s in fe.spec.suites if s.data.pvc}
    claims |= {r.python.pvc.claim_name: False for s in fe.spec.suites for r in s.rewards or [] if r.python and r.python.pvc}
    if baseline is not None and baseline.pvc is not None:
        claims[baseline.pvc.claim_name] = claims.get(baseline.pvc.claim_name, False)
    if model.pvc is not None:
        claims[model.pvc.claim_name] = True
    return claims


def egress_urls(spec: dict[str, Any], models: list[dict[str, Any]]) -> list[str]:
    """The URLs the evaluation pod reaches: the suites' HTTP reward services and the S3 endpoints of the
    spec's locations and of ``models`` (the locations of the models, as dicts: a training's export)."""
    urls = [(r.get("http") or {}).get("url") for s in spec.get("suites") or [] if isinstance(s, dict)
            for r in s.get("rewards") or [] if isinstance(r, dict)]
    return [u for u in urls if isinstance(u, str)] + s3_endpoints({"spec": spec, "models": models})


def build_network_policy(fe: ForgeEval, model: StorageLocation, baseline: StorageLocation | None,
                         seen: NetworkSeen) -> dict[str, Any]:
    """The cluster's side of network.egress Restricted for the evaluation pod: DNS, the S3 endpoint and the
    suites' HTTP reward services; nothing comes in (it serves nothing)."""
    models = [m.model_dump(mode="json", by_alias=True, exclude_none=True) for m in (model, baseline) if m is not None]
    urls = egress_urls(fe.spec.model_dump(mode="json", by_alias=True, exclude_none=True), models)
    return build_egress_policy(_meta(fe), labels(fe), ingress=[],
                               egress=[copy.deepcopy(DNS_RULE), *url_rules(urls, fe.metadata.namespace, seen)])


def _volumes(fe: ForgeEval, model: StorageLocation, baseline: StorageLocation | None,
             scratch: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the container's mounts: the configuration, the claims, the scratch of S3 copies,
    the reward ConfigMaps."""
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": job_name(fe)}}]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    for claim, writable in sorted(_claims(fe, model, baseline).items()):
        volumes.append({"name": f"pvc-{claim}", "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        mounts.append({"name": f"pvc-{claim}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": not writable})
    if scratch:  # node-local: the copies of the S3 locations, the results on their way up
        volumes.append({"name": "scratch", "emptyDir": {}})
        mounts.append({"name": "scratch", "mountPath": SCRATCH_MOUNT})
    # a reward ConfigMap is mounted as the training workers mount it (where the translation points)
    for cm in reward_config_maps([r for s in fe.spec.suites for r in s.rewards or []]):
        volumes.append({"name": f"rewards-{cm}", "configMap": {"name": cm}})
        mounts.append({"name": f"rewards-{cm}", "mountPath": f"{REWARDS_MOUNT_ROOT}/{cm}", "readOnly": True})
    return volumes, mounts


def build_children(fe: ForgeEval, eval_yaml: str, model: StorageLocation, baseline: StorageLocation | None,
                   image: str, network: NetworkSeen = NetworkSeen()) -> list[dict[str, Any]]:
    """The ConfigMap, the NetworkPolicy (before the pod exists) and the Job, in apply order."""
    r = fe.spec.resources
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(fe), "data": {EVAL_CONFIG_FILE: eval_yaml}}
    located = s3_locations(fe, model, baseline)
    volumes, mounts = _volumes(fe, model, baseline, scratch=bool(located))
    amounts = {k: str(v) for k, v in (("cpu", r.cpu), ("memory", r.memory)) if v is not None}
    if r.gpus:
        amounts[r.gpu_resource_name] = str(r.gpus)
    container: dict[str, Any] = {
        "name": EVAL_CONTAINER_NAME, "image": r.image or image,
        "command": [*EVAL_COMMAND, "--config", f"{CONFIG_MOUNT}/{EVAL_CONFIG_FILE}"],
        "volumeMounts": mounts, "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError", "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    if env := s3_credentials_env(located.values()):  # the Secret of the S3 locations, as boto3 reads it
        container["env"] = env
    if amounts:
        container["resources"] = {"requests": dict(amounts), "limits": dict(amounts)}
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
                                "containers": [container], "volumes": volumes}
    tolerations = list(r.tolerations or [])
    if r.gpus and not any(t.get("key") == r.gpu_resource_name for t in tolerations):
        tolerations.append({"key": r.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if r.node_selector:
        pod_spec["nodeSelector"] = dict(r.node_selector)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(fe),
           # one try: an evaluation that failed says why in its termination message; running it again cannot help
           "spec": {"backoffLimit": 0, "completions": 1, "parallelism": 1,
                    "template": {"metadata": {"labels": labels(fe)}, "spec": pod_spec}}}
    policy = [build_network_policy(fe, model, baseline, network)] if fe.spec.network.egress == "Restricted" else []
    return [config_map, *policy, job]
