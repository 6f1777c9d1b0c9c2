"""Data preparation: train or load the tokenizer, then tokenize every source once into cached
token shards that every rank (and every later run) reads.

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
from pathlib import Path

import numpy as np

from ..config import TrainerConfig
from ..contract import DataError, StoppedBeforeTraining
from ..runtime.dist import Dist, hostname
from ..runtime.signals import SigtermFlag, on_every_rank
from .meter import PrepareMeter, meter_for
from .sources import data_digest, iter_documents, read_bytes, source_label
from .tokenizer import TextTokenizer, check_vocab, iter_limited, train_bpe

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_BATCH_BYTES = 8 << 20  # text encoded per batch: big enough to keep all cores busy


def prepare_on_ranks(config: TrainerConfig, d: Dist, stop: SigtermFlag,
                     prepare=None, ready=None) -> tuple[TextTokenizer, Path, str]:
    """Rank 0 trains/loads the tokenizer and tokenizes the data; the others get the result:
    (tokenizer, prepared directory, data digest). ``prepare`` turns the files into the prepared
    directory (default: pretraining's token shards, ``prepare_dataset``; sft's records have their own),
    ``ready(path)`` says whether a node finds it complete (default: ``load_manifest``).

    Errors found by rank 0 are re-raised on every rank, so all exit with the
    same code instead of waiting forever. Nodes that do not share cache_dir
    prepare their own copy with rank 0's tokenizer (encoding is deterministic).
    """
    prepare = prepare or prepare_dataset
    ready = ready or (lambda p: load_manifest(p) is not None)

    def should_stop() -> bool:
        return stop.requested

    made: dict[str, TextTokenizer] = {}

    def on_rank_0() -> tuple[str, str, str, str]:
        digest, listing = data_digest(config.data)
        made["tokenizer"] = tokenizer = ensure_tokenizer(config, digest, listing)
        path = prepare(config, tokenizer, digest, listing, stop=should_stop)
        return tokenizer.json, tokenizer.eos_token, str(path), digest

    tok_json, eos, path, digest = d.on_main(on_rank_0, "preparing the data")
    tokenizer = made.get("tokenizer") or TextTokenizer.from_json(tok_json, eos)

    def prepare_on_this_node() -> None:
        if d.is_main or d.local_rank != 0 or ready(Path(path)):
            return
        local_digest, listing = data_digest(config.data)
        if local_digest != digest:
            raise DataError(f"the data on {hostname()} differs from rank 0's (digest {local_digest[:12]} != {digest[:12]})")
        prepare(config, tokenizer, digest, listing, stop=should_stop)

    on_every_rank(d, prepare_on_this_node, stop)  # also the barrier: every node's copy is ready after it
    return tokenizer, Path(path), digest


def iter_training_text(config: TrainerConfig, listing) -> Iterator[str]:
    """Documents the tokenizer is trained on: every source except a validation-only one."""
    for i, src in enumerate(config.data.sources):
        if src.name == config.data.validation.source:
            continue
        for f, _ in listing[src.name]:
            yield from iter_documents(src, f, read_bytes(f, source_label(i, src)), source_label(i, src))


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


def read_manifest(path: Path, version: int, sizes) -> dict | None:
    """The manifest of a finished cache directory, or None when it is missing, of another version, or
    a file it lists has not the size it says: ``sizes(source, itemsize)`` maps a source's files to theirs."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("version") != version:
            return None
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for s in manifest["sources"]:
            if any((path / name).stat().st_size != size for name, size in sizes(s, itemsize).items()):
                return None
        return manifest
    except (OSError, ValueError, KeyError):
        return None


def load_manifest(path: Path) -> dict | None:
    """The manifest of a finished token-shard directory (pretraining), or None."""
    return read_manifest(path, MANIFEST_VERSION, lambda s, itemsize: {s["shard"]: s["tokens"] * itemsize})


def prepare_dataset(config: TrainerConfig, tokenizer: TextTokenizer, digest: str, listing, stop=None) -> Path:
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
        meter = meter_for("preparing data", listing, config.data.sources)
        try:
            for i, src in enumerate(config.data.sources):
                sources.append(_prepare_source(i, src, listing[src.name], tokenizer, dtype, tmp / f"{src.name}.bin",
                                               stop, meter))
        finally:
            meter.close()
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
            for doc in iter_documents(src, f, read_bytes(f, source_label(i, src)), source_label(i, src)):
                texts.append(doc[:65536])
                seen += len(texts[-1])
            if seen >= per_source:
                break
    return texts


def _prepare_source(index, src, files, tokenizer: TextTokenizer, dtype, shard: Path, stop=None,
                    meter: PrepareMeter | None = None) -> dict:
    where = source_label(index, src)
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
            if meter is not None:
                meter.add(tokens=sum(len(x) + 1 for x in ids))
            batch, batch_bytes = [], 0

        for f, digest in files:
            if stop is not None and stop():
                raise StoppedBeforeTraining("SIGTERM while the data was being prepared; nothing to save")
            raw = read_bytes(f, where)
            records.append({"path": f.rel, "sha256": digest, "bytes": len(raw), "tokens": 0, "documents": 0})
            n_bytes += len(raw)
            if hashlib.sha256(raw).hexdigest() != digest:
                raise DataError(f"{where}: {f.rel} changed while it was being prepared")
            for doc in iter_documents(src, f, raw, where):
                batch.append((len(records) - 1, doc))
                batch_bytes += len(doc)
                if batch_bytes >= _BATCH_BYTES:
                    flush()
            if meter is not None:
                meter.add(files=1, size=len(raw))
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
