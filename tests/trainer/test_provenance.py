"""Provenance records without a training: canonical form, signatures, chains whose base folder is gone,
file modes, and what checkpoint.retain_after_success leaves (tests/cli/test_forge_provenance.py runs the
whole chain with `forge train`)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from forge_trainer.config import CheckpointConfig
from forge_trainer.provenance import (
    SCHEMA, SIGNATURE_FILE, base_section, canonical, config_sha256, file_mode_dirs, set_modes, sha256_file, verify,
    write_record,
)


def _export(folder: Path, config: dict, base: str | None = None, key=None, weights: bytes = b"weights") -> dict:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text("{}")
    record = {"schema": SCHEMA, "method": "pretrain" if base is None else "sft", "config": config,
              "config_sha256": config_sha256(config), "data": {"sources": []}, "base": base_section(base)}
    return write_record(folder, record, key)


def test_a_record_reads_back_as_its_own_bytes_and_keeps_floats_exact(tmp_path):
    record = {"schema": SCHEMA, "b": [1, 2.5, 1e-7, 0.1 + 0.2], "a": {"z": None, "é": "x"}}
    data = canonical(record)
    assert canonical(json.loads(data)) == data and data.startswith(b'{\n "a"')


def test_a_chain_verifies_through_an_embedded_record_when_the_base_folder_is_gone(tmp_path):
    key = Ed25519PrivateKey.generate()
    _export(tmp_path / "base", {"lr": 0.003}, key=key)
    child = _export(tmp_path / "child", {"lr": 0.001}, base=str(tmp_path / "base"), key=key)
    assert child["base"]["sha256"] == sha256_file(tmp_path / "base" / "provenance.json")
    assert verify(tmp_path / "child", [key.public_key()]).ok
    for p in sorted((tmp_path / "base").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (tmp_path / "base").rmdir()
    result = verify(tmp_path / "child", [key.public_key()])
    assert result.ok, result.problem
    assert any("folder gone, checking the embedded record" in c for c in result.checked)


@pytest.mark.parametrize("tamper, named", [
    (lambda f: (f / "sub" / "tokenizer.json").write_text("{ }"), "exported file sub/tokenizer.json: its sha256 is"),
    (lambda f: (f / "model.safetensors").unlink(), "exported file model.safetensors is missing"),
    (lambda f: (f / "extra.bin").write_bytes(b"x"), "exported file extra.bin is not in the record"),
    (lambda f: (f / SIGNATURE_FILE).unlink(), "signed, but provenance.json.sig is missing"),
])
def test_verify_names_what_differs(tmp_path, tamper, named):
    _export(tmp_path / "m", {"lr": 0.003}, key=Ed25519PrivateKey.generate())
    assert verify(tmp_path / "m").ok
    tamper(tmp_path / "m")
    result = verify(tmp_path / "m")
    assert not result.ok and named in result.problem


def test_an_unsigned_record_verifies_unless_a_key_is_required(tmp_path):
    record = _export(tmp_path / "m", {"lr": 0.003})
    assert record["signing"] == {"signed": False} and not (tmp_path / "m" / SIGNATURE_FILE).exists()
    assert verify(tmp_path / "m").ok
    result = verify(tmp_path / "m", [Ed25519PrivateKey.generate().public_key()])
    assert "unsigned, but --public-key asks for a signature" in result.problem


def test_a_base_that_forge_did_not_make_is_recorded_by_its_files(tmp_path):
    base = tmp_path / "hf-base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"abc")
    _export(tmp_path / "m", {"lr": 0.003}, base=str(base))
    record = json.loads((tmp_path / "m" / "provenance.json").read_text())
    assert record["base"]["record"] is None and set(record["base"]["files"]) == {"model.safetensors"}
    (base / "model.safetensors").write_bytes(b"abd")
    assert "file model.safetensors differs from its recorded sha256" in verify(tmp_path / "m").problem


@pytest.mark.parametrize("mode, dirs", [(0o644, 0o755), (0o640, 0o750), (0o600, 0o700), (0o664, 0o775)])
def test_exported_files_and_folders_get_the_mode(tmp_path, mode, dirs):
    _export(tmp_path / "m", {})
    set_modes(tmp_path / "m", mode)
    assert file_mode_dirs(mode) == dirs
    found = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert found == {"m": dirs, "m/sub": dirs, "m/sub/tokenizer.json": mode, "m/model.safetensors": mode,
                     "m/provenance.json": mode}


def _checkpoints(root: Path, steps: list[int]) -> None:
    """Committed checkpoints as checkpoint.save leaves them (DCP metadata, trainer state) and `latest`."""
    from forge_trainer.runtime.checkpoint import LATEST, STATE_FILE, step_name

    for step in steps:
        folder = root / step_name(step)
        folder.mkdir(parents=True)
        (folder / ".metadata").write_bytes(b"")
        (folder / STATE_FILE).write_text(json.dumps({"step": step}))
    (root / LATEST).write_text(step_name(steps[-1]) + "\n")
    (root / ".forge-cache").mkdir()


@pytest.mark.parametrize("retain, left", [
    ("All", ["step-00000010", "step-00000020", "step-00000030"]),
    ("Last", ["step-00000030"]),
    ("None", []),
])
def test_checkpoints_retained_after_success(tmp_path, retain, left):
    from forge_trainer.runtime.checkpoint import find_latest, retain_after_success

    _checkpoints(tmp_path, [10, 20, 30])
    retain_after_success(CheckpointConfig(dir=str(tmp_path), retain_after_success=retain))
    assert sorted(p.name for p in tmp_path.glob("step-*")) == left
    assert (tmp_path / ".forge-cache").is_dir()  # the prepared data stays
    latest = find_latest(tmp_path)
    assert (latest.name if latest else None) == (left[-1] if left else None)
    assert (tmp_path / "latest").exists() == bool(left)


def test_the_record_keeps_the_allowed_residency_beside_the_nodes_seen():
    from forge_trainer.config import ResidencyConfig
    from forge_trainer.runtime.provenance import nodes_of, residency

    workers = [{"hostname": h, "node": f"n-{h}", "region": "eu-west", "zone": z, "image_digest": d, "rank": r}
               for h, z, d, r in [("a", "eu-west-1a", "sha256:1", 0), ("a", "eu-west-1a", None, 1),
                                  ("b", None, "sha256:1", 2)]]
    nodes = nodes_of(workers)
    assert [(n["hostname"], n["ranks"], n["image_digest"]) for n in nodes] == [("a", [0, 1], "sha256:1"),
                                                                                ("b", [2], "sha256:1")]

    class Config:
        residency = ResidencyConfig(regions=["eu-west"])

    assert residency(Config, nodes) == {"allowed": {"regions": ["eu-west"], "zones": []}, "regions": ["eu-west"],
                                        "zones": ["eu-west-1a"]}
    Config.residency = None
    assert residency(Config, nodes)["allowed"] is None


def test_a_signing_key_that_cannot_be_used_fails_before_training(tmp_path):
    from forge_trainer.contract import ConfigError
    from forge_trainer.train import signing_key

    class Config:
        class provenance:
            signing_key = str(tmp_path / "missing.pem")

    with pytest.raises(ConfigError, match="provenance.signing_key: signing key .*missing.pem: cannot read"):
        signing_key(Config)
    (tmp_path / "rsa.pem").write_bytes(_rsa_pem())
    Config.provenance.signing_key = str(tmp_path / "rsa.pem")
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        signing_key(Config)


def _rsa_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
