"""The trainer's messages reach users in the spec's own field names (`forge train`, conditions)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from forge_operator.training.fieldnames import RENAMED, in_spec_terms

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("trainer, user", [
    ("data.sources[0].path /mnt/pvc/corpus/x: does not exist",
     "spec.data.sources[0].location /mnt/pvc/corpus/x: does not exist"),
    ("the prompt is 90 tokens; with method.max_new_tokens 32 it does not fit in training.seq_len 64",
     "the prompt is 90 tokens; with spec.training.sampling.maxNewTokens 32 it does not fit in "
     "spec.training.sequenceLength 64"),
    ("method.rewards names must be unique", "spec.rewards names must be unique"),
    ("model.base_path /m: no config.json (a local Hugging Face model directory is needed)",
     "spec.model.base /m: no config.json (a local Hugging Face model directory is needed)"),
    ("set at least one of training.budget.max_steps, max_tokens or deadline",
     "set at least one of spec.training.budget.maxSteps, max_tokens or deadline"),
    ("training.global_batch_sequences 6 is not a multiple", "spec.training.globalBatch.sequences 6 is not a multiple"),
    ("tokenizer.from_base needs model.base_path", "spec.tokenizer.fromBase needs spec.model.base"),
    ("data.validation.source needs another source", "spec.data.validation.source needs another source"),
    # already the spec's, a file name, a path and plain words stay as they are
    ("spec.training.sequenceLength is fine", "spec.training.sequenceLength is fine"),
    ("model.safetensors is missing in /ckpt/model.safetensors", "model.safetensors is missing in /ckpt/model.safetensors"),
    ("stopped before training. The data", "stopped before training. The data"),
])
def test_trainer_paths_become_the_specs(trainer, user):
    assert in_spec_terms(trainer) == user


def schema_paths(schema: dict, prefix: str = "spec") -> set[str]:
    out = {prefix}
    for name, sub in (schema.get("properties") or {}).items():
        out |= schema_paths(sub, f"{prefix}.{name}")
    if "items" in schema:
        out |= schema_paths(schema["items"], prefix)
    return out


def test_every_renamed_field_exists_in_the_crd():
    crd = yaml.safe_load((ROOT / "crds" / "forge.dev_forgetrainings.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    known = schema_paths(spec)
    assert {target for target in RENAMED.values()} - known == set()
