"""The training loop: set-up -> resume -> step -> report -> checkpoint -> export.

One process or many under torchrun (FSDP2, gloo on CPU, NCCL on CUDA): the same code. The loop knows
no training method: the method (methods/) prepares its data, serves its batches and computes its
loss. Read `run()` top to bottom; the helpers below it follow in the order it calls them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import PretrainedConfig

from . import defaults
from .config import BudgetConfig, TrainerConfig
from .contract import ConfigError, ExitCode, LastCheckpoint, Progress, TerminationMessage, rfc3339
from .methods import Batches, Dataset, Method, build_method
from .models import fp8
from .models.build import build_model, check_model, compiles, describe, hf_config, missing_compiler, preflight
from .models.lora import LoraExport, trainable_parameters
from .models.stats import ModelStats, peak_flops
from .runtime import checkpoint
from .runtime.budget import Timings, budget_reached, total_steps
from .runtime import storage
from .runtime.checkpoint import TrainState, choose_resume
from .runtime.dist import SLOW_TIMEOUT, STEP_TIMEOUT, TEARDOWN_TIMEOUT, Dist, init_distributed, shutdown
from .runtime.egress import egress_locked, policy_of
from .runtime.garbage import GarbageCollection
from .runtime.export import export, write_model_files
from .runtime.optim import build_optimizer, lr_at, set_lr
from .runtime.progress import Reporter, build_progress
from .provenance import RECORD_FILE, ProvenanceError, load_private_key
from .runtime.provenance import build_provenance
from .runtime.signals import SigtermFlag, on_every_rank, sigterm_caught

log = logging.getLogger("forge_trainer")


@dataclass
class RunSummary:
    status: str  # "completed" | "preempted"
    reason: str  # max_steps | max_tokens | deadline | sigterm
    step: int
    tokens_seen: int
    train_loss: float | None
    val_loss: float | None
    output_dir: str | None
    checkpoint: str | None
    started_at: str
    ended_at: str
    total_steps: int | None = None
    last_checkpoint: LastCheckpoint | None = None  # as in the progress report
    start_step: int = 0  # the step this run resumed at; == step when there was nothing left to train
    history: list[dict] = field(default_factory=list, repr=False)  # per logged step: step, loss, aux_loss, lr, ...

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.PREEMPTED if self.status == "preempted" else ExitCode.OK

    def to_message(self) -> TerminationMessage:
        """The termination message: this summary, with the progress report's step, totalSteps,
        tokensSeen and lastCheckpoint (every key present, null where unknown)."""
        return TerminationMessage(
            status=self.status, reason=self.reason, step=self.step, total_steps=self.total_steps,
            tokens_seen=self.tokens_seen, train_loss=self.train_loss, val_loss=self.val_loss,
            output_dir=self.output_dir, checkpoint=self.checkpoint, last_checkpoint=self.last_checkpoint,
            started_at=self.started_at, ended_at=self.ended_at, exit_code=self.exit_code,
        )


@dataclass
class Setup:
    """What the set-up built once, before the first step."""

    config: TrainerConfig  # the run's, with s3:// inputs replaced by their local copies
    method: Method
    dataset: Dataset
    hf_cfg: PretrainedConfig
    stats: ModelStats
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: Batches
    accum: int  # micro-batches per optimizer step on each rank
    tokens_per_step: int
    budget: BudgetConfig
    total_steps: int | None  # where max_steps or max_tokens end the run; None: only a deadline does
    autocast: contextlib.AbstractContextManager
    peak_flops: float | None  # of one device, for MFU
    signing_key: object = None  # rank 0's Ed25519 key for provenance.json (provenance.signing_key)
    gpus: int = 0  # GPUs this run uses (0 on CPU), for the GPU-hours
    gpu_seconds_before: float = 0.0  # of the runs before this one, as the checkpoint it resumed from says
    clock: float = field(default_factory=time.monotonic)  # when the set-up began

    def gpu_seconds(self) -> float:
        """GPU-seconds of the runs that led here, this one's so far included."""
        return self.gpu_seconds_before + self.gpus * (time.monotonic() - self.clock)


