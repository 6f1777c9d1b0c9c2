"""TrainerConfig: validation, YAML round trip, and that the operator can import it without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from forge_trainer import defaults
from forge_trainer.config import ContinuedPretrainMethod, PretrainMethod, TrainerConfig, load_config

from trainer_helpers import tiny_config, write_config


def test_importing_the_config_does_not_import_torch():
    code = "import sys, forge_trainer, forge_trainer.config, forge_trainer.contract, forge_trainer.defaults; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_yaml_round_trip_keeps_every_value(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, training__grad_clip=None, metrics__port=None,
                      training__budget={"max_tokens": 10_000, "deadline": "2030-01-02T03:04:05"})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.training.grad_clip is None and again.metrics.port is None
    assert again.training.budget.deadline.tzinfo is not None  # naive deadlines are UTC


def test_json_is_accepted(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus)
    path = tmp_path / "c.json"
    path.write_text(cfg.model_dump_json())
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"method": "sft"}, "method sft needs model.base_path"),
        ({"method": {"kind": "dpo"}}, "method dpo needs model.base_path"),
        ({"method": "ppo"}, "Input tag 'ppo' found using 'kind' does not match any of the expected tags"),
        ({"training__seq_len": 256}, "training.seq_len 256 exceeds the model's context"),
        ({"training__global_batch_sequences": 10}, "not a multiple of micro_batch_sequences"),
        ({"model__base_path": "/models/x"}, "set exactly one of model.architecture or model.base_path"),
        ({"tokenizer__from_base": True}, "set exactly one of tokenizer.train"),
        ({"training__budget": {}}, "set at least one of training.budget"),
        ({"training__schedule": "cosine", "training__budget": {"deadline": "2030-01-01T00:00:00Z"}}, "needs training.budget.max_steps or max_tokens"),
        ({"data__validation": {"source": "nope"}}, "data.validation.source 'nope' is not one of"),
        ({"training__bogus": 1}, "Extra inputs are not permitted"),
        ({"model__architecture__num_attention_heads": 5}, "not a multiple of num_attention_heads"),
    ],
)
def test_invalid_configs_name_the_problem(tmp_path, corpus, override, message):
    with pytest.raises(ValidationError, match=message):
        tiny_config(tmp_path, corpus, **override)


def test_defaults_fill_a_minimal_config():
    cfg = TrainerConfig.model_validate({
        "model": {"architecture": {}},
        "data": {"sources": [{"name": "docs", "path": "/data", "format": "jsonl"}]},
    })
    assert cfg.data.sources[0].include_patterns == ["**/*.jsonl"]
    assert cfg.tokenizer.train.vocab_size == defaults.VOCAB_SIZE == 32000  # the API's default too
    assert cfg.training.precision == "auto"
    assert cfg.checkpoint.resume == "auto"
    assert cfg.termination_message_path == "/dev/termination-log"
    # derived defaults: filled in from the values they follow, unless set
    arch = cfg.model.architecture
    assert (arch.hidden_size, arch.intermediate_size, arch.moe_intermediate_size) == (256, 704, 352)
    assert cfg.training.min_lr == pytest.approx(cfg.training.lr / 10)
    assert cfg.data.validation.fraction == defaults.VALIDATION_FRACTION


def test_a_derived_default_follows_its_value_and_an_explicit_one_wins(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, model__architecture={"hidden_size": 96, "num_attention_heads": 4,
                                                             "num_experts_per_token": 4, "max_position_embeddings": 128},
                      training__lr=1e-3, training__min_lr=None)
    arch = cfg.model.architecture
    assert (arch.intermediate_size, arch.moe_intermediate_size) == (256, 64)
    assert cfg.training.min_lr == pytest.approx(1e-4)
    assert load_config(write_config(cfg, tmp_path / "c.yaml")) == cfg  # written out filled in, read back the same
    cfg = tiny_config(tmp_path, corpus, training__min_lr=0.0)
    assert cfg.training.min_lr == 0.0  # set, even to zero, is kept
    with pytest.raises(ValidationError, match="min_lr 0.01 exceeds lr"):
        tiny_config(tmp_path, corpus, training__lr=1e-3, training__min_lr=1e-2)


def test_the_method_is_a_kind_with_its_own_settings_or_the_kind_alone(tmp_path, corpus):
    short = tiny_config(tmp_path, corpus, method="pretrain")
    assert short.method == PretrainMethod() and short == tiny_config(tmp_path, corpus, method={"kind": "pretrain"})
    assert "method:\n  kind: pretrain\n" in short.to_yaml()
    base = tiny_config(tmp_path, corpus, method="continued-pretrain", model={"base_path": "/models/x"},
                       tokenizer={"from_base": True})
    assert base.method == ContinuedPretrainMethod()
    masked = tiny_config(tmp_path, corpus, method={"kind": "pretrain", "document_masking": True})
    assert masked.method.document_masking and not short.method.document_masking
    with pytest.raises(ValidationError, match="document_masking"):  # sft never attends across examples
        tiny_config(tmp_path, corpus, method={"kind": "sft", "document_masking": True}, model={"base_path": "/m"},
                    tokenizer={"from_base": True})
    with pytest.raises(ValidationError, match="does not match any of the expected tags: 'pretrain', 'continued-pretrain', 'sft'"):
        tiny_config(tmp_path, corpus, method={"kind": "ppo"})
    with pytest.raises(ValidationError, match="method continued-pretrain needs model.base_path"):
        tiny_config(tmp_path, corpus, method="continued-pretrain")
    with pytest.raises(ValidationError, match="method pretrain builds a new model"):
        tiny_config(tmp_path, corpus, model={"base_path": "/models/x"}, tokenizer={"from_base": True})


def test_every_method_kind_has_a_trainer(tmp_path, corpus):
    """The config's union and the methods' registry name the same kinds."""
    import typing

    from forge_trainer.config import MethodConfig
    from forge_trainer.methods import METHODS

    union = typing.get_args(MethodConfig)[0]
    kinds = {typing.get_args(member.model_fields["kind"].annotation)[0] for member in typing.get_args(union)}
    assert kinds == set(METHODS)
