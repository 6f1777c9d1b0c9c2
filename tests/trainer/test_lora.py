"""LoRA (training.lora, with peft) for sft and dpo on tiny bases made here: only the adapters train, a
run resumes exactly, the adapter export loads with peft on the base and the merged export equals base
+ adapter; dpo's precomputed reference is the base's; two FSDP2 workers train like one process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from sft_helpers import dpo_config, make_base, sft_config, write_preferences, write_records
from trainer_helpers import run_two_workers

import forge_trainer
from forge_trainer.contract import ConfigError
from forge_trainer.eval.model import load_model
from forge_trainer.methods.dpo import Dpo
from forge_trainer.models.build import build_model, hf_config
from forge_trainer.runtime.dist import Dist
from forge_trainer.runtime.signals import SigtermFlag

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {family: make_base(root, family) for family in ("llama", "qwen3")}


def _tensors(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / name))


def test_only_the_adapters_train_a_run_resumes_and_both_exports_agree(bases, tmp_path):
    """sft with adapters on q_proj and v_proj, exported as the adapter; a second run goes back to the
    step-4 checkpoint, trains steps 5-8 exactly as the first did and exports the merged model, which is
    the base plus B @ A x alpha / r in the adapted layers and the base, bit for bit, everywhere else."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_records(tmp_path / "data" / "chat.jsonl", "chat", 120)
    cfg = sft_config(tmp_path, bases["llama"], data.parent, checkpoint__interval_steps=4,
                     training__budget={"max_steps": 8}, training__eval_interval_steps=None, training__lr=1e-2,
                     training__lora={**LORA, "export": "adapter"})
    first = forge_trainer.run(cfg)
    assert first.history[-1]["loss"] < first.history[0]["loss"] - 0.1
    adapter = Path(cfg.output.dir)
    assert not (adapter / "model.safetensors").exists()
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], set(saved["target_modules"])) == (4, 8.0, {"q_proj", "v_proj"})
    assert saved["base_model_name_or_path"] == str(bases["llama"])
    weights = _tensors(adapter, "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # B starts at zero: it trained

    merged_out = tmp_path / "merged"
    again = forge_trainer.run(cfg.model_copy(update={
        "checkpoint": cfg.checkpoint.model_copy(update={"resume": str(Path(cfg.checkpoint.dir) / "step-00000004")}),
        "output": cfg.output.model_copy(update={"dir": str(merged_out)}),
        "training": cfg.training.model_copy(update={"lora": cfg.training.lora.model_copy(update={"export": "merged"})}),
    }))
    assert again.start_step == 4 and [h["step"] for h in again.history] == [5, 6, 7, 8]
    losses = {h["step"]: h["loss"] for h in first.history}
    for h in again.history:
        assert h["loss"] == pytest.approx(losses[h["step"]], rel=1e-5), h["step"]

    base, merged = _tensors(bases["llama"]), _tensors(merged_out)
    assert set(merged) == set(base)
    scale = 8.0 / 4
    for key, w in base.items():
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            stem = "base_model.model." + key.removesuffix(".weight")
            delta = weights[f"{stem}.lora_B.weight"] @ weights[f"{stem}.lora_A.weight"] * scale
            assert torch.allclose(merged[key], w + delta, atol=1e-5), key
            assert not torch.equal(merged[key], w), key
        else:
            assert torch.equal(merged[key], w), key  # frozen: not a bit changed

    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(merged_out).eval()(input_ids=ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["llama"]), adapter).eval()
        assert torch.allclose(plain, peft(input_ids=ids).logits, atol=1e-4)
        # transformers loads the adapter folder by itself too (base from adapter_config.json, through peft)
        assert torch.allclose(plain, AutoModelForCausalLM.from_pretrained(adapter).eval()(input_ids=ids).logits,
                              atol=1e-4)
        # the evaluator reads the last checkpoint (DCP, on one process) as that model: the adapters merged
        evaluated = load_model(str(Path(cfg.checkpoint.dir) / "step-00000008"), "model", device="cpu")
        assert torch.allclose(plain, evaluated.model(input_ids=ids).logits, atol=1e-4)


