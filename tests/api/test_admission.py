"""The real API server admits the examples and refuses bad manifests, naming the field; pydantic agrees.

Every manifest is sent once, in one namespace (the ``verdicts`` fixture):
examples and good cases as server-side dry runs, bad cases as real creates so
that "nothing was created" means something.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pydantic
import pytest

from api_cases import (
    BAD_CASES, EXAMPLES_DIR, GOOD_CASES, Case, all_cases, example_paths, load_example, validate,
)
from forge_operator.api.training import TrainingSpec

pytestmark = pytest.mark.cluster

EXAMPLES = example_paths()


@dataclass
class Verdict:
    manifest: dict[str, Any]
    returncode: int
    output: str

    @property
    def accepted(self) -> bool:
        return self.returncode == 0


@dataclass
class Verdicts:
    examples: dict[str, Verdict]
    cases: dict[str, Verdict]
    stored: set[str]
    """kind/name of every Forge object in the namespace after all the applies."""


@pytest.fixture(scope="module")
def verdicts(crds) -> Iterator[Verdicts]:
    namespace = f"api-admission-{uuid.uuid4().hex[:6]}"
    crds.kubectl("create", "namespace", namespace)

    def send(manifest: dict[str, Any], dry_run: bool) -> Verdict:
        args = ["--validate=strict"] + (["--dry-run=server"] if dry_run else [])
        r = crds.kubectl("-n", namespace, "apply", "-f", "-", *args, input=json.dumps(manifest), check=False)
        return Verdict(manifest, r.returncode, r.stdout + r.stderr)

    try:
        bad = {c.id for c in BAD_CASES}
        with ThreadPoolExecutor(4) as pool:  # kubectl start-up dominates; the API server answers in ms
            examples = dict(zip([p.name for p in EXAMPLES],
                                pool.map(lambda p: send(load_example(p), True), EXAMPLES)))
            cases = dict(zip([c.id for c in all_cases()],
                             pool.map(lambda c: send(c.manifest(), c.id not in bad), all_cases())))
        listed = crds.kubectl("-n", namespace, "get", "forgetrainings,forgeevals", "-o", "name").stdout.split()
        yield Verdicts(examples, cases, {n.replace(".forge.dev/", "/") for n in listed})
    finally:
        crds.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# --------------------------------------------------------------------------- examples and cases
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_accepted(verdicts: Verdicts, path: Path):
    v = verdicts.examples[path.name]
    assert v.accepted, v.output
    assert "created (server dry run)" in v.output


@pytest.mark.parametrize("case", GOOD_CASES, ids=lambda c: c.id)
def test_good_case_is_accepted(verdicts: Verdicts, case: Case):
    v = verdicts.cases[case.id]
    assert v.accepted, v.output


def _names_field(output: str, field: str) -> bool:
    # "spec.x.y: Invalid value ...", "* spec.x.y: Required value", or strict decoding's unknown field "spec.x.y"
    return re.search(rf"(^|[\s*]){re.escape(field)}: ", output, re.M) is not None or f'"{field}"' in output


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.id)
def test_bad_case_is_refused_naming_the_field(verdicts: Verdicts, case: Case):
    v = verdicts.cases[case.id]
    assert not v.accepted, f"{case.id} was accepted"
    assert "Error from server (Invalid)" in v.output or "Error from server (BadRequest)" in v.output \
        or re.search(r'The Forge\w+ "[^"]+" is invalid', v.output), v.output
    assert "InternalError" not in v.output and "Internal error" not in v.output, v.output
    assert _names_field(v.output, case.field), f"expected the error to name {case.field}:\n{v.output}"
    assert case.phrase in v.output, v.output
    kind = case.manifest()["kind"].lower()
    assert f"{kind}/{case.id}" not in verdicts.stored


def test_at_least_30_bad_cases_and_nothing_stored(verdicts: Verdicts):
    assert len(BAD_CASES) >= 30
    assert verdicts.stored == set(), "a bad manifest was stored"


def test_pydantic_and_the_api_server_agree(verdicts: Verdicts):
    """Same verdict for every example and case. Not covered here, because only the API server can judge them:
    immutability (it compares with the stored object; see below)."""
    def local(manifest: dict[str, Any]) -> bool:
        try:
            validate(manifest)
            return True
        except pydantic.ValidationError:
            return False

    everything = {**{f"example {k}": v for k, v in verdicts.examples.items()},
                  **{f"case {k}": v for k, v in verdicts.cases.items()}}
    disagree = {name: (local(v.manifest), v.accepted, v.output.strip()) for name, v in everything.items()
                if local(v.manifest) != v.accepted}
    assert disagree == {}, "\n".join(f"{n}: pydantic accepts={p}, API server accepts={s}: {o}"
                                     for n, (p, s, o) in disagree.items())
    assert len(everything) == len(EXAMPLES) + len(all_cases())


# --------------------------------------------------------------------------- explain
def test_explain_shows_the_field_descriptions(crds):
    out = crds.kubectl("explain", "forgetraining.spec.training").stdout
    flat = " ".join(out.split())
    assert "Hyperparameters and budget." in flat
    for field in TrainingSpec.model_fields.values():
        assert " ".join(field.description.split()) in flat, field.description
    assert "budget <Object> -required-" in flat


def test_explain_reaches_nested_eval_fields(crds):
    flat = " ".join(crds.kubectl("explain", "forgeeval.spec.gates.metric").stdout.split())
    assert "<suite name>.<metric>" in flat and "exact_match" in flat


# --------------------------------------------------------------------------- immutability
def _patch(kube, name: str, patch: dict[str, Any], *extra: str) -> subprocess.CompletedProcess:
    return kube("patch", "forgetraining", name, "--type=merge", "-p", json.dumps(patch), *extra, check=False)


def _create_sft(kube) -> tuple[str, dict[str, Any]]:
    manifest = load_example(EXAMPLES_DIR / "sft.yaml")
    kube.apply(manifest)
    return manifest["metadata"]["name"], manifest["spec"]


IMMUTABLE_EDITS = {
    "method": {"spec": {"method": "continued-pretrain"}},
    "model": {"spec": {"model": {"base": {"pvc": {"path": "another-base"}}}}},
    "data": {"spec": {"data": {"validation": {"source": None, "fraction": 0.05}}}},
    "tokenizer": {"spec": {"tokenizer": {"fromBase": None, "source": {"pvc": {"claimName": "tokenizers"}}}}},
    "checkpoint.location": {"spec": {"checkpoint": {"location": {"pvc": {"path": "elsewhere"}}}}},
}


def _at(spec: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        spec = spec[key]
    return spec


def test_what_and_on_what_are_immutable_once_started(kube):
    name, spec = _create_sft(kube)
    r = _patch(kube, name, {"status": {"startTime": "2026-01-01T00:00:00Z", "phase": "Running"}},
               "--subresource=status")
    assert r.returncode == 0, r.stderr

    for field, patch in IMMUTABLE_EDITS.items():
        r = _patch(kube, name, patch)
        assert r.returncode != 0, f"spec.{field} changed after the start"
        assert f"spec.{field}: " in r.stderr and "immutable" in r.stderr, r.stderr
        assert "InternalError" not in r.stderr
    stored = kube.get("forgetraining", name)
    assert {k: _at(stored["spec"], k) for k in IMMUTABLE_EDITS} == {k: _at(spec, k) for k in IMMUTABLE_EDITS}

    for patch in ({"spec": {"scheduling": {"suspend": True}}},
                  {"spec": {"resources": {"numNodes": 2}}},
                  {"spec": {"training": {"budget": {"maxSteps": 5000}}}}):
        r = _patch(kube, name, patch)
        assert r.returncode == 0, r.stderr
    stored = kube.get("forgetraining", name)
    assert stored["spec"]["scheduling"]["suspend"] is True
    assert stored["spec"]["resources"]["numNodes"] == 2
    assert stored["spec"]["training"]["budget"]["maxSteps"] == 5000
    assert stored["status"]["startTime"] == "2026-01-01T00:00:00Z"


def test_what_may_still_change_before_the_start(kube):
    name, _ = _create_sft(kube)
    for patch in IMMUTABLE_EDITS.values():
        r = _patch(kube, name, patch)
        assert r.returncode == 0, r.stderr
    spec = kube.get("forgetraining", name)["spec"]
    assert spec["method"] == "continued-pretrain"
    assert spec["model"]["base"]["pvc"]["path"] == "another-base"
    assert spec["data"]["validation"] == {"fraction": 0.05}
    assert spec["tokenizer"] == {"source": {"pvc": {"claimName": "tokenizers"}}}
    assert spec["checkpoint"]["location"]["pvc"]["path"] == "elsewhere"
