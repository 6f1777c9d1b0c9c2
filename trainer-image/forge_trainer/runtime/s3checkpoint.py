"""Checkpoints on an S3-compatible store: the layout of checkpoint.py, under an s3:// prefix.

    <prefix>/step-00000500/.metadata, __*.distcp, rng/rank-*.pt    uploaded first (with model/: config, tokenizer)
    <prefix>/step-00000500/trainer_state.json                       the commit: written last
    <prefix>/latest                                                 then the name of the newest

Every rank writes its shards into node-local staging (under the scratch folder) and the first process
of each node uploads that node's files; rank 0 then writes ``trainer_state.json``, which makes the
checkpoint complete, and ``latest``. A kill at any moment leaves the previous checkpoint, and ``latest``,
valid: a checkpoint without its trainer state is not one. Saving a step that exists again first removes
its trainer state (the old copy stops being complete before any of its objects is overwritten).
Resuming downloads the checkpoint into staging on each node and loads it from there.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from ..config import CheckpointConfig, S3Config
from ..contract import LastCheckpoint
from .checkpoint import LATEST, MODEL_FILES, STATE_FILE, TrainState, _write_shards, load, step_name
from .dist import Dist
from .storage import S3Store, S3Url

FIELD = "checkpoint.dir"


class S3Checkpoints:
    """The checkpoints under one s3:// prefix."""

    def __init__(self, location: str, settings: S3Config, field: str = FIELD):
        self.root = S3Url.parse(location)
        self.store = S3Store(settings, field, location)

    def committed_state(self, url: S3Url) -> TrainState | None:
        text = self.store.read_text(url.child(STATE_FILE))
        if text is None:
            return None
        try:
            state = TrainState.model_validate_json(text)
        except ValidationError:
            return None
        complete = url.name == step_name(state.step) and self.store.head(url.child(".metadata")) is not None
        return state if complete else None

    def is_complete(self, url: S3Url) -> bool:
        return self.committed_state(url) is not None

    def origin(self, url: S3Url) -> str | None:
        state = self.committed_state(url)
        return state.origin if state else None

    def committed(self) -> dict[S3Url, TrainState]:
        """Every complete checkpoint, by its prefix."""
        out = {}
        for obj in self.store.list(self.root):
            rel = obj["Key"][len(self.root.key) + 1 if self.root.key else 0:]
            name, _, rest = rel.partition("/")
            if rest == STATE_FILE and name.startswith("step-"):
                url = self.root.child(name)
                if (state := self.committed_state(url)) is not None:
                    out[url] = state
        return out

    def find_latest(self) -> S3Url | None:
        """The checkpoint ``latest`` names if it is complete, else the newest complete one."""
        named = (self.store.read_text(self.root.child(LATEST)) or "").strip()
        if named and self.is_complete(self.root.child(named)):
            return self.root.child(named)
        return max(self.committed(), key=lambda u: u.name, default=None)

    def prune(self, keep_last: int, line: str | None) -> None:
        """Keep the newest keep_last checkpoints of this line (as checkpoint._prune does locally)."""
        done = sorted((u for u, state in self.committed().items() if state.origin == line), key=lambda u: u.name)
        for old in done[:-keep_last]:
            self.store.delete(old, [old.child(STATE_FILE).key])  # no longer complete, then gone
            self.store.delete_tree(old)

    def retain(self, mode: str) -> list[str]:
        """After the export: keep every checkpoint (All), the newest complete one (Last) or none, ``latest``
        included (None), as checkpoint.retain_after_success does locally. Returns the prefixes deleted."""
        if mode == "All":
            return []
        keep = self.find_latest() if mode == "Last" else None
        names = {o["Key"][len(self.root.key) + 1 if self.root.key else 0:].partition("/")[0]
                 for o in self.store.list(self.root)}
        gone = sorted((self.root.child(n) for n in names if n.startswith("step-") and self.root.child(n) != keep), key=str)
        for url in gone:
            self.store.delete(url, [url.child(STATE_FILE).key])  # no longer complete, then gone
            self.store.delete_tree(url)
        if keep is None:
            self.store.delete(self.root, [self.root.child(LATEST).key])
        return [str(u) for u in gone]

    def uncommit(self, url: S3Url) -> None:
        """Before ``url`` is written: its trainer state goes first, and leftovers of a save that was killed
        half-way (a step prefix without trainer state) go too."""
        self.store.delete(url, [url.child(STATE_FILE).key])
        leftovers = {}
        for obj in self.store.list(self.root):
            rel = obj["Key"][len(self.root.key) + 1 if self.root.key else 0:]
            name = rel.partition("/")[0]
            if name.startswith("step-") and "/" in rel:
                leftovers.setdefault(name, []).append(obj["Key"])
        for name, keys in leftovers.items():
            if not any(k.endswith("/" + STATE_FILE) for k in keys):
                self.store.delete(self.root, keys)


def _staging(scratch: Path, name: str) -> Path:
    return scratch / "checkpoints" / name


def save(c: CheckpointConfig, settings: S3Config, scratch: Path, model, optimizer, state: TrainState,
         d: Dist, model_files: Callable[[Path], None] | None = None) -> LastCheckpoint:
    """Write a checkpoint of ``state.step`` to the s3:// prefix ``c.dir``, on every rank; returns where it is.
    ``model_files`` writes the model's config and tokenizer into the folder it is given (rank 0)."""
    ckpts = S3Checkpoints(c.dir, settings)
    final = ckpts.root.child(step_name(state.step))
    local = _staging(scratch, final.name)

    def clear_staging() -> None:
        if d.local_rank == 0:
            shutil.rmtree(local.parent, ignore_errors=True)
            local.mkdir(parents=True)

    d.on_main(lambda: ckpts.uncommit(final), f"preparing checkpoint {final}")
    d.on_every_rank(clear_staging, "preparing the checkpoint's staging folder")
    _write_shards(local, model, optimizer, d)
    if d.is_main and model_files is not None:  # uploaded with rank 0's node's shards, before the commit
        model_files(local / MODEL_FILES)
    d.on_every_rank(lambda: ckpts.store.upload_tree(local, final) if d.local_rank == 0 else None,
                    f"uploading checkpoint {final}")

    def commit() -> None:
        ckpts.store.write_text(final.child(STATE_FILE), state.model_dump_json(indent=1))
        ckpts.store.write_text(ckpts.root.child(LATEST), final.name + "\n")
        ckpts.prune(c.keep_last, state.origin)

    d.on_main(commit, f"committing checkpoint {final}")
    if d.local_rank == 0:
        shutil.rmtree(local, ignore_errors=True)
    return LastCheckpoint(step=state.step, path=str(final), time=state.time)


def download_and_load(location: str, settings: S3Config, scratch: Path, model, optimizer, d: Dist) -> TrainState:
    """Restore a checkpoint of the store: the first process of each node downloads it, every rank loads it."""
    url = S3Url.parse(location)
    local = _staging(scratch, url.name)

    def download() -> None:
        if d.local_rank == 0:
            shutil.rmtree(local.parent, ignore_errors=True)
            S3Store(settings, FIELD, location).mirror(url, local)

    d.on_every_rank(download, f"downloading checkpoint {url}")
    try:
        return load(local, model, optimizer, d)
    finally:
        d.barrier()
        if d.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
