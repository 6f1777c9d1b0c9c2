"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of checkpoint.dir:

    step-00000500/            a complete checkpoint
      .metadata, __*.distcp   DCP: model and optimizer, one shard file per rank
      rng/rank-00000.pt       each rank's torch (and CUDA) RNG state
      trainer_state.json      TrainState: step, tokens, data-loader position, losses, digests, config, line,
                              the logged losses so far (log_history)
      model/                  config.json, generation_config.json and the tokenizer: the checkpoint
                              loads as a model on one process without the training (the evaluator)
    step-00001000.tmp/        a checkpoint being written (ignored, removed on the next save)
    latest                    the name of the newest complete checkpoint

All ranks write into `step-N.tmp/` (during the training, in the background: Checkpointer); once
every rank has, rank 0 writes trainer_state.json, renames the directory and finally replaces `latest`
(itself via a temporary file and rename). A kill at any moment leaves the previous checkpoint, and
`latest`, valid. DCP reshards on load, so a run may resume on another world size.
A checkpoint.dir that is an s3:// prefix keeps the same layout there (s3checkpoint.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from pydantic import BaseModel, ConfigDict, ValidationError
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..config import CheckpointConfig, S3Config, TrainerConfig
from ..contract import ConfigError, LastCheckpoint
from .budget import Timings
from .dist import Dist
from .storage import S3Url, is_s3, scratch_of

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_FILES = "model"
LATEST = "latest"
# Test hook: seconds to sleep after the shards are written, before the commit,
# so a test can kill the process mid-save deterministically.
SLEEP_ENV = "FORGE_TEST_SLEEP_IN_SAVE"

# "assuming the intent is to save in a single process": it is (a background save warns in its own thread)
warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process", category=UserWarning)


class TrainState(BaseModel):
    """Everything a checkpoint holds beside the weights, the optimizer and the RNG (trainer_state.json)."""

    model_config = ConfigDict(extra="ignore")  # a checkpoint of an older trainer still loads

    step: int
    tokens_seen: int = 0
    loader: dict = {}
    """The position of the method's batches (their state_dict)."""
    world_size: int = 1
    """Workers that wrote it (a run may resume on another number)."""
    train_loss: float | None = None
    val_loss: float | None = None
    """The last validation loss; it may be of an earlier step."""
    time: str | None = None
    data_digest: str | None = None
    tokenizer_digest: str | None = None
    config: dict = {}
    """The whole TrainerConfig of the run that wrote it."""
    origin: str | None = None
    """The checkpoint an explicit resume started this one's line from (None: a line from scratch)."""
    log_history: list[dict] = []
    """The run's curve up to this step, resumes included: {step, loss} at each logged step, {step, val_loss}
    at each evaluation (as Hugging Face Trainer's log_history); the export keeps it as training_log.jsonl."""
    gpu_seconds: float = 0.0
    """GPU-seconds the runs that led to this checkpoint used (this one and those it resumed from)."""

    def record(self, key: str, value: float) -> None:
        """Add ``key`` at this step to the log history (replacing one there: a resumed run evaluates again)."""
        self.log_history = [h for h in self.log_history if not (h["step"] == self.step and key in h)]
        self.log_history.append({"step": self.step, key: value})


def step_name(step: int) -> str:
    return f"step-{step:08d}"


REPLACED = ".replaced-"  # a checkpoint being replaced by a new save of the same step


def _committed_state(path: Path) -> TrainState | None:
    """The trainer state of a committed checkpoint (renamed from .tmp, with DCP metadata); else None."""
    if path.name.endswith(".tmp") or not path.is_dir():
        return None
    try:
        state = TrainState.model_validate_json((path / STATE_FILE).read_text())
    except (OSError, ValidationError):
        return None
    complete = (path / ".metadata").is_file() and path.name.removeprefix(REPLACED) == step_name(state.step)
    return state if complete else None


