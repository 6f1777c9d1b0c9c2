"""Data: find the source files, tokenize them once into cached token shards,
and serve packed, mixed, rank-sharded training sequences.

Layout of one prepared dataset (under cache_dir/tokens/<data>-<tokenizer>/):

    manifest.json   digests of every source file, token counts, tokenizer digest
    <source>.bin    the source's documents as one flat uint16/uint32 token
                    stream, each document followed by EOS

The directory is written under a temporary name and renamed when complete, so
a manifest that exists always describes finished shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig, DataSourceConfig, TrainerConfig
from .exitcodes import DataError, StoppedBeforeTraining
from .tokenizer import TextTokenizer, check_vocab, iter_limited, train_bpe

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_BATCH_BYTES = 8 << 20  # text encoded per batch: big enough to keep all cores busy


@dataclass(frozen=True)
class SourceFile:
    path: Path
    rel: str
    size: int


def discover(source: DataSourceConfig, index: int) -> list[SourceFile]:
    """The files of one source, in a fixed pseudo-random order (a hash of their path).

    Hash order rather than name order makes the validation tail of each stream
    a sample of the whole source rather than its alphabetically last files.
    """
    where = f"data.sources[{index}].path {source.path}"
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


def _read_bytes(f: SourceFile, where: str) -> bytes:
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
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: {f.rel} line {lineno}: invalid JSON ({e})") from e
            text = record.get(source.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{where}: {f.rel} line {lineno}: no string field {source.text_field!r}")
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


def _where(index: int, source: DataSourceConfig) -> str:
    return f"data.sources[{index}].path {source.path}"


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
                raise DataError(f"{_where(i, src)}: cannot read {f.rel}: {e.strerror or e}") from e
            hashed.append((f, digest))
        listing[src.name] = hashed
        h.update(json.dumps([src.name, src.format, src.text_field, [(f.rel, d) for f, d in hashed]]).encode())
    return h.hexdigest(), listing


def iter_training_text(config: TrainerConfig, listing) -> Iterator[str]:
    """Documents the tokenizer is trained on: every source except a validation-only one."""
    for i, src in enumerate(config.data.sources):
        if src.name == config.data.validation.source:
            continue
        for f, _ in listing[src.name]:
            yield from iter_documents(src, f, _read_bytes(f, _where(i, src)), _where(i, src))


def ensure_tokenizer(config: TrainerConfig, digest: str, listing) -> TextTokenizer:
    """Train the BPE (cached under cache_dir/tokenizers/) or load the configured one."""
    tcfg = config.tokenizer
    if tcfg.from_base:
        return TextTokenizer.from_pretrained(config.model.base_path)
    if tcfg.path is not None:
        return TextTokenizer.from_pretrained(tcfg.path)
    key = hashlib.sha256(f"{digest}:{tcfg.train.model_dump_json()}".encode()).hexdigest()[:24]
    cached = Path(config.cache_dir) / "tokenizers" / key / "tokenizer.json"
    if cached.exists():
        from tokenizers import Tokenizer

        return TextTokenizer(Tokenizer.from_file(str(cached)), "<|endoftext|>")
    t0 = time.monotonic()
    seen = [0]

    def counted():
        for text in iter_limited(iter_training_text(config, listing), tcfg.train.max_training_bytes):
            seen[0] += len(text)
            yield text

    tok = train_bpe(counted(), tcfg.train.vocab_size, tcfg.train.min_frequency, check=False)
    if seen[0] == 0:
        raise DataError("data.sources: the matching files hold no text")
    check_vocab(tok, tcfg.train.vocab_size, tcfg.train.min_frequency)
    log.info("trained a %d-token byte-level BPE in %.1fs", tok.get_vocab_size(), time.monotonic() - t0)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{uuid.uuid4().hex}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, cached)
    return TextTokenizer(tok, "<|endoftext|>")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def dataset_dir(config: TrainerConfig, digest: str, tokenizer: TextTokenizer) -> Path:
    return Path(config.cache_dir) / "tokens" / f"{digest[:16]}-{tokenizer.digest[:16]}"


def load_manifest(path: Path) -> dict | None:
    """The manifest of a finished dataset directory, or None when missing or inconsistent."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("version") != MANIFEST_VERSION:
            return None
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for s in manifest["sources"]:
            if (path / s["shard"]).stat().st_size != s["tokens"] * itemsize:
                return None
        return manifest
    except (OSError, ValueError, KeyError):
        return None


