"""The training loop: config -> setup -> loop -> checkpoint -> export.

One process or many under torchrun (FSDP2, gloo on CPU, NCCL on CUDA): the
same code. Read `run()` top to bottom.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .config import TrainerConfig, TrainingConfig
from .data import TokenData, TrainLoader, data_digest, ensure_tokenizer, load_manifest, prepare
from .dist import Dist, hostname, init_distributed, shutdown
from .exitcodes import ConfigError, DataError, StoppedBeforeTraining
from .export import export, versions
from .model import build_model, check_context, check_fits, describe, hf_config, model_stats, peak_flops
from .progress import Reporter, build_progress, rfc3339
from .tokenizer import TextTokenizer

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
    last_checkpoint: dict | None = None  # {step, path, time}, as in the progress report
    start_step: int = 0  # the step this run resumed at; == step when there was nothing left to train
    history: list[dict] = field(default_factory=list, repr=False)  # per logged step: step, loss, aux_loss, lr, ...

    def to_message(self) -> dict:
        """The camelCase one-line summary for the termination message (with the progress report's keys)."""
        return {
            "status": self.status, "reason": self.reason, "step": self.step, "totalSteps": self.total_steps,
            "tokensSeen": self.tokens_seen, "trainLoss": self.train_loss, "valLoss": self.val_loss,
            "outputDir": self.output_dir, "checkpoint": self.checkpoint, "lastCheckpoint": self.last_checkpoint,
            "startedAt": self.started_at, "endedAt": self.ended_at,
        }


def run(config: TrainerConfig, on_progress=None, stop: SigtermFlag | None = None) -> RunSummary:
    """Train (or resume) as configured; returns when a budget is reached or SIGTERM arrives.

    ``stop`` is the caller's SIGTERM flag, already installed, when SIGTERM must stay caught after
    ``run`` returns (the worker process still writes its termination message); by default ``run``
    catches SIGTERM only while it runs."""
    started = datetime.now(timezone.utc)
    owns_stop = stop is None
    if stop is None:
        stop = SigtermFlag()
        stop.install()
    if stop.requested:
        raise StoppedBeforeTraining(STOPPED)
    d = init_distributed()
    reporter = None
    try:
        t = config.training
        bf16 = t.precision == "bf16" or (t.precision == "auto" and d.device.type == "cuda")
        # ---- setup: fail fast on a model that cannot run, then data, model, optimizer
        _preflight(config, d, bf16, stop)
        tokenizer, data_path, digest = _prepare_data(config, d, stop)
        data = TokenData(data_path, config)
        hf_cfg = hf_config(config, tokenizer.vocab_size, tokenizer.eos_id)
        check_context(hf_cfg, t.seq_len)
        stats = model_stats(hf_cfg, t.seq_len)
        _on_every_rank(d, lambda: check_fits(hf_cfg, stats, config, d.world, d.local_world, d.device, bf16), stop)
        model = _parallelize(build_model(config, hf_cfg), d, bf16, t.compile)
        optimizer = _build_optimizer(model, t, d.device)
        loader = TrainLoader(data, t.seed)
        if t.global_batch_sequences % (t.micro_batch_sequences * d.world):
            raise ConfigError(
                f"training.global_batch_sequences {t.global_batch_sequences} is not a multiple of "
                f"micro_batch_sequences {t.micro_batch_sequences} x {d.world} workers"
            )
        accum = t.global_batch_sequences // (t.micro_batch_sequences * d.world)
        tokens_per_step = t.global_batch_sequences * t.seq_len
        total_steps = _total_steps(t, tokens_per_step)
        autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        aux_coef = getattr(hf_cfg, "router_aux_loss_coef", 0.0) if getattr(hf_cfg, "output_router_logits", False) else 0.0
        peak = peak_flops(d.device, config.metrics.peak_flops_per_device)
        if d.is_main:
            log.info(
                "%s: %s %.1fM params (%.1fM active non-embedding), %d worker(s) on %s, %s, %d micro-steps x %d seqs x %d tokens per worker, %s steps",
                config.run_name, type(model).__name__.removeprefix("FSDP"), stats.params / 1e6, stats.active_params / 1e6,
                d.world, d.device.type, "bf16" if bf16 else "fp32", accum, t.micro_batch_sequences, t.seq_len, total_steps or "?",
            )

        # ---- resume
        step, tokens_seen, last_ckpt, train_loss, val_loss = 0, 0, None, None, None
        resume_from, line = _resume_path(config, d)
        if resume_from is not None:
            state = checkpoint.load(resume_from, model, optimizer, d)
            if state.get("tokenizer_digest") not in (None, tokenizer.digest):
                raise ConfigError(f"checkpoint {resume_from} was trained with a different tokenizer")
            saved_seq_len = (state.get("config") or {}).get("training", {}).get("seq_len")
            if d.is_main and (state.get("data_digest") not in (None, digest) or saved_seq_len not in (None, t.seq_len)):
                log.warning("the data or training.seq_len changed since %s: the loader goes on counting over the "
                            "new windows, so this run does not continue the same curve", resume_from.name)
            step, tokens_seen = state["step"], state["tokens_seen"]
            loader.load_state_dict(state["loader"])
            train_loss, val_loss = state.get("train_loss"), state.get("val_loss")
            last_ckpt = {"step": step, "path": str(resume_from), "time": state.get("time")}
            if d.is_main:
                log.info("resumed from %s (step %d, %s tokens)", resume_from, step, f"{tokens_seen:,}")

        if d.is_main:
            reporter = Reporter(on_progress, config.metrics.port, config.metrics.progress_interval_seconds)

        def save() -> None:
            nonlocal last_ckpt
            t0 = time.monotonic()
            trainer_state = {
                "step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict(),
                "scheduler": {"step": step, "total_steps": total_steps}, "world_size": d.world,
                "train_loss": train_loss, "val_loss": val_loss, "time": rfc3339(),
                "data_digest": digest, "tokenizer_digest": tokenizer.digest, "config": config.model_dump(mode="json"),
                "origin": line,
            }
            path = checkpoint.save(config.checkpoint.dir, step, model, optimizer, trainer_state, config.checkpoint.keep_last, d)
            timing["save"] = time.monotonic() - t0
            last_ckpt = {"step": step, "path": str(path), "time": trainer_state["time"]}
            if d.is_main:
                log.info("checkpoint %s (%.1fs)", path, timing["save"])

        def progress(loss: float | None, lr: float, gnorm: float | None, tps: float | None) -> dict:
            mfu = tps / d.world * stats.flops_per_token / peak if (tps and peak) else None
            return build_progress(
                step=step, total_steps=total_steps, tokens_seen=tokens_seen,
                token_budget=t.budget.max_tokens, loss=loss, learning_rate=lr, grad_norm=gnorm,
                tokens_per_second=tps, mfu=mfu, last_checkpoint=last_ckpt, deadline=t.budget.deadline,
            )

        # ---- loop
        history: list[dict] = []
        timing = {"step": 0.0, "save": 0.0}
        start_step = step
        window_losses: list[torch.Tensor] = []
        window_start, window_tokens = time.monotonic(), 0
        last_report = last_save = time.monotonic()
        tps, lr, gnorm = None, _lr_at(step, t, total_steps), None
        reason = None
        # A checkpoint's val_loss may predate its step (evaluated earlier, or not at all): evaluate
        # again at the end, also when a finished training is resumed with nothing left to train.
        val_step = -1
        _on_every_rank(d, lambda: None, stop)  # last look before the loop; from here: step, checkpoint, 75
        while True:
            reason = _budget_reached(step, tokens_seen, total_steps, t, timing)
            # One tiny all-reduce per step keeps every rank's decisions identical.
            sigterm, ckpt_by_time, deadline = d.max_flags([
                int(stop.requested),
                int(config.checkpoint.interval_minutes is not None
                    and time.monotonic() - last_save >= 60 * config.checkpoint.interval_minutes),
                int(reason == "deadline"),
            ])
            if deadline and reason is None:
                reason = "deadline"
            if sigterm:
                reason = "sigterm"
            if reason is not None:
                break

            t0 = time.monotonic()
            lr = _lr_at(step, t, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            windows = loader.next_step(t.global_batch_sequences, d.rank, d.world)
            loss, aux, grad_norm = _train_step(model, optimizer, windows, t, accum, autocast, aux_coef, d)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            window_losses.append(loss)
            timing["step"] = time.monotonic() - t0

            if step % t.log_interval_steps == 0 or step == total_steps:
                loss_mean = d.sum([torch.stack(window_losses).mean().item()])[0] / d.world
                train_loss = loss_mean
                gnorm = grad_norm.item() if grad_norm is not None else None
                now = time.monotonic()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens, window_losses = now, 0, []
                entry = {"step": step, "loss": loss_mean, "lr": lr, "grad_norm": gnorm, "tokens_per_second": tps}
                if aux is not None:
                    entry["aux_loss"] = aux.item()
                history.append(entry)
                if d.is_main:
                    p = progress(loss_mean, lr, gnorm, tps)
                    log.info(
                        "step %d/%s | loss %.4f | lr %.2e | grad %.3f | %s tok/s | mfu %s | eta %s",
                        step, total_steps or "?", loss_mean, lr, gnorm or 0.0, f"{tps:,.0f}",
                        f"{p['mfu']:.1%}" if p["mfu"] is not None else "-", _fmt_eta(p["etaSeconds"]),
                    )
            if t.eval_interval_steps and step % t.eval_interval_steps == 0:
                t0 = time.monotonic()
                val_loss = evaluate(model, data, t, autocast, d)
                timing["eval"] = time.monotonic() - t0
                val_step = step
                if d.is_main and val_loss is not None:
                    log.info("step %d | val loss %.4f | val ppl %.2f", step, val_loss, math.exp(min(val_loss, 50)))
            if (config.checkpoint.interval_steps and step % config.checkpoint.interval_steps == 0) or ckpt_by_time:
                save()
                last_save = time.monotonic()
            if reporter is not None and time.monotonic() - last_report >= config.metrics.progress_interval_seconds:
                reporter.report(progress(train_loss if train_loss is not None else loss.item(), lr, gnorm, tps))
                last_report = time.monotonic()

        # ---- end: checkpoint, and on a completed budget: evaluate and export
        preempted = reason == "sigterm"
        if preempted and d.is_main:
            log.info("SIGTERM: writing a checkpoint at step %d", step)
        if not preempted and val_step != step:
            val_loss = evaluate(model, data, t, autocast, d)
            if d.is_main and val_loss is not None:
                log.info("final val loss %.4f | val ppl %.2f", val_loss, math.exp(min(val_loss, 50)))
        if last_ckpt is None or last_ckpt["step"] != step:  # never the same step twice: a SIGTERM
            save()                                           # right after a save has it already
        output_dir = None
        ended = datetime.now(timezone.utc)
        if not preempted:
            provenance = _provenance(config, tokenizer, data, hf_cfg, stats, d, started, ended, train_loss, val_loss, step, tokens_seen, reason, resume_from)
            out = export(config.output.dir, model, hf_cfg, tokenizer, provenance, d)
            d.barrier()
            output_dir = str(config.output.dir)
            if d.is_main:
                log.info("exported %s (%s)", out, reason)
        summary = RunSummary(
            status="preempted" if preempted else "completed", reason=reason, step=step, tokens_seen=tokens_seen,
            train_loss=train_loss, val_loss=val_loss, output_dir=output_dir,
            checkpoint=last_ckpt["path"] if last_ckpt else None, started_at=rfc3339(started),
            ended_at=rfc3339(datetime.now(timezone.utc)), total_steps=total_steps, last_checkpoint=last_ckpt,
            start_step=start_step, history=history,
        )
        if reporter is not None:
            reporter.report(progress(train_loss, lr, gnorm, tps))
        return summary
    finally:
        if reporter is not None:
            reporter.close()
        shutdown(d)
        if owns_stop:
            stop.restore()


# ---------------------------------------------------------------------------
# Setup


def _preflight(config: TrainerConfig, d: Dist, bf16: bool, stop: SigtermFlag) -> None:
    """The context and memory checks with the configured vocabulary size, before any data is tokenized.

    They run again with the real tokenizer once it exists."""
    arch, train = config.model.architecture, config.tokenizer.train
    vocab = (arch and arch.vocab_size) or (train and train.vocab_size) or 1
    hf_cfg = hf_config(config, vocab, 0)
    check_context(hf_cfg, config.training.seq_len)
    stats = model_stats(hf_cfg, config.training.seq_len)
    _on_every_rank(d, lambda: check_fits(hf_cfg, stats, config, d.world, d.local_world, d.device, bf16), stop)


STOPPED = "SIGTERM before the first step; nothing to save"


def _on_every_rank(d: Dist, check, stop: SigtermFlag | None = None) -> None:
    """``check()`` on every rank, failing on all when it fails on any (Dist.on_every_rank). A SIGTERM
    that arrived before it (``stop``) counts as such a failure, with exit code PREEMPTED."""
    def check_then_stop() -> None:
        check()
        if stop is not None and stop.requested:
            raise StoppedBeforeTraining(STOPPED)

    d.on_every_rank(check_then_stop, "a set-up check")


def _prepare_data(config: TrainerConfig, d: Dist, stop: SigtermFlag) -> tuple[TextTokenizer, Path, str]:
    """Rank 0 trains/loads the tokenizer and tokenizes the data; the others get the result.

    Errors found by rank 0 are re-raised on every rank, so all exit with the
    same code instead of waiting forever. Nodes that do not share cache_dir
    prepare their own copy with rank 0's tokenizer (encoding is deterministic).
    """
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
        if d.is_main or d.local_rank != 0 or load_manifest(Path(path)) is not None:
            return
        local_digest, listing = data_digest(config.data)
        if local_digest != digest:
            raise DataError(f"the data on {hostname()} differs from rank 0's (digest {local_digest[:12]} != {digest[:12]})")
        prepare(config, tokenizer, digest, listing, stop=should_stop)

    _on_every_rank(d, prepare_on_this_node, stop)  # also the barrier: every node's copy is ready after it
    return tokenizer, Path(path), digest


def _parallelize(model: torch.nn.Module, d: Dist, bf16: bool, compile: bool) -> torch.nn.Module:
    """Compile and shard each transformer block (FSDP2), then the root; plain in one process."""
    model.to(d.device)
    layers = _blocks(model)
    if compile:
        for layer in layers:
            layer.compile()
    if d.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the modules Hugging Face marks as not to be split."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    return blocks or list(model.model.layers)


def _build_optimizer(model: torch.nn.Module, t: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=device.type == "cuda")


def _resume_path(config: TrainerConfig, d: Dist) -> tuple[Path | None, str | None]:
    """The checkpoint to resume from and the line of checkpoints this run continues, chosen by rank 0
    for every rank (a shared file system may show ranks different states for a moment).

    An explicit ``checkpoint.resume`` starts a line from that checkpoint (going back to an earlier
    step, for instance); a restart of the same run continues the line from its newest checkpoint
    instead of going back again."""
    return d.on_main(lambda: _choose_resume(config), "choosing the checkpoint to resume from")


def _choose_resume(config: TrainerConfig) -> tuple[Path | None, str | None]:
    r = config.checkpoint.resume
    if r == "never":
        return None, None
    latest = checkpoint.find_latest(config.checkpoint.dir)
    if r == "auto":
        return latest, (checkpoint.origin(latest) if latest else None)
    path = Path(r)
    if not checkpoint.is_complete(path):
        raise ConfigError(f"checkpoint.resume {r}: not a complete checkpoint")
    if latest is not None and latest != path and checkpoint.origin(latest) == path.name:
        return latest, path.name  # this run already went on from there
    return path, path.name


def _total_steps(t: TrainingConfig, tokens_per_step: int) -> int | None:
    limits = []
    if t.budget.max_steps:
        limits.append(t.budget.max_steps)
    if t.budget.max_tokens:
        limits.append(math.ceil(t.budget.max_tokens / tokens_per_step))
    return min(limits) if limits else None


# ---------------------------------------------------------------------------
# The step, the schedule, evaluation


def _train_step(model, optimizer, windows: np.ndarray, t: TrainingConfig, accum: int, autocast, aux_coef: float, d: Dist):
    """One optimizer step over `accum` micro-batches; gradients are reduced only on the last."""
    model.train()
    micro = t.micro_batch_sequences
    batch = torch.from_numpy(windows)
    if d.device.type == "cuda":
        batch = batch.pin_memory().to(d.device, non_blocking=True)
    loss_sum = torch.zeros((), device=d.device)
    aux_sum = None
    for k in range(accum):
        part = batch[k * micro : (k + 1) * micro]
        x, y = part[:, :-1], part[:, 1:]
        if d.distributed:
            model.set_requires_gradient_sync(k == accum - 1)
        with autocast:
            out = model(input_ids=x)
            loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
            total = loss
            aux = getattr(out, "aux_loss", None)
            if aux is not None and aux_coef:
                total = loss + aux_coef * aux
        (total / accum).backward()
        loss_sum += loss.detach()
        if aux is not None:
            aux_sum = aux.detach() if aux_sum is None else aux_sum + aux.detach()
    grad_norm = None
    if t.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, (aux_sum / accum if aux_sum is not None else None), grad_norm


def _lr_at(step: int, t: TrainingConfig, total_steps: int | None) -> float:
    """The learning rate of the step with 0-based index `step`."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant" or not total_steps:
        return t.lr
    if t.schedule == "cosine":
        progress = min((step - t.warmup_steps) / max(total_steps - t.warmup_steps, 1), 1.0)
        return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))
    decay_start = total_steps - max(int(round(t.decay_fraction * total_steps)), 1)  # wsd
    if step < decay_start:
        return t.lr
    progress = min((step - decay_start + 1) / max(total_steps - decay_start, 1), 1.0)
    return t.lr - (t.lr - t.min_lr) * progress


def _budget_reached(step: int, tokens_seen: int, total_steps: int | None, t: TrainingConfig, timing: dict) -> str | None:
    b = t.budget
    if b.max_steps is not None and step >= b.max_steps:
        return "max_steps"
    if total_steps is not None and step >= total_steps:
        return "max_tokens"
    if b.deadline is not None:
        # Stop early enough to finish one more step, the final evaluation, checkpoint and export (an
        # export writes less than a checkpoint). Until this run has saved once, a save is taken to
        # last as long as 20 steps, and an evaluation as one step.
        save = timing["save"] or 20 * timing["step"]
        margin = timing["step"] + timing.get("eval", timing["step"]) + 2 * save
        if datetime.now(timezone.utc).timestamp() + margin >= b.deadline.timestamp():
            return "deadline"
    return None


def validation_indices(data: TokenData, t: TrainingConfig) -> list[int]:
    """The validation windows of one pass: eval_batches x micro_batch_sequences of them in all, spread
    evenly over the whole validation split (so over every source, in proportion to its size); the
    same on any world size."""
    n, total = t.eval_batches * t.micro_batch_sequences, data.val_windows
    if total <= n:
        return list(range(total))
    return [i * total // n for i in range(n)]


@torch.no_grad()
def evaluate(model, data: TokenData, t: TrainingConfig, autocast, d: Dist) -> float | None:
    """Mean cross-entropy per token over the validation windows, split round-robin over ranks."""
    indices = validation_indices(data, t)
    if not indices:
        return None
    model.eval()
    mine = indices[d.rank :: d.world]
    per_rank = math.ceil(len(indices) / d.world)
    micro = t.micro_batch_sequences
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    count = 0
    # Every rank runs the same number of forwards (FSDP gathers weights in each one);
    # a rank short of windows repeats one and ignores its loss.
    for b in range(math.ceil(per_rank / micro)):
        part = mine[b * micro : (b + 1) * micro]
        real = len(part)
        part = part or [indices[0]]
        batch = torch.from_numpy(np.stack([data.val_window(i) for i in part])).to(d.device)
        with autocast:
            logits = model(input_ids=batch[:, :-1]).logits
        losses = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none").view(len(part), -1)
        total += losses[:real].sum().double()
        count += real * t.seq_len
    s, c = d.sum([total.item(), float(count)])
    model.train()
    return s / c


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _provenance(config, tokenizer, data, hf_cfg, stats, d, started, ended, train_loss, val_loss, step, tokens_seen, reason, resume_from) -> dict:
    m = data.manifest
    return {
        "run_name": config.run_name,
        "method": config.method,
        "base_model": config.model.base_path,
        "started_at": rfc3339(started),
        "ended_at": rfc3339(ended),
        "stop_reason": reason,
        "steps": step,
        "tokens_seen": tokens_seen,
        "final_train_loss": train_loss,
        "final_val_loss": val_loss,
        "resumed_from": str(resume_from) if resume_from else None,
        "world_size": d.world,
        "hostnames": sorted(set(d.all_gather_object(hostname()))),
        "versions": versions(),
        "tokenizer": {"digest": tokenizer.digest, "vocab_size": tokenizer.vocab_size, "eos_token": tokenizer.eos_token, "encoder": tokenizer.encoder},
        "data": {
            "digest": m["data_digest"],
            "manifest": str(data.path / "manifest.json"),
            "sources": [
                {"name": s["name"], "path": s["path"], "format": s["format"], "tokens": s["tokens"], "documents": s["documents"],
                 "files": [{"path": f["path"], "sha256": f["sha256"], "tokens": f["tokens"]} for f in s["files"]]}
                for s in m["sources"]
            ],
        },
        "model": {"params": stats.params, "active_params": stats.active_params, "flops_per_token": stats.flops_per_token, "config": describe(hf_cfg)},
        "config": config.model_dump(mode="json"),
    }


class SigtermFlag:
    """SIGTERM sets a flag; the loop finishes its step, checkpoints and exits PREEMPTED. A second
    SIGTERM (torchrun forwards one once any worker of the node has exited) changes nothing.

    Before the first step there is nothing to save: set-up looks at the flag at safe points (between
    data files, after each phase, on every rank together) and ends the run with StoppedBeforeTraining
    (exit code PREEMPTED) rather than after hours of data preparation. The handler itself only sets
    the flag: an exception raised wherever the signal lands could be taken for another error, or
    leave one rank alone in a collective.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

