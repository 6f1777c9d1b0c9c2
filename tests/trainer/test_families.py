"""Bases of the families the trainer fine-tunes (Llama, Mistral, Qwen3, Qwen3-MoE, Mixtral): tiny
random-weight folders made here load, train a few sft steps and export in their own family's format,
which `transformers` loads; a folder that is not a causal LM is refused with a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sft_helpers import FAMILIES, make_base, sft_config, write_records

import forge_trainer
from forge_trainer.contract import ConfigError


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("records") / "chat.jsonl", "chat", 24).parent


@pytest.mark.parametrize("family", FAMILIES)
def test_a_base_of_each_family_fine_tunes_and_exports_in_its_format(family, records, tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_base(tmp_path, family)
    cfg = sft_config(tmp_path, base, records, training__budget={"max_steps": 2}, training__eval_interval_steps=None,
                     training__global_batch_sequences=4, training__warmup_steps=0, checkpoint__interval_steps=None,
                     data__validation={"fraction": 0.0})
    summary = forge_trainer.run(cfg)
    assert summary.step == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in summary.history)

    out = Path(cfg.output.dir)
    before, after = json.loads((base / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert (after["model_type"], after["architectures"]) == (before["model_type"], before["architectures"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == before["architectures"][0]
    assert not getattr(model.config, "output_router_logits", False)  # the router's loss was a training term
    trained, original = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert set(trained) == set(original)
    assert any(not torch.equal(trained[k], original[k]) for k in original)  # it trained
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[-1] == before["vocab_size"] and torch.isfinite(logits).all()


def test_a_folder_that_is_not_a_causal_lm_is_refused(records, tmp_path):
    from transformers import BertConfig, T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2).save_pretrained(tmp_path / "t5")
    encoder = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    encoder.architectures = ["BertModel"]
    encoder.save_pretrained(tmp_path / "bert")
    for folder, what in (("t5", "model_type 't5'"), ("bert", "model_type 'bert', architectures ['BertModel']")):
        with pytest.raises(ConfigError) as err:
            forge_trainer.run(sft_config(tmp_path, tmp_path / folder, records))
        assert f"model.base_path {tmp_path / folder}: not a causal language model ({what}" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        forge_trainer.run(sft_config(tmp_path, tmp_path / "empty", records))