def is_complete(path: Path) -> bool:
    """A committed checkpoint: renamed from .tmp, with DCP metadata and trainer state."""
    return _committed_state(path) is not None


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix(REPLACED).removeprefix("step-"))


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one."""
    root = Path(ckpt_dir)
    try:
        named = root / (root / LATEST).read_text().strip()
        if is_complete(named):
            return named
    except OSError:
        pass
    if not root.is_dir():
        return None
    # a copy renamed aside counts too: a kill between the two renames of a replacing save leaves only it
    candidates = [p for p in (*root.glob("step-*"), *root.glob(REPLACED + "step-*")) if is_complete(p)]
    return max(candidates, key=lambda p: (_step_of(p), not p.name.startswith(REPLACED)), default=None)


def save(ckpt_dir: str | Path, model, optimizer, state: TrainState, keep_last: int, d: Dist,
         model_files: Callable[[Path], None] | None = None) -> LastCheckpoint:
    """Write a checkpoint of ``state.step`` on every rank; returns where it is, once committed. ``model_files``
    writes the model's config and tokenizer into the folder it is given (rank 0, before the commit)."""
    root, final, tmp = _paths(ckpt_dir, state.step)
    d.on_main(lambda: _prepare(root, tmp), f"preparing checkpoint {final.name}")
    _write_shards(tmp, model, optimizer, d)
    text = state.model_dump_json(indent=1)
    d.on_main(lambda: _commit(root, tmp, text, keep_last, state.origin, model_files),
              f"committing checkpoint {final.name}")
    return LastCheckpoint(step=state.step, path=str(final), time=state.time)


@dataclass
class PendingSave:
    """A checkpoint being written in the background; ``done`` completes once it is committed (rank 0) or
    this rank's part is written (the others), and raises what went wrong."""

    checkpoint: LastCheckpoint
    done: Future


def save_in_background(ckpt_dir: str | Path, model, optimizer, state: TrainState, keep_last: int, d: Dist,
                       writer: StagingWriter, model_files: Callable[[Path], None] | None = None) -> PendingSave:
    """Start a checkpoint of ``state.step`` on every rank and return once its state is staged: the model and
    the optimizer are copied into ``writer``'s host memory (``dcp.async_save``), then written from there by
    a thread while the training goes on. The commit (rank 0: trainer state, rename, ``latest``, pruning)
    follows in that thread once every rank's shards are written (DCP's last collective, in which rank 0
    writes the metadata, ends only then). Until the commit the checkpoint is a ``.tmp`` folder, so a kill
    leaves the previous one, and ``latest``, valid. One at a time: the caller waits for ``done`` first."""
    root, final, tmp = _paths(ckpt_dir, state.step)
    d.on_main(lambda: _prepare(root, tmp), f"preparing checkpoint {final.name}")
    t0 = time.monotonic()
    text = state.model_dump_json(indent=1)  # the loop goes on changing ``state``
    _write_rng(tmp, d)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    written = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), storage_writer=writer,
                             process_group=d.checkpoint_group)
    written = getattr(written, "upload_completion", written)  # an AsyncSaveResponse on some versions

    def finish() -> None:
        written.result()
        _sleep_in_save()
        if d.is_main:
            _commit(root, tmp, text, keep_last, state.origin, model_files)
            log.info("checkpoint %s written in the background (%.1fs)", final, time.monotonic() - t0)

    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forge-checkpoint")
    done = thread.submit(finish)
    thread.shutdown(wait=False)
    return PendingSave(LastCheckpoint(step=state.step, path=str(final), time=state.time), done)


class StagingWriter(FileSystemWriter):
    """DCP's file writer, whose staging (the copy a background save writes from, taken before the training
    goes on) lands in host memory kept from one save to the next: pinned on CUDA, so that the copy from
    the GPU is fast, and a copy on the host as well (the optimizer updates the weights in place)."""

    def __init__(self, pin_memory: bool):
        super().__init__(".")  # each save names its folder (checkpoint_id)
        self._pin_memory, self._staged = pin_memory, None

    def stage(self, state_dict):
        self.per_thread_copy_ahead = 0  # as FileSystemWriter.stage: what it writes is on the host already
        if self._staged is None:
            self._staged = _create_cpu_state_dict(state_dict, pin_memory=self._pin_memory)
        return _copy_state_dict(state_dict, self._staged)


def _paths(ckpt_dir: str | Path, step: int) -> tuple[Path, Path, Path]:
    """The checkpoint folder, and a checkpoint's folder and the temporary one it is written into."""
    root = Path(ckpt_dir)
    return root, root / step_name(step), root / (step_name(step) + ".tmp")