def prepare(config: TrainerConfig, tokenizer: TextTokenizer, digest: str, listing, stop=None) -> Path:
    """Tokenize every source into a cached shard directory (reused when it exists).

    ``stop()`` is asked between files: when it says so, preparation ends with StoppedBeforeTraining
    and leaves nothing behind (the shards are written under a temporary name)."""
    out = dataset_dir(config, digest, tokenizer)
    if load_manifest(out) is not None:
        log.info("using prepared data %s", out)
        return out
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        sample = _verification_sample(config, listing)
        tokenizer.verify(sample)
        sources = []
        for i, src in enumerate(config.data.sources):
            sources.append(_prepare_source(i, src, listing[src.name], tokenizer, dtype, tmp / f"{src.name}.bin", stop))
        total_bytes = sum(s["bytes"] for s in sources)
        manifest = {
            "version": MANIFEST_VERSION,
            "data_digest": digest,
            "tokenizer_digest": tokenizer.digest,
            "encoder": tokenizer.encoder,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": dtype.name,
            "sources": sources,
            "seconds": round(time.monotonic() - t0, 3),
        }
        (tmp / "tokenizer.json").write_text(tokenizer.json)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, out)
        except OSError:  # another node finished the same dataset first
            if load_manifest(out) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dt = time.monotonic() - t0
    log.info(
        "prepared %s tokens from %.1f MB in %.1fs (%.1f MB/s, %s) -> %s",
        f"{sum(s['tokens'] for s in sources):,}", total_bytes / 1e6, dt, total_bytes / 1e6 / max(dt, 1e-9), tokenizer.encoder, out,
    )
    return out


def _verification_sample(config: TrainerConfig, listing, max_bytes: int = 256 << 10) -> list[str]:
    """About 256 KB of documents spread over all sources, to check the fast encoder against `tokenizers`."""
    texts: list[str] = []
    per_source = max_bytes // len(config.data.sources)
    for i, src in enumerate(config.data.sources):
        seen = 0
        for f, _ in listing[src.name]:
            for doc in iter_documents(src, f, _read_bytes(f, _where(i, src)), _where(i, src)):
                texts.append(doc[:65536])
                seen += len(texts[-1])
            if seen >= per_source:
                break
    return texts


def _prepare_source(index, src, files, tokenizer: TextTokenizer, dtype, shard: Path, stop=None) -> dict:
    where = _where(index, src)
    records = []
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    n_tokens = n_docs = n_bytes = 0
    with open(shard, "wb") as out:
        batch: list[tuple[int, str]] = []  # (file position, document)
        batch_bytes = 0

        def flush():
            nonlocal batch, batch_bytes, n_tokens, n_docs
            ids = tokenizer.encode_batch([d for _, d in batch])
            for (fi, _), doc_ids in zip(batch, ids):
                arr = np.asarray(doc_ids, dtype=dtype)
                out.write(arr.tobytes())
                out.write(eos.tobytes())
                records[fi]["tokens"] += len(doc_ids) + 1
                records[fi]["documents"] += 1
                n_tokens += len(doc_ids) + 1
                n_docs += 1
            batch, batch_bytes = [], 0

        for f, digest in files:
            if stop is not None and stop():
                raise StoppedBeforeTraining("SIGTERM while the data was being prepared; nothing to save")
            raw = _read_bytes(f, where)
            records.append({"path": f.rel, "sha256": digest, "bytes": len(raw), "tokens": 0, "documents": 0})
            n_bytes += len(raw)
            if hashlib.sha256(raw).hexdigest() != digest:
                raise DataError(f"{where}: {f.rel} changed while it was being prepared")
            for doc in iter_documents(src, f, raw, where):
                batch.append((len(records) - 1, doc))
                batch_bytes += len(doc)
                if batch_bytes >= _BATCH_BYTES:
                    flush()
        if batch:
            flush()
    if n_tokens == 0:
        raise DataError(f"{where}: the matching files hold no text")
    return {
        "name": src.name,
        "format": src.format,
        "path": str(src.path),
        "shard": shard.name,
        "files": records,
        "documents": n_docs,
        "bytes": n_bytes,
        "tokens": n_tokens,
    }


# ---------------------------------------------------------------------------
# Loading: packed sequences, mixed by weight, sharded over ranks.


