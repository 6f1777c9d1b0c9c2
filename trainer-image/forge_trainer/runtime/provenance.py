"""Building provenance.json: how an exported model came to be (run, times and GPU-hours, image, versions,
nodes, data, tokenizer, model, config, base model's record). ``forge_trainer.provenance`` holds its
schema, writes it with the exported files' hashes and its signature, and verifies it."""

from __future__ import annotations

import logging
import os
import platform
from datetime import datetime
from importlib import metadata
from pathlib import Path

import torch

from ..config import TrainerConfig
from ..contract import (CONTAINER_NAME, IMAGE_ENV, NODE_NAME_ENV, NODE_REGION_ENV, NODE_ZONE_ENV, rfc3339)
from ..provenance import SCHEMA, base_section, config_sha256, normalized
from .checkpoint import TrainState
from .dist import Dist, hostname
from .progress import own_pod

log = logging.getLogger(__name__)
LOCAL_IMAGE = "local"
"""The image reference recorded for a run outside a pod (`forge train`, a plain process)."""


def versions() -> dict:
    import tokenizers
    import transformers

    return {
        "forge": forge_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cuda": torch.version.cuda,
    }


def forge_version() -> str:
    try:
        return metadata.version("forge")
    except metadata.PackageNotFoundError:
        return "unknown"


def image_digest() -> str | None:
    """The digest of the image this worker's container runs, from its pod's status (None outside a pod, or
    when the pod cannot be read)."""
    own = own_pod("read the image digest from")
    if own is None:
        return None
    try:
        pod = own.api.read_namespaced_pod(own.name, own.namespace, _request_timeout=10)
    except Exception as e:
        log.warning("cannot read pod %s/%s for the image digest: %s", own.namespace, own.name, e)
        return None
    statuses = pod.status.container_statuses or []
    mine = next((s for s in statuses if s.name == CONTAINER_NAME), statuses[0] if statuses else None)
    image_id = (mine.image_id or "") if mine is not None else ""
    return image_id[image_id.index("sha256:"):] if "sha256:" in image_id else (image_id or None)


def this_worker(d: Dist) -> dict:
    """Where this rank runs: its host, node and the node's region and zone (from the pod's environment,
    empty outside a pod), and its image's digest (read once per node, by its first worker)."""
    return {
        "hostname": hostname(),
        "node": os.environ.get(NODE_NAME_ENV) or None,
        "region": os.environ.get(NODE_REGION_ENV) or None,
        "zone": os.environ.get(NODE_ZONE_ENV) or None,
        "image_digest": image_digest() if d.local_rank == 0 else None,
        "rank": d.rank,
        "device": d.device.type,
    }


def nodes_of(workers: list[dict]) -> list[dict]:
    """One entry per host: its node, region, zone, image digest and ranks."""
    by_host: dict[str, dict] = {}
    for w in workers:
        entry = by_host.setdefault(w["hostname"], {"hostname": w["hostname"], "node": w["node"], "region": w["region"],
                                                    "zone": w["zone"], "image_digest": None, "ranks": []})
        entry["image_digest"] = entry["image_digest"] or w["image_digest"]
        entry["ranks"].append(w["rank"])
    return [by_host[h] for h in sorted(by_host)]


def residency(config: TrainerConfig, nodes: list[dict]) -> dict:
    """Where the workers were allowed to run (the training's spec.residency; None: anywhere) and the regions
    and zones of the nodes they ran on, as far as known."""
    return {"allowed": config.residency.model_dump(mode="json") if config.residency is not None else None,
            "regions": sorted({n["region"] for n in nodes if n["region"]}),
            "zones": sorted({n["zone"] for n in nodes if n["zone"]})}


def build_provenance(config: TrainerConfig, state: TrainState, *, reason: str, started: datetime, ended: datetime,
                     resumed_from: Path | str | None, d: Dist, tokenizer: dict, data: dict, model: dict,
                     gpu_hours: float, base_path: str | None = None) -> dict:
    """The provenance record but the exported files and the signature (``provenance.write_record`` adds
    them); ``tokenizer``, ``data`` and ``model`` are their own sections. A collective: every rank calls it
    (the workers' whereabouts are gathered)."""
    workers = d.all_gather_object(this_worker(d))
    nodes = nodes_of(workers)
    cfg = normalized(config.model_dump(mode="json"))
    return {
        "schema": SCHEMA,
        "run_name": config.run_name,
        "method": config.method.kind,
        "base_model": config.model.base_path,
        "started_at": rfc3339(started),
        "ended_at": rfc3339(ended),
        "gpu_hours": round(gpu_hours, 6),
        "devices": {"type": workers[0]["device"], "count": d.world},
        "stop_reason": reason,
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "final_train_loss": state.train_loss,
        "final_val_loss": state.val_loss,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "world_size": d.world,
        "hostnames": [n["hostname"] for n in nodes],
        "nodes": nodes,
        "residency": residency(config, nodes),
        "image": {"reference": os.environ.get(IMAGE_ENV) or LOCAL_IMAGE,
                  "digest": next((n["image_digest"] for n in nodes if n["image_digest"]), None)},
        "versions": versions(),
        "tokenizer": tokenizer,
        "data": data,
        "model": model,
        "config": cfg,
        "config_sha256": config_sha256(cfg),
        # the base model's files where they are read: its local copy when model.base_path is on S3
        "base": base_section(base_path or config.model.base_path) if d.is_main else None,
    }
