"""The pydantic models accept the examples, keep what users write, and default what docs/api.md says.

Pure: no cluster, milliseconds per test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from api_cases import (
    BAD_CASES, GOOD_CASES, MODELS, ROOT, Case, evaluation, example_paths, load_example, pretrain, validate,
)
from forge_operator.api import ForgeEval, ForgeTraining

EXAMPLES = example_paths()


def test_every_example_the_brief_names_exists():
    names = {p.name for p in EXAMPLES}
    assert {"pretrain-dense.yaml", "continued-pretrain.yaml", "sft.yaml", "dpo.yaml", "moe.yaml", "eval.yaml",
            "s3-data.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses(path: Path):
    doc = load_example(path)
    obj = validate(doc)
    assert isinstance(obj, (ForgeTraining, ForgeEval))
    assert 0 < len(obj.metadata.name) <= 40
    assert path.read_text().startswith("#"), "each example opens with a comment saying what it shows"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_round_trips(path: Path):
    doc = load_example(path)
    obj = validate(doc)
    out = obj.to_dict()
    assert type(obj).model_validate(out) == obj
    # to_dict adds defaults but keeps every value the user wrote
    assert _missing(doc, out) == []


def _missing(written: Any, dumped: Any, path: str = "") -> list[str]:
    if isinstance(written, dict):
        if not isinstance(dumped, dict):
            return [path]
        return [m for k, v in written.items() for m in _missing(v, dumped.get(k, _ABSENT), f"{path}.{k}")]
    if isinstance(written, list):
        if not isinstance(dumped, list) or len(dumped) != len(written):
            return [path]
        return [m for i, (a, b) in enumerate(zip(written, dumped)) for m in _missing(a, b, f"{path}[{i}]")]
    if hasattr(written, "isoformat"):  # YAML timestamps come back as RFC 3339 strings
        return [] if isinstance(dumped, str) and dumped.replace("Z", "+00:00")[:19] == written.isoformat()[:19] \
            else [path]
    same = written == dumped and isinstance(written, bool) == isinstance(dumped, bool)
    return [] if same else [path]


_ABSENT = object()


def test_examples_cover_methods_families_and_storage():
    trainings = [validate(load_example(p)) for p in EXAMPLES if load_example(p)["kind"] == "ForgeTraining"]
    specs = [t.spec for t in trainings]
    assert {s.method for s in specs} >= {"pretrain", "continued-pretrain", "sft", "dpo"}
    assert {s.model.architecture.family for s in specs if s.model.architecture} == {"dense", "moe"}
    locations = [src.location for s in specs for src in s.data.sources]
    assert any(loc.pvc for loc in locations) and any(loc.s3 and loc.s3.secret_ref for loc in locations)
    dense = validate(load_example(ROOT / "examples" / "pretrain-dense.yaml")).spec
    assert (dense.resources.num_nodes, dense.resources.gpus_per_node) == (4, 8)
    assert dense.scheduling.queue_name and dense.tokenizer.train and dense.evaluation.gates
    ev = validate(load_example(ROOT / "examples" / "eval.yaml")).spec
    assert {s.type for s in ev.suites} == {"perplexity", "multiple-choice", "exact-match", "generation"} and ev.gates


# --------------------------------------------------------------------------- defaults
def _documented_defaults() -> list[tuple[str, str, str]]:
    """(kind, field path, default as YAML) from the tables under "## Defaults" in docs/api.md."""
    text = (ROOT / "docs" / "api.md").read_text().split("## Defaults", 1)[1]
    rows, kind = [], None
    for line in text.splitlines():
        if line.startswith("### "):
            kind = line[4:].strip()
        elif m := re.match(r"\| `([^`]+)` \| `([^`]+)` \|", line):
            rows.append((kind, m.group(1), m.group(2)))
    return rows


DOCUMENTED = _documented_defaults()


def _minimal(kind: str) -> dict[str, Any]:
    if kind == "ForgeTraining":
        return pretrain()
    m = evaluation()
    assert "format" not in m["spec"]["suites"][0]
    return m


def _at(obj: Any, path: str) -> Any:
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        obj = obj[int(index)] if index else obj[name]
    return obj


def test_docs_list_defaults_for_both_kinds():
    assert {k for k, _, _ in DOCUMENTED} == set(MODELS)
    assert len(DOCUMENTED) >= 30


@pytest.mark.parametrize("kind,path,default", DOCUMENTED, ids=[f"{k}:{p}" for k, p, _ in DOCUMENTED])
def test_default_is_what_the_docs_say(kind: str, path: str, default: str):
    manifest = _minimal(kind)
    with pytest.raises((KeyError, IndexError)):
        _at(manifest, path)  # the minimal manifest leaves the field out...
    value = _at(validate(manifest).to_dict(), path)  # ...and the model fills it in
    assert value == yaml.safe_load(default)


# --------------------------------------------------------------------------- cases
def _loc_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.id)
def test_bad_case_is_rejected_where_the_api_server_says(case: Case):
    with pytest.raises(pydantic.ValidationError) as info:
        validate(case.manifest())
    # pydantic reports a rule at the object it sits on; the API server's fieldPath may go deeper
    locs = [_loc_path(e["loc"]) for e in info.value.errors()]
    assert any(case.field == loc or case.field.startswith(loc + ".") or case.field.startswith(loc + "[")
               or loc == "" for loc in locs), (case.field, locs)


@pytest.mark.parametrize("case", GOOD_CASES, ids=lambda c: c.id)
def test_good_case_is_accepted(case: Case):
    validate(case.manifest())


@pytest.mark.parametrize("value", ["4", True])
def test_pydantic_rejects_wrong_json_types_like_the_api_server(value):
    m = pretrain()
    m["spec"]["resources"] = {"numNodes": value}
    with pytest.raises(pydantic.ValidationError):
        validate(m)