def run(config: TrainerConfig, on_progress=None, stop: SigtermFlag | None = None) -> RunSummary:
    """Train (or resume) as configured; returns when a budget is reached or SIGTERM arrives.

    ``on_progress`` receives rank 0's Progress reports. ``stop`` is the caller's SIGTERM flag, already
    installed, when SIGTERM must stay caught after ``run`` returns (the worker process still writes
    its termination message); by default ``run`` catches SIGTERM only while it runs."""
    started = datetime.now(timezone.utc)
    with sigterm_caught(stop) as stop, egress_locked(policy_of(config)):
        d = init_distributed()
        reporter = saves = None
        collector = GarbageCollection(config.training.gc_interval_steps)
        try:
            s = _set_up(_local_inputs(config, d), d, stop)
            state, resumed_from, last_ckpt = _resume(config, s, d)
            if d.is_main:
                reporter = Reporter(on_progress, config.metrics.port)
            t, every = config.training, config.checkpoint.interval_steps
            timings, window, history = Timings(), LogWindow(), []
            saves = checkpoint.Checkpointer(config, d, last_ckpt, timings)
            start_step = state.step
            # A checkpoint's val_loss may predate its step (evaluated earlier, or not at all): evaluate
            # again at the end, also when a finished training is resumed with nothing left to train.
            val_step = -1
            lr, gnorm, tps, extra = lr_at(state.step, t, s.total_steps), None, None, {}
            last_save = last_report = time.monotonic()
            on_every_rank(d, lambda: None, stop)  # last look before the loop; from here: step, checkpoint, 75
            collector.start()  # no automatic collection inside a step from here: every N steps, between two
            while True:
                reason, save_by_time = _stop_or_save(config, state.step, s.total_steps, timings, last_save, stop, d)
                if reason is not None:
                    break

                t0 = time.monotonic()
                lr = lr_at(state.step, t, s.total_steps)
                set_lr(s.optimizer, lr)
                rows = s.batches.next_step(t.global_batch_sequences, d.rank, d.world)
                # queued on the device: nothing is read back from it until the log line (window.close)
                loss, aux, grad_norm = train_step(s.model, s.optimizer, s.method, rows, s.accum,
                                                  t.micro_batch_sequences, t.grad_clip, s.autocast, d)
                state.step += 1
                state.tokens_seen += s.tokens_per_step
                window.add(loss, s.tokens_per_step)
                collector.step(state.step)  # while the device runs the step
                if state.step == start_step + 1:
                    d.synchronize()
                    timings.step = time.monotonic() - t0  # the first step, until a log window measures more
                    d.set_timeout(STEP_TIMEOUT)  # set-up is over: a hung rank now fails the others within minutes

                if state.step % t.log_interval_steps == 0 or state.step == s.total_steps:
                    state.train_loss, tps, step_seconds = window.close(d)
                    timings.step = step_seconds
                    state.record("loss", state.train_loss)
                    gnorm = grad_norm.item() if grad_norm is not None else None
                    extra = s.method.step_metrics(d)  # dpo: reward accuracy, margin, log-probs
                    history.append({"step": state.step, "loss": state.train_loss, "lr": lr, "grad_norm": gnorm,
                                    "tokens_per_second": tps, **({"aux_loss": aux.item()} if aux is not None else {}),
                                    **extra})
                    if d.is_main:
                        _log_step(_progress(s, state, saves.last, d, state.train_loss, lr, gnorm, tps, extra), extra)
                if t.eval_interval_steps and state.step % t.eval_interval_steps == 0:
                    _evaluate(s, state, d, timings, f"step {state.step} |")
                    val_step = state.step
                if (every and state.step % every == 0) or save_by_time:
                    _save(saves, s, state, d)
                    last_save = time.monotonic()
                if reporter is not None and time.monotonic() - last_report >= config.metrics.progress_interval_seconds:
                    current = state.train_loss if state.train_loss is not None else loss.item()
                    reporter.report(_progress(s, state, saves.last, d, current, lr, gnorm, tps, extra))
                    last_report = time.monotonic()

            collector.stop()
            # ---- end: checkpoint, and on a completed budget: evaluate and export
            preempted = reason == "sigterm"
            if preempted and d.is_main:
                log.info("SIGTERM: writing a checkpoint at step %d", state.step)
            if not preempted and val_step != state.step:
                _evaluate(s, state, d, None, "final")
            if saves.step != state.step:  # never the same step twice: a SIGTERM right after a save has it already
                _save(saves, s, state, d, final=True)  # written before going on (within the grace period)
            last_ckpt = saves.wait()
            output_dir = None if preempted else _export(config, s, state, d, reason, started, resumed_from)
            summary = RunSummary(
                status="preempted" if preempted else "completed", reason=reason, step=state.step,
                tokens_seen=state.tokens_seen, train_loss=state.train_loss, val_loss=state.val_loss,
                output_dir=output_dir, checkpoint=last_ckpt.path, started_at=rfc3339(started),
                ended_at=rfc3339(), total_steps=s.total_steps, last_checkpoint=last_ckpt,
                start_step=start_step, history=history,
            )
            if reporter is not None:
                reporter.report(_progress(s, state, last_ckpt, d, state.train_loss, lr, gnorm, tps, extra))
            return summary
        finally:
            collector.stop()
            if reporter is not None:
                reporter.close()
            if saves is not None:
                saves.abandon(TEARDOWN_TIMEOUT.total_seconds())
            shutdown(d, sys.exc_info()[1])


