"""Supervised fine-tuning: cross-entropy on the completion and assistant tokens only, several examples
packed per sequence with position ids that restart at each example.

Given position ids and no attention mask, transformers' mask builder (``masking_utils``, used by every
causal LM with SDPA) finds where the ids restart and makes the causal mask block-diagonal, so an
example never attends to the one packed before it (tests/trainer/test_sft.py checks that leakage is
absent). It does so only without a key/value cache, hence `use_cache=False` on every forward. The import below makes a transformers without that support fail at once rather than leak.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401  (see the docstring)

from ..config import TrainerConfig
from ..data.packed import TrainLoader, validation_indices
from ..data.prepare import prepare_on_ranks
from ..data.records import IGNORE, RecordData, load_records_manifest, prepare_records
from ..models.logprobs import cross_entropy_sum
from ..runtime.dist import Dist
from ..runtime.signals import SigtermFlag
from .base import Batches, Dataset, Loss, each_micro_batch, with_router_loss


class Sft:
    def __init__(self, config: TrainerConfig):
        self.config = config
        self.data: RecordData | None = None

    def prepare(self, d: Dist, stop: SigtermFlag) -> Dataset:
        self.data, dataset = prepare_record_data(self.config, d, stop)
        return dataset

    def batches(self) -> Batches:
        return TrainLoader(self.data, self.config.training.seed)

    def start(self, model: torch.nn.Module, autocast, d: Dist) -> None:
        pass

    def step_metrics(self, d: Dist) -> dict[str, float]:
        return {}

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> Loss:
        """Mean cross-entropy over the micro-batch's learned tokens; batch: [rows, 3, seq_len]."""
        summed, count, out = _summed_loss(model, batch)
        return with_router_loss(summed / count.clamp(min=1), out, model)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, autocast, d: Dist) -> float | None:
        """Mean cross-entropy per learned token of the validation sequences, split round-robin over ranks."""
        t, data = self.config.training, self.data
        indices = validation_indices(data, t)
        if not indices:
            return None
        totals = torch.zeros(2, dtype=torch.float64, device=d.device)  # summed loss, learned tokens

        def add(batch: torch.Tensor, real: bool) -> None:
            with autocast:
                summed, n, _ = _summed_loss(model, batch)
            if real:
                totals.add_(torch.stack([summed.double(), n.double()]))

        model.eval()
        each_micro_batch(indices, t.micro_batch_sequences, d, data.val_window, add)
        model.train()
        s, c = d.sum(totals.tolist())
        return s / c if c else None


def prepare_record_data(config: TrainerConfig, d: Dist, stop: SigtermFlag) -> tuple[RecordData, Dataset]:
    """The records of every source prepared (rank 0 for all, cached) and packed: sft's and dpo's data."""
    tokenizer, path, digest = prepare_on_ranks(config, d, stop, prepare=prepare_records,
                                               ready=lambda p: load_records_manifest(p) is not None)
    data = RecordData(path, config)
    # saved with the export: the template, and the end of an assistant turn as a place to stop generating
    tokenizer.chat_template = data.manifest["chat_template"]
    end_of_turn = data.manifest["end_of_turn_id"]
    if end_of_turn is not None and end_of_turn != tokenizer.eos_id:
        tokenizer.stop_ids = [tokenizer.eos_id, end_of_turn]
    return data, Dataset(tokenizer=tokenizer, digest=digest, provenance=_provenance(data))


def _summed_loss(model: torch.nn.Module, batch: torch.Tensor):
    """(summed cross-entropy of the learned tokens, their number, the model's output)."""
    input_ids, labels, positions = batch[:, 0], batch[:, 1], batch[:, 2]
    # no cache: with one, transformers does not look for packed sequences and the examples would see each other
    out = model(input_ids=input_ids, position_ids=positions, use_cache=False)
    summed = cross_entropy_sum(out.logits, labels, ignore_index=IGNORE)
    return summed, (labels != IGNORE).sum(), out


def _provenance(data: RecordData) -> dict:
    m = data.manifest
    return {
        "digest": m["data_digest"],
        "manifest": str(data.path / "manifest.json"),
        "chat_template": m["chat_template"],
        "sources": [
            {"name": s["name"], "path": s["path"], "format": s["format"], "records": s["records"],
             "examples": s["examples"], "tokens": s["tokens"], "learned_tokens": s["learned_tokens"],
             "files": [{"path": f["path"], "sha256": f["sha256"], "examples": f["examples"], "tokens": f["tokens"]}
                       for f in s["files"]]}
            for s in m["sources"]
        ],
    }
