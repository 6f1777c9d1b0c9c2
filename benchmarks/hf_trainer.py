"""The same training under Hugging Face `transformers.Trainer`, for `throughput.py --against hf`.

The model (a fresh one built by the trainer's own builder, so its initial weights are those of Forge's
run), the rows, their order, AdamW's settings, the learning rate, clipping and precision are Forge's;
only the loop differs. Timing starts at the end of the warmup steps, as in Forge's run.
"""

from __future__ import annotations

import tempfile
import time

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments


class Rows(Dataset):
    """Row i as Trainer feeds it to the model: inputs = row[:-1], targets = row[1:] (as Forge's loss),
    passed as `shift_labels` so the model's loss uses exactly those targets."""

    def __init__(self, rows):
        self.rows = torch.as_tensor(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"input_ids": row[:-1], "labels": row[:-1], "shift_labels": row[1:]}


class InOrder(Trainer):
    """Rows in the order Forge takes them (Trainer shuffles by default)."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class Clock(TrainerCallback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.losses = warmup, None, None, []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()
        self.end = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def run(model: torch.nn.Module, rows, *, micro: int, accum: int, warmup: int, steps: int, t, bf16: bool,
        compile: bool, device: torch.device) -> tuple[float, float]:
    """Trains ``model`` on ``rows`` for warmup + steps optimizer steps; returns (seconds of the timed
    steps, mean loss over all steps)."""
    clock = Clock(warmup)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum, learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
            max_grad_norm=t.grad_clip if t.grad_clip is not None else 0.0,
            bf16=bf16, torch_compile=compile, use_cpu=device.type == "cpu",
            logging_steps=warmup + steps, save_strategy="no", report_to=[], disable_tqdm=True,
            dataloader_num_workers=0, seed=t.seed, data_seed=t.seed,
        )
        trainer = InOrder(model=model, args=args, train_dataset=Rows(rows), callbacks=[clock])
        trainer.train()
    return clock.end - clock.start, clock.losses[-1]
