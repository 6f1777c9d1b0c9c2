"""Start kopf with the Forge handlers, logging as the chart configures it."""

from __future__ import annotations

import asyncio
import logging
import os

ENV_HEALTH_ENDPOINT = "FORGE_HEALTH_ENDPOINT"
ENV_LOG_FORMAT = "FORGE_LOG_FORMAT"   # json | text
ENV_LOG_LEVEL = "FORGE_LOG_LEVEL"     # debug | info | warning | error
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(log_format: str | None, log_level: str | None) -> None:
    """kopf's log formats: ``json`` is one JSON object a line, with the object a line is about under
    ``object`` (kind, namespace, name) and the reconcile's decision and reason as fields of their own;
    ``text`` prefixes the line with ``[namespace/name]``."""
    import kopf

    log_format = (log_format or os.environ.get(ENV_LOG_FORMAT) or "text").lower()
    log_level = (log_level or os.environ.get(ENV_LOG_LEVEL) or "info").lower()
    if log_format not in LOG_FORMATS:
        raise SystemExit(f"forge operator: {ENV_LOG_FORMAT}={log_format!r}: must be one of {', '.join(LOG_FORMATS)}")
    if log_level not in LOG_LEVELS:
        raise SystemExit(f"forge operator: {ENV_LOG_LEVEL}={log_level!r}: must be one of {', '.join(LOG_LEVELS)}")
    kopf.configure(debug=log_level == "debug",
                   log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.FULL,
                   log_prefix=log_format == "text")
    logging.getLogger().setLevel(log_level.upper())


def run_operator(namespaces: list[str], log_format: str | None = None, log_level: str | None = None) -> int:
    import kopf

    from .. import kopf_app  # noqa: F401  (registers the handlers)

    configure_logging(log_format, log_level)
    health = os.environ.get(ENV_HEALTH_ENDPOINT, "http://0.0.0.0:8080/healthz") or None
    asyncio.run(kopf.operator(clusterwide=not namespaces, namespaces=namespaces or (), liveness_endpoint=health))
    return 0
