"""`forge provenance verify|show`: a pretrain -> sft chain made with `forge train`, signed with a key from
the spec's Secret (a --volume folder here), verifies; one byte changed in a data file, a weight file, the
recorded config or the base model's record makes `verify` fail naming it."""

from __future__ import annotations

import copy
import json
import stat
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from forge_operator.cli.main import main as forge_main

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "trainer"))
sys.path.insert(0, str(ROOT / "tests" / "cli"))
from sft_helpers import write_records  # noqa: E402
from test_forge_train import TINY, forge  # noqa: E402
from trainer_helpers import write_corpus  # noqa: E402

pytestmark = pytest.mark.slow  # two `forge train` runs (about 40 s of CPU) for the module's chain

SIGNING = {"signingKeySecret": {"name": "model-signing"}}


def _pem(key: Ed25519PrivateKey, public: bool = False) -> bytes:
    if public:
        return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _train(tmp: Path, name: str, spec: dict, volumes: dict[str, Path]) -> None:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = forge("train", str(path), *[a for c, d in volumes.items() for a in ("--volume", f"{c}={d}")], cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """pretrain (tiny, 6 steps) -> sft of it (4 steps), both signed; the sft's files with mode 0640."""
    tmp = tmp_path_factory.mktemp("chain")
    key = Ed25519PrivateKey.generate()
    (tmp / "secret").mkdir()
    (tmp / "secret" / "private.pem").write_bytes(_pem(key))
    (tmp / "public.pem").write_bytes(_pem(key, public=True))
    volumes = {"data": write_corpus(tmp / "corpus", files=6), "runs": tmp / "runs", "model-signing": tmp / "secret",
               "sft-data": write_records(tmp / "sft" / "records.jsonl", "pairs", 48).parent}

    pretrain = copy.deepcopy(TINY)
    pretrain["spec"]["training"] |= {"evalIntervalSteps": 3, "budget": {"maxSteps": 6}}
    pretrain["spec"]["checkpoint"] |= {"intervalSteps": 2, "retainAfterSuccess": "Last"}
    pretrain["spec"]["provenance"] = SIGNING
    _train(tmp, "pretrain", pretrain, volumes)

    sft = copy.deepcopy(pretrain)
    sft["metadata"]["name"] = "tiny-sft"
    sft["spec"] |= {"method": "sft", "model": {"base": {"pvc": {"claimName": "runs", "path": "tiny/model"}}},
                    "tokenizer": {"fromBase": True}}
    sft["spec"]["data"]["sources"] = [{"name": "qa", "format": "jsonl", "promptField": "prompt",
                                       "completionField": "completion", "location": {"pvc": {"claimName": "sft-data"}}}]
    sft["spec"]["training"] |= {"budget": {"maxSteps": 4}, "globalBatch": {"sequences": 8}}
    sft["spec"]["checkpoint"] = {"location": {"pvc": {"claimName": "runs", "path": "sft/ckpt"}}, "intervalSteps": 2,
                                 "retainAfterSuccess": "None"}
    sft["spec"]["output"] = {"location": {"pvc": {"claimName": "runs", "path": "sft/model"}}, "fileMode": 0o640}
    _train(tmp, "sft", sft, volumes)
    return tmp


def _verify(capsys, *args: str) -> tuple[int, str]:
    code = forge_main(["provenance", "verify", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_signed_pretrain_to_sft_chain_verifies(chain, capsys):
    sft = chain / "runs" / "sft" / "model"
    code, out = _verify(capsys, str(sft), "--public-key", str(chain / "public.pem"))
    assert code == 0, out
    assert "2 record(s) in the chain (sft <- pretrain)" in out and "2 signed (against the given key(s))" in out
    record = json.loads((sft / "provenance.json").read_text())
    assert record["schema"] == "forge.dev/provenance/v1" and record["image"]["reference"] == "local"
    assert record["base"]["record"] == json.loads((chain / "runs" / "tiny" / "model" / "provenance.json").read_text())
    assert record["nodes"][0]["ranks"] == [0] and record["versions"]["forge"]
    assert set(record["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert record["signing"]["signed"] and (sft / "provenance.json.sig").is_file()

    # another key, or none required of an unsigned record: named
    other = chain / "other.pem"
    other.write_bytes(_pem(Ed25519PrivateKey.generate(), public=True))
    code, out = _verify(capsys, str(sft), "--public-key", str(other))
    assert code == 1 and "which is not one of the --public-key keys" in out


def test_show_prints_the_chain(chain, capsys):
    assert forge_main(["provenance", "show", str(chain / "runs" / "sft" / "model")]) == 0
    out = capsys.readouterr().out
    assert "run        tiny-sft: sft, 4 steps" in out and "\nbase model " in out and "run        tiny: pretrain, 6 steps" in out
    assert "signature  Ed25519, key sha256:" in out and "image      local" in out and "model.safetensors" in out
    assert out.count("data       ") == 2 and "GPU-hours" in out and "node       " in out


def _flip(path: Path, at: int) -> bytes:
    """Change one byte of ``path`` (at ``at``, from the end when negative); returns the original."""
    data = path.read_bytes()
    changed = bytearray(data)
    changed[at] ^= 0x01
    path.write_bytes(bytes(changed))
    return data


def test_one_changed_byte_is_named(chain, capsys):
    sft, base = chain / "runs" / "sft" / "model", chain / "runs" / "tiny" / "model"
    record = (sft / "provenance.json").read_text()
    config_byte = record.rindex('"lr": ') + len('"lr": ') + 2  # a digit of its own learning rate (the base record comes first)
    cases = [
        (chain / "sft" / "records.jsonl", 5, "data file", "records.jsonl (source qa): its sha256 is"),
        (chain / "corpus" / "doc003.txt", 5, "base's data file", "doc003.txt (source toy): its sha256 is"),
        (sft / "model.safetensors", -3, "weight file", "exported file model.safetensors: its sha256 is"),
        (sft / "provenance.json", config_byte, "config", "config: its sha256 is"),
        (base / "provenance.json", 40, "base model's record", "(the base model's record was changed)"),
    ]
    for path, at, what, named in cases:
        original = _flip(path, at)
        try:
            code, out = _verify(capsys, str(sft))
        finally:
            path.write_bytes(original)
        assert code == 1 and named in out, (what, out)
    code, out = _verify(capsys, str(sft))
    assert code == 0, out


def test_a_record_changed_and_its_hashes_fixed_up_fails_its_signature(chain, capsys):
    sft = chain / "runs" / "sft" / "model"
    original = (sft / "provenance.json").read_bytes()
    record = json.loads(original)
    record["steps"] = 4000
    from forge_trainer.provenance import canonical

    (sft / "provenance.json").write_bytes(canonical(record))
    try:
        code, out = _verify(capsys, str(sft), "--skip-data")
    finally:
        (sft / "provenance.json").write_bytes(original)
    assert code == 1 and "the signature does not match the record" in out


def test_exported_files_get_the_spec_mode_and_checkpoints_the_retention(chain):
    sft, base = chain / "runs" / "sft" / "model", chain / "runs" / "tiny" / "model"
    modes = lambda folder: {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}  # noqa: E731
    assert set(modes(base).values()) == {0o644, 0o755} and modes(base)["model"] == 0o755
    assert modes(base)["model.safetensors"] == 0o644
    assert modes(sft)["model.safetensors"] == 0o640 and modes(sft)["model"] == 0o750
    # retainAfterSuccess Last: the final checkpoint (step 6) only; None: no checkpoint, and no `latest`
    assert sorted(p.name for p in (chain / "runs" / "tiny" / "ckpt").glob("step-*")) == ["step-00000006"]
    assert not list((chain / "runs" / "sft" / "ckpt").glob("step-*"))
    assert not (chain / "runs" / "sft" / "ckpt" / "latest").exists()
