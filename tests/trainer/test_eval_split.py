"""Multi-GPU evaluation without GPUs: the device map of a model split across N GPUs (planned on the meta
device), and the suites on a model dispatched over such a map whose devices are all the CPU, which must
score as the whole model does."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes
from transformers import AutoModelForCausalLM, LlamaConfig

from forge_trainer.contract import ConfigError
from forge_trainer.eval.config import EvalConfig, SuiteConfig
from forge_trainer.eval.model import device_map, load_model, split_model
from forge_trainer.eval.suites import SCORERS

GIB = 2**30


def meta_model(layers: int, tied: bool = False, **kw):
    cfg = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=tied, **kw)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("model", [
    dict(layers=8, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=320),
    dict(layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000),  # 7B
    dict(layers=12, tied=True, hidden_size=256, intermediate_size=512, num_attention_heads=4, vocab_size=4096),
], ids=["tiny", "7b", "tied"])
def test_every_gpu_gets_whole_layers_balanced_within_one_layer(model, devices):
    m = meta_model(**model)
    placed = device_map(m, devices, 80 * GIB)
    layers = [f"model.layers.{i}" for i in range(m.config.num_hidden_layers)]
    assert set(placed.values()) == set(range(devices))
    assert all(name in placed for name in layers)  # a decoder layer is never split
    on = [placed[name] for name in layers]
    assert on == sorted(on) and set(on) == set(range(devices))  # every GPU runs a run of layers, in order
    assert placed["model.embed_tokens"] == 0 and placed["model.norm"] == devices - 1
    # the head on the last GPU; a head tied to the embedding (one tensor) beside it on the first
    assert placed["lm_head"] == (0 if m.config.tie_word_embeddings else devices - 1)
    sizes = compute_module_sizes(m)
    held = [sum(sizes[n] for n, d in placed.items() if d == i) for i in range(devices)]
    mean, layer = sizes[""] / devices, sizes[layers[0]]
    assert all(abs(h - mean) <= layer for h in held), (held, layer)


def test_a_model_too_large_for_its_gpus_is_refused_with_its_size():
    with pytest.raises(ConfigError, match=r"model /x: 25\.\d GiB of float32 weights do not fit in 2 GPUs with 10\.0 GiB"):
        device_map(meta_model(32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32), 2, 10 * GIB,
                   "model /x")


def test_more_gpus_than_visible_are_refused(models):
    with pytest.raises(ConfigError, match=r"model .*: 64 GPUs requested, \d+ visible"):
        load_model(models["strong"].output_dir, "model", device="cuda", gpus=64)
    with pytest.raises(ValueError, match="gpus: the evaluation runs on the CPU"):
        EvalConfig(model_path=".", output_dir=".", device="cpu", gpus=2,
                   suites=[SuiteConfig(name="mc", type="multiple-choice", path=".")])


def _scores(lm, suites):
    torch.manual_seed(0)
    return {s.name: SCORERS[s.type](lm, s, 4, lambda n: None).metrics for s in suites}


@pytest.mark.parametrize("source", ["export", "checkpoint"])
def test_a_model_split_by_the_device_map_scores_as_the_whole_model(models, source):
    path = models["strong"].output_dir if source == "export" else str(models["work"] / "strong" / "ckpt")
    suites = [SuiteConfig(name="heldout", type="perplexity", path=str(models["heldout"]), format="text", seq_len=64),
              SuiteConfig(name="mc", type="multiple-choice", path=str(models["mc"]), max_samples=16),
              SuiteConfig(name="em", type="exact-match", path=str(models["em"]), max_samples=8, max_new_tokens=6)]
    whole = load_model(path, "model", device="cpu")
    split = load_model(path, "model", device="cpu")
    placed = device_map(split.model, 2, GIB)
    assert placed["model.layers.0"] == 0 and placed["model.layers.1"] == 1  # the two layers on two devices
    split.device = split_model(split.model, {name: "cpu" for name in placed})  # the same plan, every device the CPU
    assert hasattr(split.model.model.layers[1], "_hf_hook")  # dispatched: each block runs through its hook
    want, got = _scores(whole, suites), _scores(split, suites)
    for suite, metrics in want.items():
        for metric, value in metrics.items():
            assert got[suite][metric] == pytest.approx(value, abs=1e-5), (suite, metric)
