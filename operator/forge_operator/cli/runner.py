"""Start kopf with the Forge handlers."""

from __future__ import annotations

import asyncio
import logging
import os

ENV_HEALTH_ENDPOINT = "FORGE_HEALTH_ENDPOINT"


def run_operator(namespaces: list[str]) -> int:
    import kopf

    from .. import kopf_app  # noqa: F401  (registers the handlers)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    health = os.environ.get(ENV_HEALTH_ENDPOINT, "http://0.0.0.0:8080/healthz") or None
    asyncio.run(kopf.operator(clusterwide=not namespaces, namespaces=namespaces or (), liveness_endpoint=health))
    return 0