class LogWindow:
    """The training loss and throughput over the steps since the last log line."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []  # one per step, on the device: no device sync until the window closes
        self.tokens = 0
        self.start = time.monotonic()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    def close(self, d: Dist) -> tuple[float, float, float]:
        """The mean loss over the window and all ranks (a collective), tokens per second, and seconds per
        step; starts a new window. Reading the loss waits for the window's steps to finish on the device,
        so the time is theirs, not only the host's."""
        loss = d.sum([torch.stack(self.losses).mean().item()])[0] / d.world
        now = time.monotonic()
        elapsed = max(now - self.start, 1e-9)
        tps, step_seconds = self.tokens / elapsed, elapsed / max(len(self.losses), 1)
        self.losses, self.tokens, self.start = [], 0, now
        return loss, tps, step_seconds


# ---------------------------------------------------------------------------
# Set-up and resume


def _local_inputs(config: TrainerConfig, d: Dist) -> TrainerConfig:
    """The configuration with its s3:// inputs (data, base model, tokenizer) copied to local scratch by the
    first process of each node; the per-file SHA-256 manifest is then made of the local copies. Every store
    of the configuration is checked first, so that a wrong credential fails the run before any work."""
    d.on_main(lambda: storage.check_locations(config), "checking the s3:// locations")
    d.on_every_rank(lambda: storage.localized(config) if d.local_rank == 0 else None, "downloading the s3:// inputs")
    return storage.localized(config, download=False)


def _set_up(config: TrainerConfig, d: Dist, stop: SigtermFlag) -> Setup:
    """Fail fast on a model that cannot run, then the method's data, the model, the optimizer."""
    t = config.training
    bf16 = t.precision in ("bf16", "fp8") or (t.precision == "auto" and d.device.type == "cuda")
    if t.precision == "fp8":
        on_every_rank(d, lambda: fp8.check_device(d.device), stop)
    preflight(config, d, bf16, stop)
    method = build_method(config)
    dataset = method.prepare(d, stop)
    hf_cfg = hf_config(config, dataset.tokenizer.vocab_size, dataset.tokenizer.eos_id)
    stats = check_model(config, hf_cfg, d, bf16, stop)
    model = build_model(config, hf_cfg, d, bf16)
    optimizer = build_optimizer(model, t, d.device)
    if t.precision == "fp8":
        fp8.rescale_after_steps(optimizer, model)
    if t.global_batch_sequences % (t.micro_batch_sequences * d.world):
        raise ConfigError(
            f"training.global_batch_sequences {t.global_batch_sequences} is not a multiple of "
            f"micro_batch_sequences {t.micro_batch_sequences} x {d.world} workers"
        )
    tokens_per_step = t.global_batch_sequences * t.seq_len
    s = Setup(
        config=config, method=method, dataset=dataset, hf_cfg=hf_cfg, stats=stats, model=model, optimizer=optimizer,
        batches=method.batches(), accum=t.global_batch_sequences // (t.micro_batch_sequences * d.world),
        tokens_per_step=tokens_per_step, budget=t.budget, total_steps=total_steps(t, tokens_per_step),
        autocast=torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext(),
        peak_flops=peak_flops(d.device, config.metrics.peak_flops_per_device),
        signing_key=signing_key(config) if d.is_main else None, gpus=d.world if d.device.type == "cuda" else 0,
    )
    method.start(model, s.autocast, d)  # before any checkpoint is loaded: dpo's reference is the starting model
    if d.is_main and t.compile is None and defaults.compile_blocks(d.device.type) and not compiles(config, d.device):
        log.warning("training.compile: the blocks run eager, as torch.compile needs %s", missing_compiler(d.device))
    if d.is_main:
        log.info(
            "%s: %s %.1fM params (%.1fM active non-embedding), %d worker(s) on %s, %s, %s, %d micro-steps x %d seqs x %d tokens per worker, %s steps",
            config.run_name, type(model).__name__.removeprefix("FSDP"), stats.params / 1e6, stats.active_params / 1e6,
            d.world, d.device.type, "fp8" if t.precision == "fp8" else "bf16" if bf16 else "fp32",
            "compiled" if compiles(config, d.device) else "eager", s.accum, t.micro_batch_sequences, t.seq_len,
            s.total_steps or "?",
        )
        if config.training.lora is not None:
            trained, every = trainable_parameters(model)
            log.info("LoRA: training %s of %s parameters (%.2f%%), export %s", f"{trained:,}", f"{every:,}",
                     100 * trained / every, config.training.lora.export)
    return s


