"""What every kind does with its S3 locations: one way to reach the store (the trainer's and the evaluator's
``s3`` setting) and the credentials its pods get from the locations' Secret. Pure."""

from __future__ import annotations

from typing import Any, Iterable

from forge_trainer.config import S3Config

from .base import S3Location
from .names import S3_OPTIONAL_SECRET_KEYS, S3_SECRET_KEYS


def one_s3_setting(located: dict[str, S3Location], what: str, error: type[Exception]) -> S3Config | None:
    """The one setting of the S3 locations ``located`` (by field): their pod holds one Secret's credentials
    and its process one endpoint, so they must agree; else ``error`` naming the first field that differs.
    ``what``: "a training", "an evaluation"."""
    if not located:
        return None
    (first_field, first), *rest = located.items()
    how = lambda s3: (s3.endpoint, s3.region, s3.path_style, s3.secret_ref)  # noqa: E731
    for field, s3 in rest:
        if how(s3) != how(first):
            raise error(f"{field}.s3: every S3 location of {what} must use the same endpoint, region, "
                        f"pathStyle and secretRef (as {first_field}.s3 does)")
    given = {"endpoint": first.endpoint.rstrip("/") if first.endpoint else None, "region": first.region,
             "path_style": first.path_style}
    return S3Config(**{k: v for k, v in given.items() if v is not None})


def s3_credentials_env(locations: Iterable[S3Location]) -> list[dict[str, Any]]:
    """boto3's credential variables from the Secret of the S3 locations (they share one; none: the pod's
    own identity)."""
    secrets = [s3.secret_ref.name for s3 in locations if s3.secret_ref is not None]
    if not secrets:
        return []
    ref = lambda key, optional: {"secretKeyRef": {"name": secrets[0], "key": key, "optional": optional}}  # noqa: E731
    return ([{"name": key, "valueFrom": ref(key, False)} for key in S3_SECRET_KEYS]
            + [{"name": key, "valueFrom": ref(key, True)} for key in S3_OPTIONAL_SECRET_KEYS])
