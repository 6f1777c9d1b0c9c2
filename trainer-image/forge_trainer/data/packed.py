"""Packed pretraining data: the prepared token streams cut into windows, mixed by weight and
sharded over ranks, plus the validation windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import TrainerConfig, TrainingConfig
from ..contract import DataError
from .prepare import load_manifest


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

    def train_rows(self, s: int) -> int:
        """Training windows of source s (what TrainLoader draws from)."""
        return self.train[s][1]

    def train_row(self, s: int, i: int) -> np.ndarray:
        off = i * self.seq_len
        return np.asarray(self.train[s][0][off : off + self.seq_len + 1], dtype=np.int64)

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

    It reads ``data.names``, ``data.weights``, ``data.train_rows(s)`` and ``data.train_row(s, i)``:
    pretraining's TokenData, or sft's packed records (data.records.RecordData).

    Sample g of the run comes from the source whose share is furthest behind its
    weight (smooth weighted round robin); each source walks a fresh seeded
    permutation of its windows every epoch. Every rank advances the same global
    state and reads only its own slice of each step's global batch, so the
    state is one small dict that does not depend on the world size: a run can
    resume on a different number of workers and see the same data.
    """

    def __init__(self, data, seed: int):
        self.data = data
        self.seed = seed
        self.consumed = 0
        self.taken = [0] * len(data.names)
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
        windows = self.data.train_rows(s)
        epoch, pos = divmod(k, windows)
        cached = self._perm_cache.get(s)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, s, epoch])
            perm = rng.permutation(windows).astype(np.int64 if windows >= 2**31 else np.int32)
            self._perm_cache[s] = cached = (epoch, perm)
        return self.data.train_row(s, int(cached[1][pos]))

    def _next_source(self) -> int:
        g = self.consumed + 1
        deficits = [w * g - t for w, t in zip(self.data.weights, self.taken)]
        return max(range(len(deficits)), key=deficits.__getitem__)

    def next_step(self, global_batch: int, rank: int, world: int) -> np.ndarray:
        """This rank's windows of the next global batch: int64 array [global_batch / world, ...] (a window
        is [seq_len + 1] tokens in pretraining, [3, seq_len] for packed records)."""
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


def validation_indices(data: TokenData, t: TrainingConfig) -> list[int]:
    """The validation windows of one pass: eval_batches x micro_batch_sequences of them in all, spread
    evenly over the whole validation split (so over every source, in proportion to its size); the
    same on any world size."""
    n, total = t.eval_batches * t.micro_batch_sequences, data.val_windows
    if total <= n:
        return list(range(total))
    return [i * total // n for i in range(n)]


def document_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids of packed windows [batch, T] that restart at 0 after every end-of-text token (which
    ends the document before it). Given these without an attention mask, transformers finds the packed
    documents (where the position does not go up by one) and masks attention between them, as it does
    for sft's packed examples; the rotary embedding sees each document from position 0, as if alone."""
    index = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[..., 1:] = ids[..., :-1] == eos_id
    return index - torch.where(starts, index, 0).cummax(dim=-1).values