def _resume(config: TrainerConfig, s: Setup, d: Dist) -> tuple[TrainState, Path | str | None, LastCheckpoint | None]:
    """The state to start from: a checkpoint's (rank 0 chooses it for every rank), or step 0."""
    path, line = d.on_main(lambda: choose_resume(config.checkpoint, config.s3), "choosing the checkpoint to resume from")
    if path is None:
        return TrainState(step=0, origin=line), None, None
    state = checkpoint.load_run(config, path, s.model, s.optimizer, d)
    if state.tokenizer_digest not in (None, s.dataset.tokenizer.digest):
        raise ConfigError(f"checkpoint {path} was trained with a different tokenizer")
    saved_seq_len = state.config.get("training", {}).get("seq_len")
    if d.is_main and (state.data_digest not in (None, s.dataset.digest)
                      or saved_seq_len not in (None, config.training.seq_len)):
        log.warning("the data or training.seq_len changed since %s: the loader goes on counting over the "
                    "new windows, so this run does not continue the same curve", path)
    s.batches.load_state_dict(state.loader)
    s.gpu_seconds_before = state.gpu_seconds
    state.origin = line  # the line this run continues, which may start at the checkpoint it resumed from
    if d.is_main:
        log.info("resumed from %s (step %d, %s tokens)", path, state.step, f"{state.tokens_seen:,}")
    return state, path, LastCheckpoint(step=state.step, path=str(path), time=state.time)


# ---------------------------------------------------------------------------
# One step, and what the loop does around it


def _stop_or_save(config: TrainerConfig, step: int, total: int | None, timings: Timings, last_save: float,
                  stop: SigtermFlag, d: Dist) -> tuple[str | None, bool]:
    """Why the run ends now (None: it goes on), and whether a checkpoint is due by time. One tiny
    all-reduce per step keeps every rank's decisions identical."""
    reason = budget_reached(step, total, config.training, timings)
    minutes = config.checkpoint.interval_minutes
    sigterm, save_by_time, deadline = d.max_flags([
        int(stop.requested),
        int(minutes is not None and time.monotonic() - last_save >= 60 * minutes),
        int(reason == "deadline"),
    ])
    if deadline and reason is None:
        reason = "deadline"
    return ("sigterm" if sigterm else reason), bool(save_by_time)


def train_step(model, optimizer, method: Method, rows, accum: int, micro: int, grad_clip: float | None, autocast,
               d: Dist) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One optimizer step over ``accum`` micro-batches of ``rows`` (this rank's share of the step).
    Returns the mean loss, the mean auxiliary loss and the gradient norm before clipping (None when
    grad_clip is off).

    Under FSDP every micro-batch's backward pass reduce-scatters its gradients into the shards (as
    torchtitan does): the gradients held between micro-batches are this worker's shard, never the
    whole model's (which turning the synchronisation off until the last micro-batch would keep)."""
    model.train()
    batch = torch.as_tensor(rows)
    if d.device.type == "cuda":
        batch = batch.pin_memory().to(d.device, non_blocking=True)
    loss_sum = torch.zeros((), device=d.device)
    aux_sum = None
    for k in range(accum):
        with autocast:
            loss = method.loss(model, batch[k * micro : (k + 1) * micro])
        (loss.total / accum).backward()
        loss_sum += loss.value.detach()
        if loss.aux is not None:
            aux_sum = loss.aux.detach() if aux_sum is None else aux_sum + loss.aux.detach()
    grad_norm = None
    if grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, (aux_sum / accum if aux_sum is not None else None), grad_norm


def _progress(s: Setup, state: TrainState, last_ckpt: LastCheckpoint | None, d: Dist, loss: float | None,
              lr: float, gnorm: float | None, tps: float | None, extra: dict[str, float]) -> Progress:
    mfu = tps / d.world * s.stats.flops_per_token / s.peak_flops if (tps and s.peak_flops) else None
    return build_progress(
        step=state.step, total_steps=s.total_steps, tokens_seen=state.tokens_seen,
        token_budget=s.budget.max_tokens, loss=loss, learning_rate=lr, grad_norm=gnorm,
        tokens_per_second=tps, mfu=mfu, last_checkpoint=last_ckpt, deadline=s.budget.deadline, method_metrics=extra,
    )


