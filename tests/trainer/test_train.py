"""The training loop in one process: learning, progress, export, MoE, continued pretraining, budgets."""

from __future__ import annotations

import json
import math
import re
import socket
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import read_termination, tiny_config, write_config

import forge_trainer
from forge_trainer.__main__ import main
from forge_trainer.contract import ExitCode
from forge_trainer.data.packed import TokenData, validation_indices
from forge_trainer.runtime.checkpoint import find_latest

PROGRESS_KEYS = {"step", "totalSteps", "tokensSeen", "tokenBudget", "percent", "loss", "learningRate", "gradNorm",
                 "tokensPerSecond", "mfu", "etaSeconds", "updatedAt", "lastCheckpoint", "methodMetrics"}


def test_loss_decreases_on_a_learnable_corpus(reference):
    _, summary, _ = reference
    losses = [h["loss"] for h in summary.history]
    assert len(losses) == 30
    assert losses[0] == pytest.approx(math.log(320), abs=0.3)  # random init: uniform over the vocabulary
    assert np.mean(losses[-5:]) < 0.55 * losses[0]
    assert summary.val_loss < 0.6 * losses[0]
    assert summary.status == "completed" and summary.reason == "max_steps" and summary.step == 30


def test_progress_is_reported_with_the_documented_keys(reference):
    cfg, summary, progress = reference
    assert len(progress) >= 3
    assert all(set(p.to_wire()) == PROGRESS_KEYS for p in progress)  # every key, null when unknown
    last = progress[-1].to_wire()
    assert last["step"] == 30 and last["totalSteps"] == 30 and last["percent"] == 100.0
    assert last["tokensSeen"] == 30 * 16 * 64 and last["etaSeconds"] == 0
    assert last["lastCheckpoint"]["step"] == 30 and Path(last["lastCheckpoint"]["path"]).is_dir()
    assert last["mfu"] is None  # CPU: no known peak
    assert last["tokensPerSecond"] > 0 and last["learningRate"] == pytest.approx(cfg.training.min_lr, rel=0.1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", last["updatedAt"])
    steps = [p.step for p in progress]
    assert steps == sorted(steps)


def test_checkpoints_are_kept_and_named(reference):
    cfg, _, _ = reference
    root = Path(cfg.checkpoint.dir)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000010", "step-00000020", "step-00000030"]
    assert (root / "latest").read_text().strip() == "step-00000030"
    assert find_latest(root) == root / "step-00000030"
    state = json.loads((root / "step-00000030" / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["tokens_seen"] == 30 * 1024 and state["loader"]["consumed"] == 480


def test_exported_model_loads_and_reproduces_the_validation_loss(reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, summary, _ = reference
    out = Path(cfg.output.dir)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.config._attn_implementation == "sdpa"
    provenance = json.loads((out / "provenance.json").read_text())
    data = TokenData(Path(provenance["data"]["manifest"]).parent, cfg)
    windows = torch.from_numpy(np.stack([data.val_window(i) for i in validation_indices(data, cfg.training)]))
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert loss == pytest.approx(summary.val_loss, rel=1e-4)
    assert provenance["final_val_loss"] == summary.val_loss
    # The exported tokenizer is the one the data was encoded with.
    text = (Path(cfg.data.sources[0].path) / "doc000.txt").read_text()[:500]
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text and tok.eos_token_id == data.manifest["eos_id"]


def test_provenance_records_data_tokenizer_config_and_versions(reference):
    cfg, summary, _ = reference
    provenance = json.loads((Path(cfg.output.dir) / "provenance.json").read_text())
    manifest = json.loads(Path(provenance["data"]["manifest"]).read_text())
    assert provenance["data"]["digest"] == manifest["data_digest"]
    assert provenance["tokenizer"]["digest"] == manifest["tokenizer_digest"]
    assert provenance["data"]["sources"][0]["files"] == [
        {"path": f["path"], "sha256": f["sha256"], "tokens": f["tokens"]} for f in manifest["sources"][0]["files"]
    ]
    assert provenance["config"] == cfg.model_dump(mode="json")
    assert provenance["world_size"] == 1 and len(provenance["hostnames"]) == 1
    assert set(provenance["versions"]) >= {"python", "torch", "transformers"}
    assert provenance["final_train_loss"] == summary.train_loss and provenance["steps"] == 30
    assert provenance["base_model"] is None and provenance["started_at"] <= provenance["ended_at"]


def test_sample_completes_a_prompt(reference):
    cfg, _, _ = reference
    prompt = "bob has 5 figs. bob eats"
    greedy = forge_trainer.sample(cfg.output.dir, prompt, max_new_tokens=4)
    assert greedy.startswith(" one."), greedy  # what always follows in the corpus
    assert greedy == forge_trainer.sample(cfg.output.dir, prompt, max_new_tokens=4)
    sampled = forge_trainer.sample(cfg.output.dir, "bob", max_new_tokens=8, top_k=5, seed=1)
    assert isinstance(sampled, str) and sampled


def test_termination_message_summarises_the_run(reference):
    cfg, summary, progress = reference
    message = json.loads(Path(cfg.termination_message_path).read_text()) if Path(cfg.termination_message_path).exists() else None
    # run() leaves the termination message to main(); the summary carries the same fields
    assert message is None
    message = summary.to_message().to_wire()
    assert message["status"] == "completed" and message["valLoss"] == summary.val_loss and message["exitCode"] == 0
    # the operator reads it as the final progress: the progress report's keys, with the same values
    last = progress[-1].to_wire()
    assert {k: message[k] for k in ("step", "totalSteps", "tokensSeen", "lastCheckpoint")} == {
        k: last[k] for k in ("step", "totalSteps", "tokensSeen", "lastCheckpoint")}
    assert message["totalSteps"] == 30 and set(message["lastCheckpoint"]) == {"step", "path", "time"}
    assert message["lastCheckpoint"]["path"] == message["checkpoint"]


def test_each_nodes_first_process_writes_the_summary(tmp_path, corpus, shared_cache, monkeypatch):
    """Not only global rank 0: the first process of every node (pod) writes the termination message."""
    monkeypatch.setenv("RANK", "1")  # node 1 of a multi-node run (WORLD_SIZE unset: the process trains alone)
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = tiny_config(tmp_path, corpus, shared_cache, training__budget={"max_steps": 2}, checkpoint__interval_steps=None)
    assert main(["--config", str(write_config(cfg, tmp_path / "config.yaml"))]) == ExitCode.OK
    message = read_termination(cfg)
    assert message["status"] == "completed" and message["exitCode"] == ExitCode.OK
    assert message["step"] == message["totalSteps"] == 2 and message["lastCheckpoint"]["step"] == 2


def test_a_finished_training_run_again_reports_its_final_numbers(tmp_path, corpus, shared_cache):
    """Resumed at its budget there is nothing to train: the same step, losses and checkpoint, and the export."""
    # the step-4 checkpoint is written before the final evaluation, so it holds step 3's validation loss
    cfg = tiny_config(tmp_path, corpus, shared_cache, training__budget={"max_steps": 4}, training__eval_interval_steps=3,
                      checkpoint__interval_steps=2)
    first = forge_trainer.run(cfg)
    first_log = training_log(cfg)
    saved = json.loads((Path(cfg.checkpoint.dir) / "step-00000004" / "trainer_state.json").read_text())
    assert saved["val_loss"] != pytest.approx(first.val_loss, rel=1e-6)

    again = forge_trainer.run(cfg)
    assert again.status == "completed" and again.reason == "max_steps" and again.step == 4 and again.history == []
    assert again.train_loss == pytest.approx(first.train_loss, rel=1e-6)
    assert again.val_loss == pytest.approx(first.val_loss, rel=1e-6)
    assert again.start_step == 4 and first.start_step == 0
    assert again.last_checkpoint == first.last_checkpoint and again.checkpoint == first.checkpoint
    assert again.to_message().last_checkpoint.step == 4 and again.to_message().total_steps == 4
    provenance = json.loads((Path(cfg.output.dir) / "provenance.json").read_text())
    assert provenance["steps"] == 4 and provenance["final_val_loss"] == again.val_loss
    assert provenance["final_train_loss"] == again.train_loss
    # the export's training log: the curve of the whole line of runs, each step's loss and evaluation once
    again_log = training_log(cfg)
    assert [(h["step"], *h) for h in again_log] == [(h["step"], *h) for h in first_log] == [
        (1, "step", "loss"), (2, "step", "loss"), (3, "step", "loss"), (3, "step", "val_loss"), (4, "step", "loss"),
        (4, "step", "val_loss")]
    assert [h.get("loss", h.get("val_loss")) for h in again_log] == pytest.approx(
        [h.get("loss", h.get("val_loss")) for h in first_log], rel=1e-6)
    assert again_log[-1]["val_loss"] == pytest.approx(again.val_loss, rel=1e-6)


def training_log(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.output.dir) / "training_log.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_metrics_are_served_during_the_run(tmp_path, corpus, shared_cache):
    port = _free_port()
    cfg = tiny_config(tmp_path, corpus, shared_cache, metrics__port=port, training__budget={"max_steps": 4},
                      checkpoint__interval_steps=None)
    scraped = []

    def scrape(progress):
        if not scraped:
            scraped.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())

    forge_trainer.run(cfg, on_progress=scrape)
    text = scraped[0]
    for name in ["forge_trainer_step", "forge_trainer_tokens_seen_total", "forge_trainer_loss", "forge_trainer_learning_rate",
                 "forge_trainer_grad_norm", "forge_trainer_tokens_per_second", "forge_trainer_mfu", "forge_trainer_eta_seconds"]:
        assert re.search(rf"^{name} [0-9.e+-]+$", text, re.M), name
    assert float(re.search(r"^forge_trainer_step (\S+)$", text, re.M).group(1)) >= 1
    with pytest.raises(OSError):  # the server stops with the run
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_moe_trains_and_its_router_balances(tmp_path, corpus, shared_cache):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path, corpus, shared_cache, training__budget={"max_steps": 30}, checkpoint__interval_steps=None,
                      model__architecture={"family": "moe", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                           "num_experts": 8, "num_experts_per_token": 2, "moe_intermediate_size": 64,
                                           "max_position_embeddings": 128, "router_aux_loss_coef": 0.1})
    summary = forge_trainer.run(cfg)
    losses = [h["loss"] for h in summary.history]
    aux = [h["aux_loss"] for h in summary.history]
    assert np.mean(losses[-5:]) < 0.6 * losses[0]
    # Switch-style aux loss: top_k (= 2) when the load is perfectly balanced, up to 8 when collapsed.
    assert np.mean(aux[-10:]) < 2.03 and np.mean(aux[-10:]) < max(aux)
    model = AutoModelForCausalLM.from_pretrained(cfg.output.dir, local_files_only=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    # the shared cache holds other tests' datasets too: this run's has its sources
    names = [src.name for src in cfg.data.sources]
    data = TokenData(next(m.parent for m in (Path(cfg.cache_dir) / "tokens").glob("*/manifest.json")
                          if [s["name"] for s in json.loads(m.read_text())["sources"]] == names), cfg)
    windows = torch.from_numpy(np.stack([data.val_window(i) for i in range(min(16, data.val_windows))]))
    with torch.no_grad():
        out = model(input_ids=windows[:, :-1], output_router_logits=True)
    for layer_logits in out.router_logits:
        load = torch.bincount(layer_logits.topk(2, dim=-1).indices.flatten(), minlength=8).float()
        load /= load.sum()
        entropy = -(load * load.clamp_min(1e-12).log()).sum().item() / math.log(8)
        assert entropy > 0.85 and load.max() < 2.5 / 8, load
    # loaded, its loss is the cross-entropy the trainer validated with (no router term added)
    val = torch.from_numpy(np.stack([data.val_window(i) for i in validation_indices(data, cfg.training)]))
    with torch.no_grad():
        loss = model(input_ids=val, labels=val).loss.item()  # shifted inside: the same targets
    assert loss == pytest.approx(summary.val_loss, rel=1e-4)


def test_continued_pretraining_starts_from_the_base_weights(reference, tmp_path, corpus):
    base_cfg, base_summary, _ = reference
    cfg = tiny_config(tmp_path, corpus, method="continued-pretrain", model={"base_path": base_cfg.output.dir},
                      tokenizer={"from_base": True}, training__budget={"max_steps": 3}, training__lr=1e-4, training__min_lr=1e-5,
                      training__warmup_steps=0, checkpoint__interval_steps=None)
    summary = forge_trainer.run(cfg)
    assert summary.history[0]["loss"] < base_summary.history[0]["loss"] - 1.5  # not a random init
    provenance = json.loads((Path(cfg.output.dir) / "provenance.json").read_text())
    assert provenance["base_model"] == base_cfg.output.dir and provenance["method"] == "continued-pretrain"
    base_provenance = json.loads((Path(base_cfg.output.dir) / "provenance.json").read_text())
    assert provenance["tokenizer"]["digest"] == base_provenance["tokenizer"]["digest"]


def test_token_budget_and_deadline_end_the_run_gracefully(tmp_path, corpus, shared_cache):
    by_tokens = forge_trainer.run(tiny_config(tmp_path / "t", corpus, shared_cache, training__budget={"max_tokens": 5000},
                                              checkpoint__interval_steps=None))
    assert (by_tokens.reason, by_tokens.step, by_tokens.tokens_seen) == ("max_tokens", 5, 5 * 1024)
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    cfg = tiny_config(tmp_path / "d", corpus, shared_cache, training__budget={"deadline": past.isoformat()},
                      training__schedule="constant", checkpoint__interval_steps=None)
    by_deadline = forge_trainer.run(cfg)
    assert by_deadline.reason == "deadline" and by_deadline.status == "completed"
    assert (Path(cfg.output.dir) / "model.safetensors").exists()  # still checkpointed and exported
    assert find_latest(cfg.checkpoint.dir) is not None


def test_bf16_precision_trains_under_autocast(tmp_path, corpus, shared_cache):
    cfg = tiny_config(tmp_path, corpus, shared_cache, training__precision="bf16", training__budget={"max_steps": 6},
                      checkpoint__interval_steps=None)
    summary = forge_trainer.run(cfg)
    losses = [h["loss"] for h in summary.history]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    # Master weights stay fp32; autocast only changes the compute dtype.
    from safetensors import safe_open

    with safe_open(str(Path(cfg.output.dir) / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path, corpus, shared_cache, reference):
    _, eager, _ = reference
    cfg = tiny_config(tmp_path, corpus, shared_cache, training__compile=True, training__budget={"max_steps": 30},
                      checkpoint__interval_steps=None, training__eval_interval_steps=None)
    compiled = forge_trainer.run(cfg)
    for a, b in zip(compiled.history[:10], eager.history[:10]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