def _prepare(root: Path, tmp: Path) -> None:
    """Rank 0, before a save: remove what a killed save left, and make the temporary folder."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in root.glob(REPLACED + "step-*"):  # a replacing save that was killed half-way
        original = root / aside.name.removeprefix(REPLACED)
        if is_complete(original):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            shutil.rmtree(original, ignore_errors=True)
            os.rename(aside, original)
    tmp.mkdir()


def _commit(root: Path, tmp: Path, state_json: str, keep_last: int, line: str | None,
            model_files: Callable[[Path], None] | None) -> None:
    """Rank 0, once every rank's shards are in ``tmp``: the trainer state, the rename, ``latest``, pruning."""
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if model_files is not None:
        model_files(tmp / MODEL_FILES)
    _write_atomic(tmp / STATE_FILE, state_json)
    # The same step saved again (a resumed run with other settings) replaces it, and a kill at
    # any moment leaves one complete copy: the old one is renamed out of the way, not deleted,
    # until the new one is in place.
    replaced = root / (REPLACED + final.name)
    if final.exists():
        os.rename(final, replaced)
    os.rename(tmp, final)
    _write_atomic(root / LATEST, final.name + "\n")
    _fsync_dir(root)
    shutil.rmtree(replaced, ignore_errors=True)
    _prune(root, keep_last, line)


