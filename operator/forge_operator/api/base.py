"""Shared pieces of the Forge API: the base model, CEL rules, conditions, storage locations.

Every API type derives from :class:`ApiModel`: camelCase on the wire, unknown
fields rejected, attribute docstrings as field descriptions (they become the
CRD's ``kubectl explain`` text). A class lists its cross-field rules once as
:class:`Cel` entries; the CRD generator writes them as
``x-kubernetes-validations`` and :meth:`ApiModel.check_rules` is the same rule
in Python, so the API server and local validation agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from . import defaults

GROUP = "forge.dev"
INT64_MAX = 2**63 - 1  # the API server's integers are int64
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class Cel:
    """One validation rule, in CEL for the API server and in Python for everything else.

    ``check`` takes the model and returns True when valid. ``field_path`` is
    relative to the object the rule sits on (``.experts``) and makes the API
    server's message name the offending field.
    """

    rule: str
    message: str
    check: Callable[[Any], bool] | None = None
    field_path: str | None = None
    reason: str | None = None

    def as_schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def _schema_extra(schema: dict[str, Any], cls: type) -> None:
    rules = cls.__dict__.get("cel_rules") or ()
    if rules:
        schema["x-kubernetes-validations"] = [r.as_schema() for r in rules]
    for key, value in (cls.__dict__.get("schema_extra") or {}).items():
        schema[key] = value


class ApiModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        use_attribute_docstrings=True,
        json_schema_extra=_schema_extra,
        # JSON types as the API server checks them: "4" is not an integer, true is not a number
        strict=True,
    )
    # The API server does not apply defaults (crdgen strips them), so a rule that
    # reads a field with a default must guard it with has() and use the same
    # default as the model; otherwise a manifest leaving it out fails with
    # "no such key".
    cel_rules: ClassVar[tuple[Cel, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def drop_nulls(cls, data: Any) -> Any:
        """A null field is an absent one, as the API server reads it (it drops nulls before validating)."""
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("*", mode="after")
    @classmethod
    def within_int64(cls, value: Any) -> Any:
        """Integers are int64 on the API server: a larger number is not an integer there, nor here."""
        for v in value if isinstance(value, list) else (value,):
            if isinstance(v, int) and not isinstance(v, bool) and not -INT64_MAX - 1 <= v <= INT64_MAX:
                raise PydanticCustomError("int64", "should be an integer within int64 (at most 2^63-1)")
        return value

    @model_validator(mode="after")
    def check_rules(self):
        for rule in type(self).__dict__.get("cel_rules") or ():
            if rule.check is not None and not rule.check(self):
                # the rule's fieldPath travels with the error, so that `forge train` names the field the
                # API server names (see error_fields)
                raise PydanticCustomError("rule", rule.message.replace("{", "{{").replace("}", "}}"),
                                          {"field_path": rule.field_path or ""})
        return self

    @classmethod
    def model_validate(cls, obj: Any, *, by_name: bool | None = False, **kwargs: Any):
        """Validate a manifest as the API server does: camelCase keys only (``num_layers`` is an unknown
        field there, so it is here). Python code may still build models with snake_case keyword arguments."""
        return super().model_validate(obj, by_name=by_name, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The object as it appears in YAML: camelCase, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# RFC 3339 date-times, as the API server's date-time format reads them: a 'T' (or 't'), seconds, and a zone
# ('Z' or +hh:mm). Checked before parsing, so pydantic's more lenient forms (dates alone, Unix times, no
# zone) are refused here too; datetime objects (built in Python, never from JSON) pass.
RFC3339_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"


def _check_rfc3339(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not re.match(RFC3339_PATTERN, value):
        raise PydanticCustomError("date_time", "should be an RFC 3339 date-time (e.g. 2026-06-01T12:00:00Z), "
                                  "not {value}", {"value": repr(value)})
    return value


# The only place where strings are parsed.
Timestamp = Annotated[datetime, BeforeValidator(_check_rfc3339),
                      Field(strict=False, json_schema_extra={"pattern": RFC3339_PATTERN})]
# Common constrained types. Lengths are bounded so the API server can estimate
# the cost of CEL rules.
DnsLabel = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
Name253 = Annotated[str, Field(min_length=1, max_length=253)]
ShortStr = Annotated[str, Field(max_length=256)]
PathStr = Annotated[str, Field(max_length=1024)]
# Non-negative: no resource of a training has a negative size.
QUANTITY_PATTERN = r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not re.match(QUANTITY_PATTERN, value):
        raise PydanticCustomError("string_pattern_mismatch", "should match the non-negative Kubernetes quantity "
                                  "pattern (e.g. 32, 500m, 64Gi), not {value}", {"value": repr(value)})
    if isinstance(value, int) and value < 0:
        raise PydanticCustomError("greater_than_equal", "should be greater than or equal to 0")
    return value

# resource.Quantity, as controller-gen writes it: an integer or a string of the quantity grammar
Quantity = Annotated[int | str, AfterValidator(_check_quantity),
                     Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN,
                                              "minimum": 0})]
PositiveInt = Annotated[int, Field(ge=1)]
FreeForm = Annotated[dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})]


class PvcLocation(ApiModel):
    """A path inside a PersistentVolumeClaim in the resource's namespace."""

    claim_name: DnsLabel
    """Name of the PersistentVolumeClaim. It must exist in the same namespace."""
    path: PathStr = ""
    """Path inside the volume, relative to its root ("" = the whole volume)."""
    read_only: bool | None = None
    """Mount the claim read-only (default: read-only for inputs, read-write for checkpoints and outputs)."""

    cel_rules = (
        Cel("!has(self.path) || (!self.path.startsWith('/') && !self.path.contains('..')"
            " && !self.path.contains('//') && !self.path.matches('(^|/)[.](/|$)'))",
            "path must be relative to the volume root, without '..', '.' or empty segments (one spelling per folder)",
            lambda s: not s.path.startswith("/") and ".." not in s.path and "//" not in s.path
            and re.search(r"(^|/)[.](/|$)", s.path) is None, field_path=".path"),
    )