@pytest.mark.slow
def test_dpo_with_adapters_precomputes_the_bases_reference_and_learns_the_preference(bases, tmp_path):
    data = write_preferences(tmp_path / "data" / "p.jsonl", 96)
    cfg = dpo_config(tmp_path, bases["llama"], data.parent, training__lora={"r": 8, "alpha": 16.0},
                     training__lr=1e-2, training__budget={"max_steps": 8}, training__eval_interval_steps=None)
    d, stop = Dist(), SigtermFlag()

    def reference(config) -> torch.Tensor:
        method = Dpo(config)
        tok = method.prepare(d, stop).tokenizer
        model = build_model(config, hf_config(config, tok.vocab_size, tok.eos_id))
        method.start(model, torch.autocast("cpu", enabled=False), d)
        return method.reference

    with_adapters = reference(cfg)
    plain = reference(cfg.model_copy(update={"training": cfg.training.model_copy(update={"lora": None})}))
    assert torch.allclose(with_adapters, plain, atol=1e-6)  # the adapters start at zero: the reference is the base

    summary = forge_trainer.run(cfg)
    first, last = summary.history[0], summary.history[-1]
    assert last["reward_margin"] > first["reward_margin"] and last["reward_accuracy"] > 0.5, summary.history
    assert last["loss"] < first["loss"]
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(cfg.output.dir)).__name__ == "LlamaForCausalLM"


def test_lora_configuration_is_checked(bases, tmp_path):
    data = write_records(tmp_path / "data" / "chat.jsonl", "chat", 20)
    cfg = sft_config(tmp_path, bases["llama"], data.parent, training__lora={})
    assert (cfg.training.lora.r, cfg.training.lora.alpha, cfg.training.lora.export) == (16, 32.0, "merged")
    with pytest.raises(ValidationError, match=r"training.lora is only for methods sft and dpo \(method is "
                                              r"continued-pretrain\)"):
        sft_config(tmp_path, bases["llama"], tmp_path, method="continued-pretrain",
                   data={"sources": [{"name": "toy", "path": "/d"}]}, training__lora={})
    for bad in ({"r": 0}, {"dropout": 1.0}, {"export": "gguf"}, {"target_modules": []}, {"rank": 8}):
        with pytest.raises(ValidationError):
            sft_config(tmp_path, bases["llama"], data.parent, training__lora=bad)
    with pytest.raises(ConfigError, match=r"training.lora.target_modules \['wq'\]: .*wq"):
        forge_trainer.run(sft_config(tmp_path, bases["llama"], data.parent, training__lora={"target_modules": ["wq"]}))


def test_a_lora_adapter_is_not_a_base(bases, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    data = write_records(tmp_path / "data" / "chat.jsonl", "chat", 20)
    with pytest.raises(ConfigError, match="a LoRA adapter .* export it merged"):
        forge_trainer.run(sft_config(tmp_path, tmp_path / "adapter", data.parent))


@pytest.mark.slow
def test_two_workers_under_torchrun_train_adapters_like_one_process(bases, tmp_path):
    """FSDP2 over two CPU workers (gloo), each decoder layer sharded with its adapters inside (frozen and
    trainable parameters together): the loss curve is the single process's and the merged export loads."""
    data = write_records(tmp_path / "data" / "chat.jsonl", "chat", 120)
    over = dict(training__budget={"max_steps": 3}, training__eval_interval_steps=None, training__lr=1e-2,
                training__lora={**LORA, "dropout": 0.0})  # dropout draws other masks on two ranks
    single = forge_trainer.run(sft_config(tmp_path / "one", bases["qwen3"], data.parent, cache=tmp_path / "cache",
                                          **over))
    cfg = sft_config(tmp_path / "two", bases["qwen3"], data.parent, cache=tmp_path / "cache2", **over)
    log = run_two_workers(cfg, tmp_path)
    assert "LoRA: training" in log
    curve = {int(m[1]): float(m[2]) for m in re.finditer(r"\[rank 0\] step (\d+)/3 \| loss ([\d.]+)", log)}
    assert sorted(curve) == list(range(1, 4))
    for h in single.history:
        assert curve[h["step"]] == pytest.approx(h["loss"], abs=2e-4), h["step"]
    merged, one = _tensors(cfg.output.dir), _tensors(Path(tmp_path / "one" / "out"))
    for key in one:
        assert torch.allclose(merged[key], one[key], atol=1e-3), key
