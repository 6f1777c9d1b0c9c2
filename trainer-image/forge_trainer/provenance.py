"""Provenance records: their schema, canonical form, signature and verification (no torch: the `forge`
command verifies and shows them without the trainer's heavy dependencies).

An export folder holds `provenance.json` and, when a signing key was configured, `provenance.json.sig`.
The record is written in its canonical form (`canonical`: sorted keys, one space of indent, UTF-8), so
the SHA-256 of the file is the SHA-256 of the record, however often it is read and written again: a
record embedded in a later one (the base model's, as `base.record`) still hashes and verifies as the
file did. The signature is Ed25519 over those bytes, base64 in the `.sig` file.

What a record holds (schema `forge.dev/provenance/v1`; `runtime/provenance.py` builds it):
run (name, method, steps, tokens, losses, stop reason), times and GPU-hours, image (reference, digest),
versions (Forge, Python, torch, ...), nodes (host, node, region, zone, ranks), data (sources with every
file's SHA-256), tokenizer, model, config and `config_sha256`, storage (where inputs and outputs were),
residency, base (the base model's record, embedded with its SHA-256 and signature: the whole chain),
files (SHA-256 and size of every exported file) and signing (the public key, or unsigned).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "forge.dev/provenance/v1"
RECORD_FILE = "provenance.json"
SIGNATURE_FILE = "provenance.json.sig"
ALGORITHM = "Ed25519"
CHUNK = 1 << 20


class ProvenanceError(Exception):
    """A record, key or signature that cannot be read or used; the message names it."""


# --------------------------------------------------------------------------- canonical form and hashes
def canonical(record: dict) -> bytes:
    """The bytes a record is written as, hashed as and signed as."""
    return (json.dumps(record, sort_keys=True, indent=1, ensure_ascii=False, default=str) + "\n").encode()


def normalized(record: dict) -> dict:
    """The record as it reads back from its file (tuples become lists, objects their str)."""
    return json.loads(canonical(record))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def config_sha256(config: dict) -> str:
    """The hash of the effective trainer configuration, as the record stores it."""
    return sha256_bytes(canonical(config))


def file_names(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative POSIX path, sorted, but the record and its signature."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() not in (RECORD_FILE, SIGNATURE_FILE))


def folder_files(folder: Path) -> dict[str, dict]:
    """Every file under ``folder`` (relative POSIX path) -> {sha256, bytes}, but the record and its signature."""
    return {rel: {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
            for rel in file_names(folder)}


# --------------------------------------------------------------------------- keys and signatures
def load_private_key(path: str | Path):
    """An Ed25519 private key from a PEM file (`openssl genpkey -algorithm ed25519`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ProvenanceError(f"signing key {path}: cannot read an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ProvenanceError(f"signing key {path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path):
    """An Ed25519 public key from a PEM file (`openssl pkey -pubout`) or an OpenSSH public key line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        data = Path(path).read_bytes()
        key = (serialization.load_ssh_public_key(data) if data.startswith(b"ssh-")
               else serialization.load_pem_public_key(data))
    except (OSError, ValueError, TypeError) as e:
        raise ProvenanceError(f"public key {path}: cannot read a PEM or OpenSSH public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ProvenanceError(f"public key {path}: not an Ed25519 key ({type(key).__name__})")
    return key


def _raw(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    """How a record names its signing key: the SHA-256 of the raw public key."""
    return "sha256:" + sha256_bytes(_raw(public_key))


def signing_section(private_key) -> dict:
    """The record's `signing` section: who signs it (the public key is part of what is signed)."""
    if private_key is None:
        return {"signed": False}
    public = private_key.public_key()
    return {"signed": True, "algorithm": ALGORITHM, "key_id": key_id(public),
            "public_key": base64.b64encode(_raw(public)).decode()}


def sign(data: bytes, private_key) -> str:
    """The detached signature, base64, as the `.sig` file holds it."""
    return base64.b64encode(private_key.sign(data)).decode() + "\n"


def _signature_problem(data: bytes, signature: str | None, signing: dict, trusted: list) -> str | None:
    """Why a signature does not hold (None: it does, or the record is unsigned and no key is required)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not signing.get("signed"):
        return "unsigned, but --public-key asks for a signature" if trusted else None
    if signing.get("algorithm") != ALGORITHM:
        return f"signed with {signing.get('algorithm')!r}, which this version cannot check (only {ALGORITHM})"
    if signature is None:
        return f"signed, but {SIGNATURE_FILE} is missing"
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(signing["public_key"]))
        public.verify(base64.b64decode(signature.strip(), validate=True), data)
    except (InvalidSignature, ValueError, KeyError):
        return f"the signature does not match the record (key {signing.get('key_id')}): the record was changed " \
               "after it was signed, or the signature belongs to another record"
    if trusted and key_id(public) not in {key_id(k) for k in trusted}:
        return f"signed by key {key_id(public)}, which is not one of the --public-key keys"
    return None


# --------------------------------------------------------------------------- writing
def write_record(folder: Path, record: dict, private_key=None) -> dict:
    """Finish ``record`` for the files now in ``folder`` (their hashes, the signing section) and write it,
    with its signature when there is a key. Returns the record as written."""
    record = normalized({**record, "files": folder_files(folder), "signing": signing_section(private_key)})
    data = canonical(record)
    (folder / RECORD_FILE).write_bytes(data)
    if private_key is not None:
        (folder / SIGNATURE_FILE).write_text(sign(data, private_key))
    return record


def base_section(base_path: str | None) -> dict | None:
    """What a record keeps of its base model: its own record (embedded, with the record's SHA-256 and
    signature) when it was made by Forge, else the SHA-256 of each of its files."""
    if base_path is None:
        return None
    folder = Path(base_path)
    record_file = folder / RECORD_FILE
    if not record_file.is_file():
        return {"path": base_path, "record": None, "sha256": None, "signature": None, "files": folder_files(folder)}
    data = record_file.read_bytes()
    try:
        record = json.loads(data)
    except ValueError as e:  # recorded as found: verify then names it
        return {"path": base_path, "record": None, "sha256": sha256_bytes(data), "signature": None,
                "problem": f"{RECORD_FILE} is not valid JSON ({e})", "files": folder_files(folder)}
    sig = folder / SIGNATURE_FILE
    return {"path": base_path, "record": record, "sha256": sha256_bytes(data),
            "signature": sig.read_text() if sig.is_file() else None}


# --------------------------------------------------------------------------- reading and verifying
def read_record(folder: str | Path) -> tuple[dict, bytes]:
    path = Path(folder) / RECORD_FILE
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ProvenanceError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        record = json.loads(data)
    except ValueError as e:
        raise ProvenanceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        found = record.get("schema") if isinstance(record, dict) else None
        raise ProvenanceError(f"{path}: not a {SCHEMA} record (schema {found!r})")
    return record, data


@dataclass
class Verification:
    """The outcome of checking a chain: the first thing that differs (None: everything matched), and
    what was checked, in order."""

    problem: str | None = None
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


class _Differs(Exception):
    pass


def verify(folder: str | Path, public_keys: list | None = None, check_data: bool = True) -> Verification:
    """Check the record in ``folder`` and every base record under it: the config against its hash, every
    exported file, every data file (``check_data``), each base record against the hash its successor
    recorded, and each signature (with ``public_keys``: every record must be signed by one of them)."""
    out = Verification()
    try:
        record, data = read_record(folder)
        _verify_record(record, data, Path(folder), _signature_of(Path(folder)), public_keys or [], check_data,
                       out, label=str(folder))
    except (_Differs, ProvenanceError) as e:
        out.problem = str(e)
    return out


def _signature_of(folder: Path) -> str | None:
    sig = folder / SIGNATURE_FILE
    return sig.read_text() if sig.is_file() else None


def _check(ok: bool, out: Verification, what: str | None, problem: str) -> None:
    """Stop at the first difference; else note ``what`` was checked."""
    if not ok:
        raise _Differs(problem)
    if what:
        out.checked.append(what)


def _verify_record(record: dict, data: bytes, folder: Path | None, signature: str | None, trusted: list,
                   check_data: bool, out: Verification, label: str) -> None:
    """``folder``: where the record's files are (None: an embedded record whose folder is gone)."""
    got = config_sha256(record.get("config", {}))
    _check(got == record.get("config_sha256"), out, f"{label}: config sha256 {got[:12]}",
           f"{label}: config: its sha256 is {got}, the record says {record.get('config_sha256')} (the recorded "
           "trainer configuration was changed)")
    if folder is not None:
        _verify_files(record, folder, out, label)
    if check_data:
        _verify_data(record, out, label)
    _verify_base(record, trusted, check_data, out, label)
    problem = _signature_problem(data, signature, record.get("signing") or {}, trusted)
    signing = record.get("signing") or {}
    _check(problem is None, out, f"{label}: " + (f"signature by {signing.get('key_id')}" if signing.get("signed")
                                                 else "unsigned"), f"{label}: {problem}")


def _verify_files(record: dict, folder: Path, out: Verification, label: str) -> None:
    recorded = record.get("files") or {}
    present = set(file_names(folder))
    for rel in sorted(recorded):
        path = folder / rel
        _check(path.is_file(), out, None, f"{label}: exported file {rel} is missing")
        got = sha256_file(path)
        _check(got == recorded[rel]["sha256"], out, f"{label}: {rel} sha256 {got[:12]}",
               f"{label}: exported file {rel}: its sha256 is {got}, the record says {recorded[rel]['sha256']}")
    extra = sorted(present - set(recorded))
    _check(not extra, out, f"{label}: no file beside the recorded ones",
           f"{label}: exported file {extra[0] if extra else ''} is not in the record")


def data_file_path(source_path: str, file_path: str) -> Path:
    """Where a data file of a record is: manifests name files relative to their source's folder (a source
    that is one file names the file itself)."""
    p, root = Path(file_path), Path(source_path)
    if p.is_absolute():
        return p
    return root if root.name == file_path and not root.is_dir() else root / p


def _verify_data(record: dict, out: Verification, label: str) -> None:
    for source in (record.get("data") or {}).get("sources") or []:
        for f in source.get("files") or []:
            path = data_file_path(source["path"], f["path"])
            where = f"{label}: data file {path} (source {source.get('name')})"
            _check(path.is_file(), out, None, f"{where} is missing (--skip-data checks the rest)")
            got = sha256_file(path)
            _check(got == f["sha256"], out, f"{where} sha256 {got[:12]}",
                   f"{where}: its sha256 is {got}, the record says {f['sha256']}")


def _verify_base(record: dict, trusted: list, check_data: bool, out: Verification, label: str) -> None:
    base = record.get("base")
    if not base:
        return
    folder = Path(base["path"])
    where = f"{label}: base model {base['path']}"
    if base.get("record") is None:  # not made by Forge: its files were recorded instead
        _check(not base.get("problem"), out, None, f"{where}: its record could not be read when this model was "
               f"trained: {base.get('problem')}")
        if folder.is_dir():
            for rel, f in sorted((base.get("files") or {}).items()):
                path = folder / rel
                _check(path.is_file() and sha256_file(path) == f["sha256"], out, f"{where}: {rel}",
                       f"{where}: file {rel} " + ("differs from its recorded sha256" if path.is_file() else "is missing"))
        return
    embedded = canonical(base["record"])
    _check(sha256_bytes(embedded) == base.get("sha256"), out, f"{where}: embedded record sha256",
           f"{where}: the embedded base record's sha256 is {sha256_bytes(embedded)}, the record says {base.get('sha256')}")
    on_disk = folder / RECORD_FILE
    if on_disk.is_file():
        disk = on_disk.read_bytes()
        _check(sha256_bytes(disk) == base["sha256"], out, f"{where}: {RECORD_FILE} sha256 {base['sha256'][:12]}",
               f"{where}: {on_disk}: its sha256 is {sha256_bytes(disk)}, the record says {base['sha256']} (the base "
               "model's record was changed)")
        _verify_record(base["record"], disk, folder, _signature_of(folder), trusted, check_data, out,
                       label=str(folder))
    else:
        out.checked.append(f"{where}: folder gone, checking the embedded record")
        _verify_record(base["record"], embedded, None, base.get("signature"), trusted, check_data, out,
                       label=f"{base['path']} (embedded)")


def chain(record: dict) -> list[dict]:
    """The record and its bases, newest first."""
    out = [record]
    while (base := (out[-1].get("base") or {})) and base.get("record"):
        out.append(base["record"])
    return out


def file_mode_dirs(mode: int) -> int:
    """A folder's mode for a file mode: searchable where readable (0644 -> 0755, 0640 -> 0750)."""
    return mode | ((mode & 0o444) >> 2)


def set_modes(folder: Path, file_mode: int) -> None:
    """Give every file under ``folder`` ``file_mode`` and every folder (``folder`` too) its folder mode."""
    dir_mode = file_mode_dirs(file_mode)
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
    os.chmod(folder, dir_mode)
