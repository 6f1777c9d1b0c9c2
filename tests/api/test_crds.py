"""The generated CRDs are current, structural, described, and their rules and columns point at real fields.

Pure: reads the generator's output, no cluster.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any, Iterator

import pytest
import yaml

from api_cases import ROOT
from forge_operator.api import crdgen

KINDS = {k.kind: k for k in crdgen.KINDS}
# The only keywords a structural schema needs here; anything else (oneOf, allOf, not, $ref, title,
# discriminator, const, nullable...) means the generator let a pydantic-ism through.
ALLOWED_KEYWORDS = {
    "type", "description", "properties", "required", "items", "additionalProperties", "enum", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "maxProperties",
    "pattern", "x-kubernetes-validations", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}


def _schema(kind: str) -> dict[str, Any]:
    return crdgen.crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its field path (list items as [], map values as {})."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], path + "[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], path + "{}")


# --------------------------------------------------------------------------- drift
def test_generated_files_are_current():
    result = subprocess.run([sys.executable, "-m", "forge_operator.api.crdgen", "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    files = crdgen.generated_files()
    assert {p.relative_to(ROOT).as_posix() for p in files} == {
        "crds/forge.dev_forgetrainings.yaml", "crds/forge.dev_forgeevals.yaml",
        "helm/forge/crds/forge.dev_forgetrainings.yaml", "helm/forge/crds/forge.dev_forgeevals.yaml",
        "docs/api-reference.md"}
    for path, text in files.items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} differs from the generator's output"


def test_generated_files_say_how_they_are_made():
    for path, text in crdgen.generated_files().items():
        assert "python -m forge_operator.api.crdgen" in text.splitlines()[0] and "do not edit" in text.splitlines()[0]


def test_the_chart_ships_the_same_crds():
    for name in ("forge.dev_forgetrainings.yaml", "forge.dev_forgeevals.yaml"):
        assert (ROOT / "helm/forge/crds" / name).read_text() == (ROOT / "crds" / name).read_text()


def test_crd_file_is_the_schema_the_models_give():
    for kind in KINDS.values():
        doc = yaml.safe_load((ROOT / "crds" / f"forge.dev_{kind.plural}.yaml").read_text())
        assert doc == crdgen.crd(kind)


# --------------------------------------------------------------------------- structural
@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind: str):
    problems = []
    for path, node in _nodes(_schema(kind)):
        where = path or "<root>"
        if "$ref" in node:
            problems.append(f"{where}: $ref")
        if "anyOf" in node or "oneOf" in node or "allOf" in node:
            problems.append(f"{where}: anyOf/oneOf/allOf")
        if node.get("additionalProperties") is False:
            problems.append(f"{where}: additionalProperties: false")
        if unknown := set(node) - ALLOWED_KEYWORDS:
            problems.append(f"{where}: unexpected keywords {sorted(unknown)}")
        if "type" not in node and not (node.get("x-kubernetes-int-or-string")
                                       or node.get("x-kubernetes-preserve-unknown-fields")):
            problems.append(f"{where}: no type")
        if node.get("type") == "object" and not ("properties" in node or "additionalProperties" in node
                                                 or node.get("x-kubernetes-preserve-unknown-fields")):
            problems.append(f"{where}: object without properties, additionalProperties or preserve-unknown-fields")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{where}: array without items")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: both properties and additionalProperties")
    assert problems == []


@pytest.mark.parametrize("kind", KINDS)
def test_int_or_string_is_the_only_union(kind: str):
    quantities = [p for p, n in _nodes(_schema(kind)) if n.get("x-kubernetes-int-or-string")]
    assert quantities and all(p.rsplit(".", 1)[-1] in {"cpu", "memory", "shmSize", "extendedResources{}"} for p in quantities)


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_has_a_description(kind: str):
    undocumented = []
    for path, node in _nodes(_schema(kind)):
        for name, sub in node.get("properties", {}).items():
            if path == "" and name == "metadata":
                continue  # the API server forbids describing metadata itself
            if not sub.get("description", "").strip():
                undocumented.append(f"{path}.{name}" if path else name)
    assert undocumented == []


@pytest.mark.parametrize("kind", KINDS)
def test_no_defaults_in_the_schema(kind: str):
    # the API server must store what users wrote; defaults live in the descriptions and the models
    assert [p for p, n in _nodes(_schema(kind)) if "default" in n] == []


# --------------------------------------------------------------------------- rules
def _rules(kind: str) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for path, node in _nodes(_schema(kind)):
        for rule in node.get("x-kubernetes-validations", []):
            yield path, node, rule


def _resolve(node: dict[str, Any], field_path: str) -> dict[str, Any] | None:
    for name in field_path.lstrip(".").split("."):
        node = node.get("properties", {}).get(name)
        if node is None:
            return None
    return node


@pytest.mark.parametrize("kind", KINDS)
def test_every_rule_has_a_message_and_a_field_path_that_exists(kind: str):
    rules = list(_rules(kind))
    assert rules
    for path, node, rule in rules:
        assert rule["rule"].strip() and rule["message"].strip()
        if "fieldPath" in rule:
            # the API server refuses the whole CRD when a fieldPath names no field of the schema
            assert _resolve(node, rule["fieldPath"]) is not None, (path, rule)


def test_immutable_fields_are_transition_rules_on_the_root():
    root = _schema("ForgeTraining")["x-kubernetes-validations"]
    immutable = {r["fieldPath"] for r in root if "oldSelf" in r["rule"]}
    assert immutable == {".spec.method", ".spec.model", ".spec.tokenizer", ".spec.data", ".spec.checkpoint.location"}
    assert all("immutable" in r["message"] for r in root if "oldSelf" in r["rule"])


# --------------------------------------------------------------------------- printer columns
def _column_target(schema: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    node = schema
    for step in re.sub(r"\[\?\(.*?\)\]", "[]", json_path).lstrip(".").split("."):
        name, is_list = step.removesuffix("[]"), step.endswith("[]")
        node = node.get("properties", {}).get(name)
        if node is None:
            return None
        if is_list:
            node = node["items"]
    return node


EXPECTED_COLUMNS = {
    "ForgeTraining": ["Phase", "Pods", "Progress", "Loss", "Tokens/s", "ETA", "Restarts", "Age"],
    "ForgeEval": ["Phase", "Metric", "Gates", "Age"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_show_status_fields_that_exist(kind: str):
    version = crdgen.crd(KINDS[kind])["spec"]["versions"][0]
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == EXPECTED_COLUMNS[kind]
    schema = version["schema"]["openAPIV3Schema"]
    for column in columns:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            assert column["type"] == "date"
            continue
        target = _column_target(schema, column["jsonPath"])
        assert target is not None, column
        assert column["type"] == target["type"], column


def test_status_is_a_subresource_and_conditions_merge_by_type():
    for kind in KINDS:
        version = crdgen.crd(KINDS[kind])["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        conditions = _schema(kind)["properties"]["status"]["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        assert conditions["items"]["required"] == ["type", "status", "reason", "lastTransitionTime"]