def _log_step(p: Progress, extra: dict[str, float]) -> None:
    log.info(
        "step %d/%s | loss %.4f | lr %.2e | grad %.3f | %s tok/s | mfu %s | eta %s%s",
        p.step, p.total_steps or "?", p.loss, p.learning_rate, p.grad_norm or 0.0, f"{p.tokens_per_second:,.0f}",
        f"{p.mfu:.1%}" if p.mfu is not None else "-", _fmt_eta(p.eta_seconds),
        "".join(f" | {k.replace('_', ' ')} {v:.4f}" for k, v in extra.items()),
    )


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    h, rem = divmod(int(seconds), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _evaluate(s: Setup, state: TrainState, d: Dist, timings: Timings | None, label: str) -> None:
    """The method's validation loss into ``state`` (and its log history), logged on rank 0; ``timings``
    (None: not timed) keeps how long it took."""
    t0 = time.monotonic()
    val_loss = s.method.evaluate(s.model, s.autocast, d)
    if timings is not None:
        timings.eval = time.monotonic() - t0
    if d.is_main and val_loss is not None:
        log.info("%s val loss %.4f | val ppl %.2f", label, val_loss, math.exp(min(val_loss, 50)))
    state.val_loss = val_loss
    if val_loss is not None:
        state.record("val_loss", val_loss)


def _save(saves: checkpoint.Checkpointer, s: Setup, state: TrainState, d: Dist, final: bool = False) -> None:
    """A checkpoint of this step: written in the background (the loop goes on once the state is copied),
    or, ``final`` or on S3, before it returns."""
    t0 = time.monotonic()
    state.loader, state.world_size, state.time = s.batches.state_dict(), d.world, rfc3339()
    state.data_digest, state.tokenizer_digest = s.dataset.digest, s.dataset.tokenizer.digest
    state.config = saves.config.model_dump(mode="json")
    state.gpu_seconds = s.gpu_seconds()
    saves.save(s.model, s.optimizer, state, final=final,
               model_files=lambda folder: write_model_files(folder, s.hf_cfg, s.dataset.tokenizer))
    if d.is_main:
        written = "written" if saves.last is not None and saves.last.step == state.step else "staged, written in the background"
        log.info("checkpoint step %d %s (%.1fs)", state.step, written, time.monotonic() - t0)


# ---------------------------------------------------------------------------
# The end


def _export(config: TrainerConfig, s: Setup, state: TrainState, d: Dist, reason: str, started: datetime,
            resumed_from: Path | str | None) -> str:
    """The trained model in Hugging Face format with its provenance, in output.dir (every rank takes part);
    for an s3:// output.dir, written to local scratch and uploaded, provenance.json last."""
    d.set_timeout(SLOW_TIMEOUT)  # rank 0 alone writes the model while the others wait
    tok = s.dataset.tokenizer
    provenance = build_provenance(
        config, state, reason=reason, started=started, ended=datetime.now(timezone.utc), resumed_from=resumed_from,
        d=d, data=s.dataset.provenance, base_path=s.config.model.base_path,
        tokenizer={"digest": tok.digest, "vocab_size": tok.vocab_size, "eos_token": tok.eos_token, "encoder": tok.encoder},
        model={"params": s.stats.params, "active_params": s.stats.active_params,
               "flops_per_token": s.stats.flops_per_token, "config": describe(s.hf_cfg)},
        gpu_hours=s.gpu_seconds() / 3600,
    )
    lora = config.training.lora
    remote = storage.is_s3(config.output.dir)
    local = storage.scratch_of(config) / "output" if remote else config.output.dir
    out = export(local, s.model, s.hf_cfg, tok, provenance, d,
                 adapters=LoraExport(lora, s.config.model.base_path) if lora is not None else None,
                 log_history=state.log_history, signing_key=s.signing_key, file_mode=config.output.file_mode)
    if remote:
        d.on_main(lambda: _upload_export(local, config), f"uploading the model to {config.output.dir}")
    d.barrier()
    if d.is_main:
        log.info("exported %s (%s, provenance %s)", out, reason, "signed" if s.signing_key else "unsigned")
        checkpoint.retain_after_success(config.checkpoint, config.s3)
    return str(config.output.dir)


def signing_key(config: TrainerConfig):
    """provenance.signing_key, read before training so that a bad key fails at once (None: unsigned)."""
    if config.provenance.signing_key is None:
        return None
    try:
        return load_private_key(config.provenance.signing_key)
    except ProvenanceError as e:
        raise ConfigError(f"provenance.signing_key: {e}") from None


def _upload_export(local: Path, config: TrainerConfig) -> None:
    storage.publish(local, config.output.dir, config.s3, "output.dir", marker=RECORD_FILE)
    storage.remove_local(local)