class TokenData:
    """The prepared token streams, split into training and validation windows.

    A window is seq_len + 1 consecutive tokens (inputs and shifted targets);
    windows tile each stream without overlap, so documents are packed with EOS
    between them and no token is padding. With validation.fraction, the last
    fraction of each source's stream is held out; with validation.source, that
    whole source is.
    """

    def __init__(self, path: Path, config: TrainerConfig):
        self.path = Path(path)
        manifest = load_manifest(self.path)
        if manifest is None:
            raise DataError(f"prepared data in {self.path} is missing or incomplete")
        self.manifest = manifest
        self.seq_len = config.training.seq_len
        dtype = np.dtype(manifest["dtype"])
        val = config.data.validation
        weights = {s.name: s.weight for s in config.data.sources}
        self.names: list[str] = []
        self.weights: list[float] = []
        self.train: list[tuple[np.memmap, int]] = []  # (stream, number of windows)
        self.val: list[tuple[np.memmap, int, int]] = []  # (stream, first window token offset, windows)
        L = self.seq_len
        for s in manifest["sources"]:
            stream = np.memmap(self.path / s["shard"], dtype=dtype, mode="r")
            n = len(stream)
            if val.source == s["name"]:
                n_train = 0
            else:
                n_train = n - int(round(n * (val.fraction or 0.0)))
            if val.source == s["name"] or (val.fraction and n_train < n):
                n_val_windows = (n - n_train - 1) // L
                if n_val_windows > 0:
                    self.val.append((stream, n_train, n_val_windows))
            if val.source != s["name"]:
                windows = (n_train - 1) // L
                if windows <= 0:
                    raise DataError(
                        f"data source {s['name']!r} has {n_train} training tokens, fewer than one sequence "
                        f"of training.seq_len {L} + 1; add text or lower seq_len"
                    )
                self.names.append(s["name"])
                self.weights.append(weights[s["name"]])
                self.train.append((stream, windows))
        if (val.source or val.fraction) and not self.val:
            raise DataError(
                f"the validation split holds fewer than {L + 1} tokens (one sequence); "
                "raise data.validation.fraction or add data"
            )
        total = sum(self.weights)
        self.weights = [w / total for w in self.weights]

    @property
    def train_tokens(self) -> int:
        return sum(w * self.seq_len for _, w in self.train)

    @property
    def val_windows(self) -> int:
        return sum(w for _, _, w in self.val)

    def val_window(self, i: int) -> np.ndarray:
        for stream, start, windows in self.val:
            if i < windows:
                off = start + i * self.seq_len
                return np.asarray(stream[off : off + self.seq_len + 1], dtype=np.int64)
            i -= windows
        raise IndexError(i)


class TrainLoader:
    """A deterministic, resumable stream of training windows, identical on every rank.

    Sample g of the run comes from the source whose share is furthest behind its
    weight (smooth weighted round robin); each source walks a fresh seeded
    permutation of its windows every epoch. Every rank advances the same global
    state and reads only its own slice of each step's global batch, so the
    state is one small dict that does not depend on the world size: a run can
    resume on a different number of workers and see the same data.
    """

    def __init__(self, data: TokenData, seed: int):
        self.data = data
        self.seed = seed
        self.consumed = 0
        self.taken = [0] * len(data.train)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "taken": dict(zip(self.data.names, self.taken))}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
        taken = state["taken"]
        if set(taken) != set(self.data.names):
            raise DataError(f"checkpoint data sources {sorted(taken)} differ from the configured {sorted(self.data.names)}")
        self.taken = [int(taken[n]) for n in self.data.names]

    def _window(self, s: int, k: int) -> np.ndarray:
        stream, windows = self.data.train[s]
        epoch, pos = divmod(k, windows)
        cached = self._perm_cache.get(s)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, s, epoch])
            perm = rng.permutation(windows).astype(np.int64 if windows >= 2**31 else np.int32)
            self._perm_cache[s] = cached = (epoch, perm)
        off = int(cached[1][pos]) * self.data.seq_len
        return np.asarray(stream[off : off + self.data.seq_len + 1], dtype=np.int64)

    def _next_source(self) -> int:
        g = self.consumed + 1
        deficits = [w * g - t for w, t in zip(self.data.weights, self.taken)]
        return max(range(len(deficits)), key=deficits.__getitem__)

    def next_step(self, global_batch: int, rank: int, world: int) -> np.ndarray:
        """This rank's windows of the next global batch: int64 array [global_batch / world, seq_len + 1]."""
        per_rank = global_batch // world
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        rows = []
        for j in range(global_batch):
            s = self._next_source()
            k = self.taken[s]
            self.taken[s] += 1
            self.consumed += 1
            if lo <= j < hi:
                rows.append(self._window(s, k))
        return np.stack(rows)
