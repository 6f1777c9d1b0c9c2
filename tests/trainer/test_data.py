"""Data preparation and loading: manifest, shards, cache, formats, mixing, resumable sharded loader."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from trainer_helpers import tiny_config, write_corpus

from forge_trainer.contract import DataError
from forge_trainer.data.packed import TokenData, TrainLoader
from forge_trainer.data.prepare import ensure_tokenizer, load_manifest, prepare_dataset
from forge_trainer.data.sources import data_digest


def _prepare(cfg):
    digest, listing = data_digest(cfg.data)
    tok = ensure_tokenizer(cfg, digest, listing)
    return tok, prepare_dataset(cfg, tok, digest, listing)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
    work = tmp_path_factory.mktemp("data")
    cfg = tiny_config(work, corpus)
    tok, path = _prepare(cfg)
    return cfg, tok, path


def test_manifest_digests_and_counts_match_the_files(prepared, corpus):
    cfg, tok, path = prepared
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["tokenizer_digest"] == tok.digest and manifest["encoder"] == "tiktoken"
    (source,) = manifest["sources"]
    files = {f["path"]: f for f in source["files"]}
    assert set(files) == {p.name for p in corpus.glob("*.txt")}
    for rel, f in files.items():
        raw = (corpus / rel).read_bytes()
        assert f["sha256"] == hashlib.sha256(raw).hexdigest()
        assert f["bytes"] == len(raw) and f["documents"] == 1
    assert sum(f["tokens"] for f in files.values()) == source["tokens"]
    assert (path / source["shard"]).stat().st_size == source["tokens"] * np.dtype(manifest["dtype"]).itemsize


def test_shard_decodes_back_to_the_documents_separated_by_eos(prepared, corpus):
    cfg, tok, path = prepared
    manifest = json.loads((path / "manifest.json").read_text())
    (source,) = manifest["sources"]
    stream = np.fromfile(path / source["shard"], dtype=manifest["dtype"])
    offset = 0
    for f in source["files"]:
        ids = stream[offset : offset + f["tokens"]].tolist()
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        assert tok.tok.decode(ids[:-1]) == (corpus / f["path"]).read_text()
        offset += f["tokens"]
    assert offset == len(stream)


def test_prepared_data_is_reused_and_keyed_by_content(prepared, tmp_path):
    cfg, tok, path = prepared
    before = (path / "manifest.json").stat().st_mtime_ns
    assert _prepare(cfg)[1] == path
    assert (path / "manifest.json").stat().st_mtime_ns == before
    changed = write_corpus(tmp_path / "toy", files=40, seed=1)
    other = tiny_config(tmp_path, changed, cache_dir=cfg.cache_dir)
    assert _prepare(other)[1] != path


def test_a_manifest_only_appears_with_complete_shards(prepared):
    cfg, tok, path = prepared
    assert load_manifest(path) is not None
    shard = path / "toy.bin"
    data = shard.read_bytes()
    try:
        shard.write_bytes(data[:-2])  # a truncated shard is not a prepared dataset
        assert load_manifest(path) is None
    finally:
        shard.write_bytes(data)
    assert not list(path.parent.glob(".*.tmp"))


def test_jsonl_and_parquet_sources_read_the_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"record number {i} says hello to record {i + 1}." for i in range(200)]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("\n".join(json.dumps({"body": r, "id": i}) for i, r in enumerate(rows)) + "\n\n")
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"body": rows, "id": list(range(200))}), tmp_path / "p" / "a.parquet")
    cfg = tiny_config(tmp_path, tmp_path, **{
        "data__sources": [
            {"name": "j", "path": str(tmp_path / "j"), "format": "jsonl", "text_field": "body"},
            {"name": "p", "path": str(tmp_path / "p"), "format": "parquet", "text_field": "body"},
        ],
        "tokenizer__train__vocab_size": 280,
    })
    tok, path = _prepare(cfg)
    manifest = json.loads((path / "manifest.json").read_text())
    counts = {s["name"]: (s["documents"], s["tokens"]) for s in manifest["sources"]}
    assert counts["j"] == counts["p"] and counts["j"][0] == 200
    expected = sum(len(ids) + 1 for ids in tok.encode_batch(rows))
    assert counts["j"][1] == expected


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_unreadable_records_are_data_errors_naming_the_file(tmp_path, fmt):
    (tmp_path / "d").mkdir()
    if fmt == "jsonl":
        (tmp_path / "d" / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
        message = r"bad.jsonl line 2: invalid JSON"
    else:
        (tmp_path / "d" / "bad.parquet").write_bytes(b"PAR1 this is not a parquet file")
        message = r"cannot read bad.parquet as parquet"
    cfg = tiny_config(tmp_path, tmp_path, data__sources=[{"name": "d", "path": str(tmp_path / "d"), "format": fmt}])
    with pytest.raises(DataError, match=message):
        _prepare(cfg)


def test_loader_is_deterministic_and_resumes_exactly(prepared):
    cfg, _, path = prepared
    data = TokenData(path, cfg)
    a = TrainLoader(data, seed=7)
    first = [a.next_step(16, 0, 1) for _ in range(5)]
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    rest = [a.next_step(16, 0, 1) for _ in range(50)]  # crosses an epoch boundary
    b = TrainLoader(data, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(first, [b.next_step(16, 0, 1) for _ in range(5)]))
    c = TrainLoader(data, seed=7)
    c.load_state_dict(state)
    assert all(np.array_equal(x, y) for x, y in zip(rest, [c.next_step(16, 0, 1) for _ in range(50)]))
    assert data.train[0][1] < 55 * 16  # the test really wrapped around the epoch
    other = TrainLoader(data, seed=8).next_step(16, 0, 1)
    assert not np.array_equal(first[0], other)


def test_ranks_split_each_global_batch_without_overlap(prepared):
    cfg, _, path = prepared
    data = TokenData(path, cfg)
    single, r0, r1 = TrainLoader(data, 3), TrainLoader(data, 3), TrainLoader(data, 3)
    for _ in range(3):
        whole = single.next_step(16, 0, 1)
        assert np.array_equal(np.concatenate([r0.next_step(16, 0, 2), r1.next_step(16, 1, 2)]), whole)
    assert r0.state_dict() == r1.state_dict() == single.state_dict()


def test_windows_are_packed_sequences_and_validation_is_held_out(prepared):
    cfg, tok, path = prepared
    data = TokenData(path, cfg)
    stream, windows = data.train[0]
    n_train = windows * cfg.training.seq_len + 1
    val_stream, val_start, val_windows = data.val[0]
    assert val_start >= n_train - 1 and val_windows >= 1
    batch = TrainLoader(data, 0).next_step(16, 0, 1)
    assert batch.shape == (16, cfg.training.seq_len + 1)
    starts = {bytes(np.asarray(stream[i * 64 : i * 64 + 65], dtype=np.int64)) for i in range(windows)}
    assert all(bytes(row) in starts for row in batch)
    assert (batch == tok.eos_id).any()  # documents are packed across boundaries


def test_sources_are_mixed_by_weight(tmp_path, corpus):
    other = write_corpus(tmp_path / "other", files=10, seed=5)
    cfg = tiny_config(tmp_path, corpus, data__sources=[
        {"name": "a", "path": str(corpus), "weight": 3},
        {"name": "b", "path": str(other), "weight": 1},
    ])
    _, path = _prepare(cfg)
    loader = TrainLoader(TokenData(path, cfg), 0)
    for _ in range(10):
        loader.next_step(16, 0, 1)
    taken = loader.state_dict()["taken"]
    assert taken == {"a": 120, "b": 40}


def test_validation_source_is_not_trained_on(tmp_path, corpus):
    other = write_corpus(tmp_path / "held", files=5, seed=9)
    cfg = tiny_config(tmp_path, corpus, data__sources=[
        {"name": "train", "path": str(corpus)}, {"name": "held", "path": str(other)},
    ], data__validation={"source": "held"})
    _, path = _prepare(cfg)
    data = TokenData(path, cfg)
    assert data.names == ["train"] and data.val_windows > 0


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty", r"data.sources\[0\].path .*/d: no files match \*\*/\*.txt"),
        ("missing", r"data.sources\[0\].path .*/nope: does not exist"),
        ("broken-link", r"cannot read gone.txt: No such file or directory"),
        ("no-text", r"data.sources: the matching files hold no text"),
    ],
)
def test_bad_data_directories_are_data_errors(tmp_path, setup, message):
    d = tmp_path / "d"
    d.mkdir()
    path = d
    if setup == "missing":
        path = tmp_path / "nope"
    elif setup == "broken-link":
        (d / "ok.txt").write_text("fine text " * 100)
        os.symlink(tmp_path / "does-not-exist", d / "gone.txt")
    elif setup == "no-text":
        (d / "a.txt").write_text("")
    cfg = tiny_config(tmp_path, path, tokenizer__train__vocab_size=260)
    with pytest.raises(DataError, match=message):
        _prepare(cfg)
        TokenData(_prepare(cfg)[1], cfg)
    assert not list((Path(cfg.cache_dir) / "tokens").glob("*/manifest.json"))


def test_include_and_exclude_patterns(tmp_path):
    from forge_trainer.config import DataSourceConfig
    from forge_trainer.data.sources import discover

    for rel in ["a.py", "pkg/b.py", "pkg/tests/c.py", "site-packages/x/d.py", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    source = DataSourceConfig(name="s", path=str(tmp_path), include=["**/*.py"], exclude=["site-packages/**", "**/tests/*"])
    assert sorted(f.rel for f in discover(source, 0)) == ["a.py", "pkg/b.py"]
    top = DataSourceConfig(name="s", path=str(tmp_path), include=["*.py"])
    assert [f.rel for f in discover(top, 0)] == ["a.py"]


def test_data_preparation_shows_files_bytes_and_tokens(tmp_path, caplog):
    """A bar on a terminal, a log line now and then in a pod: files, bytes and tokens done of the total."""
    import io
    import logging

    from forge_trainer.data.meter import PrepareMeter

    out = io.StringIO()
    bar = PrepareMeter("preparing data", files=3, total_bytes=3000, stream=out, bar=True)
    for _ in range(3):
        bar.add(files=1, size=1000, tokens=250)
    bar._bar.refresh()
    shown = out.getvalue()
    bar.close()
    assert "preparing data" in shown and "files=3/3" in shown and "tokens=750" in shown

    with caplog.at_level(logging.INFO, logger="forge.trainer"):
        logged = PrepareMeter("preparing records", files=2, total_bytes=2_000_000, stream=io.StringIO(), bar=False,
                              log_seconds=0.0)
        logged.add(files=1, size=1_000_000, tokens=12345)
    assert "preparing records: 1/2 files, 1.0 of 2.0 MB (50%), 12,345 tokens" in caplog.text