def _write_shards(folder: Path, model, optimizer, d: Dist) -> None:
    """Every rank writes its DCP shards and its RNG state into ``folder``; returns when all have."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder), process_group=d.checkpoint_group)
    _write_rng(folder, d)
    _sleep_in_save()
    d.barrier(d.checkpoint_group)


def _write_rng(folder: Path, d: Dist) -> None:
    (folder / "rng").mkdir(exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / "rng" / f"rank-{d.rank:05d}.pt")


def _sleep_in_save() -> None:
    if os.environ.get(SLEEP_ENV):
        time.sleep(float(os.environ[SLEEP_ENV]))


def load(path: Path, model, optimizer, d: Dist) -> TrainState:
    """Restore model, optimizer and this rank's RNG from a checkpoint; returns its trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / "rng" / f"rank-{d.rank:05d}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than saved
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return TrainState.model_validate_json((path / STATE_FILE).read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def origin(path: Path) -> str | None:
    """The checkpoint an explicit resume started this one's line from (None: a line from scratch)."""
    state = _committed_state(path)
    return state.origin if state else None


def _prune(root: Path, keep_last: int, line: str | None) -> None:
    """Keep the newest keep_last checkpoints of this line. Checkpoints of another line (the run a
    resume from an earlier step went back from, or the checkpoint it resumed from) are left alone."""
    done = sorted(p for p in root.glob("step-*") if (state := _committed_state(p)) is not None
                  and state.origin == line)
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def retain_after_success(c: CheckpointConfig, s3: S3Config | None = None) -> list[Path | str]:
    """Once the model is exported, keep what ``c.retain_after_success`` says (All: every checkpoint kept
    so far; Last: the newest complete one; None: nothing, ``latest`` included). Rank 0 only. Returns the
    folders (or s3:// prefixes) deleted."""
    if is_s3(c.dir):
        from .s3checkpoint import S3Checkpoints

        return S3Checkpoints(c.dir, s3 or S3Config()).retain(c.retain_after_success)
    root = Path(c.dir)
    if c.retain_after_success == "All" or not root.is_dir():
        return []
    keep = find_latest(root) if c.retain_after_success == "Last" else None
    gone = [p for p in sorted((*root.glob("step-*"), *root.glob(REPLACED + "step-*"))) if p.is_dir() and p != keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    if keep is None:
        (root / LATEST).unlink(missing_ok=True)
    elif keep.name.startswith(REPLACED):  # the only copy left by a killed replacing save: give it its name
        os.rename(keep, root / keep.name.removeprefix(REPLACED))
        _write_atomic(root / LATEST, keep.name.removeprefix(REPLACED) + "\n")
    if gone:
        log.info("checkpoint.retain_after_success %s: deleted %d checkpoint(s) in %s", c.retain_after_success,
                 len(gone), root)
    return gone


def choose_resume(c: CheckpointConfig, s3: S3Config | None = None) -> tuple[Path | str | None, str | None]:
    """The checkpoint to resume from, and the line of checkpoints this run continues.

    An explicit ``checkpoint.resume`` starts a line from that checkpoint (going back to an earlier
    step, for instance); a restart of the same run continues the line from its newest checkpoint
    instead of going back again. Rank 0 chooses for every rank: a shared file system may show ranks
    different states for a moment. On S3 (``c.dir`` an s3:// URL) the checkpoint is its URL."""
    if c.resume == "never":
        return None, None
    if is_s3(c.dir):
        from .s3checkpoint import S3Checkpoints

        ckpts = S3Checkpoints(c.dir, s3 or S3Config())
        latest_url = ckpts.find_latest()
        latest = str(latest_url) if latest_url else None
        complete = lambda ref: ckpts.is_complete(S3Url.parse(ref))  # noqa: E731
        line_of = lambda ref: ckpts.origin(S3Url.parse(ref))  # noqa: E731
        path = str(S3Url.parse(c.resume))
    else:
        latest, complete, line_of, path = find_latest(c.dir), is_complete, origin, Path(c.resume)
    if c.resume == "auto":
        return latest, (line_of(latest) if latest else None)
    if not complete(path):
        raise ConfigError(f"checkpoint.resume {c.resume}: not a complete checkpoint")
    name = _name(path)
    if latest is not None and latest != path and line_of(latest) == name:
        return latest, name  # this run already went on from there
    return path, name


def _name(ref: Path | str) -> str:
    return ref.name if isinstance(ref, Path) else S3Url.parse(ref).name


def save_run(config: TrainerConfig, model, optimizer, state: TrainState, d: Dist,
             model_files: Callable[[Path], None] | None = None) -> LastCheckpoint:
    """Save a checkpoint where the configuration says: a folder, or an s3:// prefix."""
    c = config.checkpoint
    if is_s3(c.dir):
        from . import s3checkpoint

        return s3checkpoint.save(c, config.s3, scratch_of(config), model, optimizer, state, d, model_files)
    return save(c.dir, model, optimizer, state, c.keep_last, d, model_files)


def load_run(config: TrainerConfig, ref: Path | str, model, optimizer, d: Dist) -> TrainState:
    """Restore the checkpoint ``choose_resume`` chose (a folder, or an s3:// URL)."""
    if isinstance(ref, str) and is_s3(ref):
        from . import s3checkpoint

        return s3checkpoint.download_and_load(ref, config.s3, scratch_of(config), model, optimizer, d)
    return load(Path(ref), model, optimizer, d)


class Checkpointer:
    """A run's checkpoints, one at a time. Into a folder they are written in the background
    (``save_in_background``): the training waits only while the state is copied to host memory. On S3,
    and for the last checkpoint of a run (the end, SIGTERM), they are written before ``save`` returns.

    ``last`` is the newest committed checkpoint (on rank 0 it changes when a background save commits);
    ``timings.save`` gets how long the last save took from its start to its commit."""

    def __init__(self, config: TrainerConfig, d: Dist, last: LastCheckpoint | None = None,
                 timings: Timings | None = None):
        self.config, self.d, self.last, self.timings = config, d, last, timings or Timings()
        # On S3 the first process of each node uploads its node's files once every rank of the node has
        # written them: a second collective the background thread would need; those saves stay in front.
        # With a process group the background needs a gloo group of its own (Dist.checkpoint_group).
        self.background = not is_s3(config.checkpoint.dir) and (
            d.checkpoint_group is not None or not torch.distributed.is_initialized())
        self._pending: PendingSave | None = None
        self._writer: StagingWriter | None = None

    @property
    def step(self) -> int | None:
        """The step of the newest checkpoint, committed or being written (None: none yet)."""
        newest = self._pending.checkpoint if self._pending is not None else self.last
        return newest.step if newest is not None else None

    def save(self, model, optimizer, state: TrainState, model_files: Callable[[Path], None] | None = None,
             final: bool = False) -> None:
        """Checkpoint ``state.step`` (every rank); after the one being written is committed. ``final``
        (the run's last): written before it returns."""
        self.wait()
        t0 = time.monotonic()
        if final or not self.background:
            self.last = save_run(self.config, model, optimizer, state, self.d, model_files)
            self.timings.save = time.monotonic() - t0
            return
        if self._writer is None:
            self._writer = StagingWriter(pin_memory=self.d.device.type == "cuda")
        c = self.config.checkpoint
        pending = save_in_background(c.dir, model, optimizer, state, c.keep_last, self.d, self._writer, model_files)

        def committed(done: Future) -> None:
            if done.exception() is None:
                self.timings.save = time.monotonic() - t0
                if self.d.is_main:
                    self.last = pending.checkpoint

        pending.done.add_done_callback(committed)
        self._pending = pending

    def wait(self) -> LastCheckpoint | None:
        """Wait (every rank together) until the checkpoint being written is committed; returns the newest.
        A background save that failed on any rank fails every rank here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self.d.on_every_rank(pending.done.result, f"writing checkpoint {Path(pending.checkpoint.path).name}")
            self.last = pending.checkpoint
        return self.last

    def abandon(self, timeout: float) -> None:
        """After an error: give a checkpoint being written ``timeout`` seconds to finish (no collective: the
        other ranks may be gone), so that the process group is not destroyed under it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.done.result(timeout=timeout)
            except Exception as e:  # noqa: BLE001 - the run already fails with its own error
                log.warning("checkpoint %s being written when the run failed: %s", pending.checkpoint.path, e)
