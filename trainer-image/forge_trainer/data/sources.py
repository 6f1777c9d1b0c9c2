"""Where the training text comes from: the files of each source, in a fixed order, their digests,
and the documents in each file (text, jsonl, parquet)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig, DataSourceConfig
from ..contract import DataError


@dataclass(frozen=True)
class SourceFile:
    path: Path
    rel: str
    size: int


def source_label(index: int, source: DataSourceConfig) -> str:
    """How errors name a source: its place in the config and its path."""
    return f"data.sources[{index}].path {source.path}"


def discover(source: DataSourceConfig, index: int) -> list[SourceFile]:
    """The files of one source, in a fixed pseudo-random order (a hash of their path).

    Hash order rather than name order makes the validation tail of each stream
    a sample of the whole source rather than its alphabetically last files.
    """
    where = source_label(index, source)
    root = Path(source.path)
    if not root.exists():
        raise DataError(f"{where}: does not exist")
    if root.is_file():
        return [SourceFile(root, root.name, root.stat().st_size)]
    found: dict[str, Path] = {}
    for pattern in source.include_patterns:
        for p in root.glob(pattern):
            if not p.is_dir():  # broken links stay in, and fail loudly when read
                found[p.relative_to(root).as_posix()] = p
    for pattern in source.exclude:
        for p in root.glob(pattern):
            rel = p.relative_to(root).as_posix()
            found.pop(rel, None)
            if p.is_dir():  # "dir/**" matches directories: leave out everything under them
                for key in [k for k in found if k.startswith(rel + "/")]:
                    del found[key]
    if not found:
        raise DataError(f"{where}: no files match {', '.join(source.include_patterns)}")
    files = []
    for rel, p in found.items():
        try:
            size = p.stat().st_size
        except OSError as e:
            raise DataError(f"{where}: cannot read {rel}: {e.strerror or e}") from e
        files.append(SourceFile(p, rel, size))
    files.sort(key=lambda f: hashlib.sha1(f.rel.encode()).digest())
    return files


def read_bytes(f: SourceFile, where: str) -> bytes:
    try:
        return f.path.read_bytes()
    except OSError as e:
        raise DataError(f"{where}: cannot read {f.rel}: {e.strerror or e}") from e


def _clean(text: str) -> str:
    # Lone surrogates (from JSON "\ud800" escapes) cannot be encoded as UTF-8.
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def iter_documents(source: DataSourceConfig, f: SourceFile, raw: bytes, where: str) -> Iterator[str]:
    """The documents in one file: the whole file (text) or one per record (jsonl, parquet)."""
    if source.format == "text":
        yield raw.decode("utf-8", "replace")
    elif source.format == "jsonl":
        for at, record in _jsonl_records(f, raw, where):
            text = record.get(source.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{where}: {f.rel} {at}: no string field {source.text_field!r}")
            yield _clean(text)
    else:
        import io

        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(io.BytesIO(raw))
            if source.text_field not in pf.schema_arrow.names:
                raise DataError(f"{where}: {f.rel}: no column {source.text_field!r} (has {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=[source.text_field], batch_size=8192):
                for text in batch.column(0).to_pylist():
                    if text:
                        yield _clean(text)
        except DataError:
            raise
        except Exception as e:  # pyarrow raises many types for a corrupt file
            raise DataError(f"{where}: cannot read {f.rel} as parquet: {e}") from e


def _jsonl_records(f: SourceFile, raw: bytes, where: str) -> Iterator[tuple[str, object]]:
    """("line N", the parsed value) of every non-blank line; an invalid line is an error naming it."""
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: {f.rel} line {lineno}: invalid JSON ({e})") from e


def iter_records(source: DataSourceConfig, f: SourceFile, raw: bytes, where: str) -> Iterator[tuple[str, dict]]:
    """The records of one jsonl or parquet file, each with where it is ("line N", "row N"), for errors."""
    if source.format == "jsonl":
        for at, record in _jsonl_records(f, raw, where):
            if not isinstance(record, dict):
                raise DataError(f"{where}: {f.rel} {at}: a record must be a JSON object")
            yield at, record
        return
    import io

    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(raw))
        batches = pf.iter_batches(batch_size=8192)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield f"row {row}", record
    except Exception as e:  # pyarrow raises many types for a corrupt file
        raise DataError(f"{where}: cannot read {f.rel} as parquet: {e}") from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_digest(cfg: DataConfig) -> tuple[str, dict[str, list[tuple[SourceFile, str]]]]:
    """A digest of every source file's content (and how it is read), plus the hashed file lists."""
    listing: dict[str, list[tuple[SourceFile, str]]] = {}
    h = hashlib.sha256()
    for i, src in enumerate(cfg.sources):
        files = discover(src, i)
        hashed = []
        for f in files:
            try:
                digest = sha256_file(f.path)
            except OSError as e:
                raise DataError(f"{source_label(i, src)}: cannot read {f.rel}: {e.strerror or e}") from e
            hashed.append((f, digest))
        listing[src.name] = hashed
        how = [src.name, src.format, src.text_field]
        if src.record_kind is not None:  # how records are read; left out for documents (their digests stay)
            how.append([src.prompt_field, src.completion_field, src.messages_field]
                       + ([src.chosen_field, src.rejected_field] if src.record_kind == "preference" else []))
        h.update(json.dumps([*how, [(f.rel, d) for f, d in hashed]]).encode())
    return h.hexdigest(), listing
