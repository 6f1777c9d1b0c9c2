"""One validation: the API server and `forge train` accept and refuse the same specs, naming the same field.

Hypothesis generates ForgeTraining and ForgeEval manifests from the minimal
valid bases of ``api_cases``, each with one change drawn from what users get
wrong: camelCase keys in snake_case or misspelt, integers out of range (beyond
int64 too), timestamps that are not RFC 3339, volume paths that escape their
volume or are absolute, negative quantities, empty strings, missing fields, and
values of the wrong JSON type; a share are left valid or changed validly.
Every manifest goes to the real API server as a server-side dry-run create
(``dryRun=All``, ``fieldValidation=Strict``: what `kubectl apply` does), many
at once, and through the pydantic models exactly as `forge train` loads a file.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import threading
import typing
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from api_cases import MODELS, dpo, evaluation, pretrain, sft, with_evaluation
from forge_operator.api.base import ApiModel, error_fields

pytestmark = pytest.mark.cluster

EXAMPLES = 1000
INT64_MAX = 2**63 - 1
BASES = {"pretrain": pretrain, "sft": sft, "dpo": dpo, "with-evaluation": with_evaluation, "eval": evaluation}


# --------------------------------------------------------------------------- the fields, read from the models
@dataclass(frozen=True)
class Leaf:
    path: tuple[str | int, ...]
    """Wire names from the resource root, 0 for the first item of a list."""
    kind: str
    """int, float, str, bool, time, quantity, path (inside a volume), object."""


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType")):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp  # int | str: a quantity
            tp = args[0]
        else:
            return tp


def _leaves(model: type[ApiModel], prefix: tuple[str | int, ...], out: list[Leaf], depth: int = 0) -> None:
    for name, field in model.model_fields.items():
        wire = field.alias or name
        path = prefix + (wire,)
        tp = _unwrap(field.annotation)
        if typing.get_origin(tp) is list:
            item = _unwrap(typing.get_args(tp)[0])
            if isinstance(item, type) and issubclass(item, ApiModel):
                if depth < 6:
                    _leaves(item, path + (0,), out, depth + 1)
                continue
            out.append(Leaf(path + (0,), _kind(item, wire)))
            continue
        if isinstance(tp, type) and issubclass(tp, ApiModel):
            out.append(Leaf(path, "object"))
            if depth < 6:
                _leaves(tp, path, out, depth + 1)
            continue
        out.append(Leaf(path, _kind(tp, wire)))


def _kind(tp: Any, wire: str) -> str:
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")):
        return "quantity"
    if tp is datetime:
        return "time"
    if tp is str and wire in ("path", "resumeFrom"):
        return "path"
    if typing.get_origin(tp) is typing.Literal:
        return "enum"
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, "object")


def spec_leaves(kind: str) -> list[Leaf]:
    out: list[Leaf] = []
    spec = MODELS[kind].model_fields["spec"].annotation
    _leaves(spec, ("spec",), out)
    return out


LEAVES = {kind: spec_leaves(kind) for kind in MODELS}


# --------------------------------------------------------------------------- values users get wrong
INTS = st.one_of(
    st.sampled_from([-(2**63) - 1, -(2**63), -1, 0, 1, 2, 59, 60, 255, 256, 4096, 2**31 - 1, 2**31, 2**53 + 1,
                     INT64_MAX, 2**63, 2**64]),
    st.integers(min_value=-10, max_value=10**6),
)
TIMES = st.one_of(
    st.sampled_from([
        "2026-06-01T12:00:00Z", "2026-06-01T12:00:00.5Z", "2026-06-01T12:00:00+02:00", "2026-06-01t12:00:00z",
        "2026-06-01T12:00:00.123456789-07:30", "2026-06-01", "2026-06-01T12:00:00", "2026-06-01 12:00:00Z",
        "2026-06-01T12:00Z", "2026-06-01T12:00:00+0200", "2026-13-01T12:00:00Z", "2026-02-30T12:00:00Z",
        "2026-06-01T24:00:00Z", "2026-06-01T12:00:60Z", "20260601T120000Z", "next friday", "", "1780000000",
    ]),
    st.integers(min_value=0, max_value=2**40), st.just(1.5e9),
)
SEGMENTS = st.sampled_from(["a", "run-1", "..", ".", "", "a..b", ".hidden", "~", "x y"])
PATHS = st.one_of(
    st.builds(lambda lead, segs, tail: lead + "/".join(segs) + tail,
              st.sampled_from(["", "", "/", "//"]), st.lists(SEGMENTS, min_size=1, max_size=4),
              st.sampled_from(["", "", "/"])),
    st.sampled_from(["/", "..", "../x", "a/../../etc", "./a", "a/./b", "a//b", "/abs/path"]),
)
QUANTITIES = st.one_of(
    st.sampled_from(["32", "500m", "64Gi", "1.5", "+3", "-1", "-5Gi", "-0", "0", "1e3", "-1e3", "", "lots", "5 Gi",
                     "0.5Ki", ".5"]),
    INTS, st.just(-2.5), st.just(1.5),
)
STRINGS = st.sampled_from(["", " ", "text", "Web_Text", "a" * 64, "a" * 300, "a-b", "-a", "a.b"])
OTHERS = st.sampled_from([None, True, "4", 4, 4.5, [], {}, ["x"], {"x": 1}])


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _value_for(kind: str) -> st.SearchStrategy:
    return {
        "int": st.one_of(INTS, INTS, OTHERS), "float": st.one_of(INTS, st.floats(-10, 2000), OTHERS),
        "time": TIMES, "path": PATHS, "quantity": QUANTITIES, "str": st.one_of(STRINGS, OTHERS),
        "bool": OTHERS, "enum": st.one_of(STRINGS, OTHERS), "object": OTHERS,
    }[kind]


# --------------------------------------------------------------------------- changes
def _get(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _set(obj: dict, path: tuple, value: Any) -> None:
    """Set path, creating the dicts (and one-item lists) on the way; a non-container on the way stays."""
    for key, nxt in zip(path, path[1:]):
        child = obj[key] if (isinstance(obj, list) and key < len(obj)) or (isinstance(obj, dict) and key in obj) \
            else None
        if not isinstance(child, (dict, list)):
            child = [] if isinstance(nxt, int) else {}
            if isinstance(obj, list):
                obj.append(child)
            else:
                obj[key] = child
        obj = child
    if isinstance(obj, list):
        obj[path[-1]:path[-1] + 1] = [value]
    else:
        obj[path[-1]] = value


def _present_keys(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths of every dict key in the manifest's spec."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out += _present_keys(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _present_keys(v, prefix + (i,))
    return out


@st.composite
def manifests(draw) -> tuple[str, dict[str, Any]]:
    base = draw(st.sampled_from(sorted(BASES)))
    m = BASES[base]()
    kind = m["kind"]
    change = draw(st.sampled_from(["valid", "value", "value", "value", "rename", "drop"]))
    what = "unchanged"
    if change == "value":
        leaf = draw(st.sampled_from(LEAVES[kind]))
        value = draw(_value_for(leaf.kind))
        _set(m, leaf.path, value)
        what = f"{'.'.join(map(str, leaf.path))} = {value!r}"
    elif change in ("rename", "drop"):
        path = draw(st.sampled_from([p for p in _present_keys(m["spec"], ("spec",))]))
        parent, key = _get(m, path[:-1]), path[-1]
        value = parent.pop(key)
        if change == "rename":
            new = draw(st.sampled_from([_snake(key), key.lower(), key + "s", key[:-1], key.capitalize()]))
            parent[new] = value
            what = f"{'.'.join(map(str, path))} renamed {new}"
        else:
            what = f"{'.'.join(map(str, path))} dropped"
    return f"{base}: {what}", m


def generate(n: int) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []

    @settings(max_examples=n, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(manifests())
    def collect(item):
        out.append(item)

    collect()
    return out


# --------------------------------------------------------------------------- the two judges
@dataclass
class Verdict:
    accepted: bool
    fields: set[str]
    message: str


def local_verdict(manifest: dict[str, Any]) -> Verdict:
    """What `forge train` decides (the same model_validate on the same dict)."""
    try:
        MODELS[manifest["kind"]].model_validate(manifest)
        return Verdict(True, set(), "")
    except pydantic.ValidationError as err:
        return Verdict(False, set(error_fields(err)), str(err))


_UNKNOWN = re.compile(r'unknown field "([^"]+)"')
_DUPLICATE = re.compile(r'duplicate field "([^"]+)"')


class Server:
    """Dry-run creates on the real API server over one kept-alive connection per thread (a TLS handshake per
    request would cost more than the validation)."""

    def __init__(self, cluster, namespace: str) -> None:
        self.url = urllib.parse.urlsplit(cluster.state.server)
        self.token = cluster.state.token
        self.namespace = namespace
        self.local = threading.local()

    def _connection(self) -> http.client.HTTPSConnection:
        if getattr(self.local, "conn", None) is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            self.local.conn = http.client.HTTPSConnection(self.url.hostname, self.url.port, context=ctx, timeout=60)
        return self.local.conn

    def verdict(self, manifest: dict[str, Any]) -> Verdict:
        plural = {"ForgeTraining": "forgetrainings", "ForgeEval": "forgeevals"}[manifest["kind"]]
        path = (f"/apis/forge.dev/v1alpha1/namespaces/{self.namespace}/{plural}"
                "?dryRun=All&fieldValidation=Strict")
        conn = self._connection()
        conn.request("POST", path, body=json.dumps(manifest), headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        r = conn.getresponse()
        status = json.loads(r.read())
        if r.status == 201:
            return Verdict(True, set(), "")
        message = status.get("message", "")
        assert r.status in (400, 422), f"the API server failed instead of judging ({r.status}): {message}"
        fields = {c["field"] for c in status.get("details", {}).get("causes", []) if c.get("field")}
        fields |= set(_UNKNOWN.findall(message)) | set(_DUPLICATE.findall(message))
        return Verdict(False, fields, message)


def _within(inner: str, outer: str) -> bool:
    return inner == outer or (inner.startswith(outer) and inner[len(outer)] in ".[")


def same_field(local: set[str], server: set[str]) -> bool:
    """Both name one field, or one names a part of the other's (an object given for a string: the server
    calls its key an unknown field, pydantic the string a wrong type)."""
    return any(_within(a, b) or _within(b, a) for a in local for b in server)


def test_pydantic_and_the_api_server_agree_on_generated_specs(crds):
    cases = generate(EXAMPLES)
    namespace = f"api-agreement-{uuid.uuid4().hex[:6]}"
    crds.kubectl("create", "namespace", namespace)
    try:
        for i, (_, m) in enumerate(cases):
            m["metadata"]["name"] = f"case-{i}"
        judge = Server(crds, namespace)
        with ThreadPoolExecutor(4) as pool:  # one request each; the API server answers in milliseconds
            server = list(pool.map(lambda c: judge.verdict(c[1]), cases))
    finally:
        crds.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    local = [local_verdict(m) for _, m in cases]

    verdict_differs, field_differs = [], []
    for (what, _), lv, sv in zip(cases, local, server):
        if lv.accepted != sv.accepted:
            verdict_differs.append(f"{what}: forge train accepts={lv.accepted}, API server accepts={sv.accepted}\n"
                                   f"    forge train: {sorted(lv.fields)} {lv.message[:300]}\n"
                                   f"    API server: {sorted(sv.fields)} {sv.message[:300]}")
        elif not lv.accepted and not same_field(lv.fields, sv.fields):
            field_differs.append(f"{what}: forge train names {sorted(lv.fields)}, API server {sorted(sv.fields)}\n"
                                 f"    forge train: {lv.message[:300]}\n    API server: {sv.message[:300]}")
    refused = sum(not v.accepted for v in server)
    agree = len(cases) - len(verdict_differs) - len(field_differs)
    print(f"\nvalidation agreement: {len(cases)} specs generated ({len(cases) - refused} valid, {refused} refused), "
          f"{agree} agree ({100 * agree / len(cases):.1f}%), {len(verdict_differs)} verdicts differ, "
          f"{len(field_differs)} name different fields")
    assert refused > len(cases) // 3 and len(cases) - refused > len(cases) // 10, "the generator lost its mix"
    assert verdict_differs == [] and field_differs == [], "\n".join(verdict_differs + field_differs)