class SecretKeyRef(ApiModel):
    """A Secret in the same namespace."""

    name: DnsLabel
    """Name of the Secret. For S3 it holds AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally
    AWS_SESSION_TOKEN), which the workers get as environment variables."""


S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"


class S3Location(ApiModel):
    """A prefix of an S3-compatible object store reachable from inside the cluster (Ceph RGW, SeaweedFS,
    versitygw, AWS S3, ...). Inputs are copied to the workers' local scratch before they are read;
    checkpoints and the exported model are written locally and uploaded, a marker object last. Every S3
    location of one training uses the same endpoint, region, pathStyle and secretRef."""

    uri: Annotated[str, Field(pattern=S3_URI_PATTERN, max_length=1024)]
    """Bucket and prefix, as s3://bucket/prefix."""
    endpoint: Annotated[str, Field(pattern=r"^https?://[^/?#]+/?$", max_length=1024)] | None = None
    """Endpoint URL of the S3-compatible service, scheme, host and port (default: the AWS endpoint of the
    region). Keep it inside your network; with network.egress Restricted it is the one address of the
    store the workers may reach."""
    region: Annotated[str, Field(pattern=r"^[a-z0-9-]+$", max_length=64)] | None = None
    """Region of the bucket (default: us-east-1, which most S3-compatible stores accept)."""
    path_style: bool = False
    """Address buckets as endpoint/bucket/key instead of bucket.endpoint/key (what most on-premises
    stores need)."""
    secret_ref: SecretKeyRef | None = None
    """Credentials; without it the pod's own identity (e.g. IRSA) is used."""


class StorageLocation(ApiModel):
    """Where files live: a path on a PersistentVolumeClaim, or an S3-compatible prefix. Set exactly one."""

    pvc: PvcLocation | None = None
    """A path on a PersistentVolumeClaim."""
    s3: S3Location | None = None
    """A prefix of an S3-compatible store, with its endpoint and the Secret of its credentials."""

    cel_rules = (
        Cel("has(self.pvc) != has(self.s3)", "set exactly one of pvc or s3",
            lambda s: (s.pvc is None) != (s.s3 is None)),
    )


class NetworkSpec(ApiModel):
    """What the pods may reach."""

    egress: Literal["Restricted", "Unrestricted"] = defaults.EGRESS
    """Restricted: the trainer (the evaluator) refuses every outbound connection made by Python code (a
    library fetching a model, telemetry, a reward function) except to loopback, the endpoints the spec
    names (HTTP reward services, the S3 endpoint of its locations) and, for a training, the Kubernetes API
    server; and the operator applies a NetworkPolicy that allows only those, DNS and, for a training, the
    group itself (enforced where the cluster's network plugin enforces NetworkPolicies). Unrestricted: neither."""


def describe_location(location: StorageLocation) -> str:
    """A location in a message: claim:/path, or the s3:// URI."""
    if location.pvc is not None:
        return f"{location.pvc.claim_name}:/{location.pvc.path}"
    return location.s3.uri


def s3_endpoints(spec: Any) -> list[str]:
    """Every S3 endpoint URL a resource's spec (as a dict, camelCase) names, in order, once each."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            s3 = node.get("s3")
            if isinstance(s3, dict) and isinstance(s3.get("endpoint"), str) and s3["endpoint"] not in out:
                out.append(s3["endpoint"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    return out


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """A metav1.Condition: the latest observation of one aspect of the resource."""

    type: Annotated[str, Field(max_length=316)]
    """Condition type, e.g. Running, Succeeded, Failed."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: Annotated[str, Field(max_length=1024)]
    """CamelCase reason for the last transition."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """Human-readable details."""
    last_transition_time: Timestamp
    """When the status last changed."""
    observed_generation: int | None = None
    """The .metadata.generation this condition was computed from."""


class ObjectMeta(ApiModel):
    """The parts of metadata that Forge reads; the API server owns the rest."""

    model_config = ConfigDict(extra="allow")
    name: str = ""
    """Name of the resource, unique in its namespace. A ForgeTraining's name is at most 40 characters."""
    namespace: str = ""
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


def _field(error: dict[str, Any]) -> str:
    """The field an error is about, spelled as the API server spells it: spec.data.sources[0].name."""
    out = ""
    for part in error["loc"]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("int", "str") or "[" in part:  # a union member or a validator, not a field
            continue
        else:
            out += f".{part}" if out else part
    return out + (error.get("ctx") or {}).get("field_path", "")


def error_fields(err: ValidationError) -> list[str]:
    """The fields a validation error names, in order, as the API server names them."""
    return list(dict.fromkeys(_field(e) for e in err.errors()))


def format_error(err: Exception) -> str:
    """A validation error (or any error) as one line that names the fields, for a condition or a terminal."""
    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors()[:5]:
            loc = _field(e)
            parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
        return "; ".join(parts)
    return str(err)
