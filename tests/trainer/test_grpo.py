"""GRPO: group advantages and the clipped objective against hand-computed values, a few steps of a tiny
policy with rewards (figures in the history), resume continuity, two workers, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from sft_helpers import LIKES, NAMES, make_base, question
from trainer_helpers import tiny_config, run_two_workers

import forge_trainer
from forge_trainer.contract import ConfigError, DataError, RewardError
from forge_trainer.methods.grpo import clipped_loss, group_advantages

FRUIT = "(" + "|".join(sorted(set(LIKES.values()))) + ")"
REWARDS = [{"name": "fruit", "regex": {"must_match": [FRUIT]}},
           {"name": "right", "exact_match": {"column": "answer", "extract": FRUIT}, "weight": 2.0}]


def test_group_advantages_on_a_hand_made_case():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal -> 0
    s = math.sqrt(1 / 3) + 1e-4
    assert group_advantages(rewards, 4).tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0])
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_the_clipped_objective_and_kl_equal_hand_computed_values():
    """Two completions of two and one learned tokens; ratios inside and outside the clip range."""
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.9], [0.2, 0.9, 0.9]]))
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.4, 0.9, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.3, 0.9], [0.2, 0.9, 0.9]]))
    learned = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    eps, beta = 0.2, 0.1
    loss, kl, clipped = clipped_loss(logp, old, ref, adv, learned, eps, beta)
    # completion 1: ratios 1.0 and 1.5 (clipped to 1.2 for A > 0); KL of token 1: r = 0.25/0.5 -> 0.5 - ln 0.5 - 1
    kl1 = 0.5 - math.log(0.5) - 1
    c1 = ((-1.0 + beta * kl1) + (-1.2)) / 2
    # completion 2: ratio 0.5, A < 0: min(0.5 x -2, 0.8 x -2) = -1.6 -> loss 1.6; KL 0
    c2 = 1.6
    assert loss.item() == pytest.approx((c1 + c2) / 2, rel=1e-6)
    assert kl.item() == pytest.approx(kl1, rel=1e-6)
    assert clipped.item() == 2  # token 2 of completion 1 (ratio 1.5, A > 0) and completion 2 (0.5, A < 0)
    no_kl, _, _ = clipped_loss(logp, old, None, adv, learned, eps, 0.0)
    assert no_kl.item() == pytest.approx(((-1.0 - 1.2) / 2 + 1.6) / 2, rel=1e-6)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("bases"), "llama")


def write_prompts(path: Path, chat: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for n in NAMES:
        for i in range(2):
            q = question(n, i)
            lines.append({"prompt": [{"role": "user", "content": q}] if chat else q + "\n", "answer": LIKES[n],
                          "name": n})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def grpo_config(work: Path, base: Path, data: Path, settings: dict | None = None, **overrides):
    """The tiny trainer config as grpo of ``base`` on the prompts in ``data``; ``settings``: the method's."""
    defaults = {
        "method": {"kind": "grpo", "group_size": 4, "max_new_tokens": 8, "rewards": REWARDS, **(settings or {})},
        "model": {"base_path": str(base)}, "tokenizer": {"from_base": True},
        "data": {"sources": [{"name": "p", "path": str(data), "format": "jsonl", "prompt_field": "prompt"}]},
        "training__global_batch_sequences": 8, "training__micro_batch_sequences": 4, "training__warmup_steps": 0,
        "training__budget": {"max_steps": 4}, "checkpoint__interval_steps": 2,
    }
    return tiny_config(work, data, None, **{**defaults, **overrides})


def test_a_few_grpo_steps_report_the_reward_figures_and_resume_on_the_same_curve(base, tmp_path):
    """Two updates per sample (so the ratio moves and the old probabilities are kept), a KL penalty; a
    run resumed from its step-2 checkpoint samples and trains steps 3-4 exactly as the first run did."""
    data = write_prompts(tmp_path / "data" / "p.jsonl")
    cfg = grpo_config(tmp_path, base, data, {"updates_per_generation": 2, "beta": 0.1})
    first = forge_trainer.run(cfg)
    h = first.history
    assert [x["step"] for x in h] == [1, 2, 3, 4]
    for key in ("reward_mean", "reward_std", "reward_fruit_mean", "reward_right_mean", "completion_length",
                "zero_std_fraction", "generation_tokens_per_second"):
        assert key in h[0] and key in h[2], key
    assert "reward_mean" not in h[1]  # step 2 trains on step 1's sample
    assert 0 < h[0]["completion_length"] <= 8
    assert h[0]["kl"] == pytest.approx(0.0, abs=1e-6) and h[1]["kl"] > 0  # the policy moved from the reference
    assert "training_tokens_per_second" in h[1] and all(math.isfinite(x["loss"]) for x in h)
    assert (Path(cfg.output.dir) / "model.safetensors").exists()
    provenance = json.loads((Path(cfg.output.dir) / "provenance.json").read_text())
    assert provenance["method"] == "grpo" and provenance["data"]["prompts"] == 16
    assert provenance["data"]["columns"] == ["answer", "name"]

    again = forge_trainer.run(cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(
        update={"resume": str(Path(cfg.checkpoint.dir) / "step-00000002")})}))
    assert again.start_step == 2 and [x["step"] for x in again.history] == [3, 4]
    steps = {x["step"]: x for x in h}
    for x in again.history:
        for key in ("loss", "reward_mean", "kl", "completion_length"):
            if key in steps[x["step"]]:
                assert x[key] == pytest.approx(steps[x["step"]][key], rel=1e-5, abs=1e-7), (x["step"], key)


def test_chat_prompts_and_a_reward_function_from_a_file(base, tmp_path):
    """A TRL-style function gets chat completions and the records' columns; without std scaling."""
    data = write_prompts(tmp_path / "data" / "chat.jsonl", chat=True)
    (tmp_path / "rw.py").write_text(
        "def mentions_name(prompts, completions, name, **kwargs):\n"
        "    assert prompts[0][-1]['role'] == 'user' and completions[0][0]['role'] == 'assistant'\n"
        "    return [float(n in c[0]['content']) for c, n in zip(completions, name)]\n")
    rewards = [*REWARDS, {"name": "mentions", "function": f"{tmp_path / 'rw.py'}:mentions_name", "weight": 0.5}]
    cfg = grpo_config(tmp_path, base, data, {"rewards": rewards, "scale_rewards": False, "beta": 0.0},
                      training__budget={"max_steps": 2})
    summary = forge_trainer.run(cfg)
    first = summary.history[0]
    assert 0 <= first["reward_mentions_mean"] <= 1 and first["kl"] == 0.0  # no reference without beta


def test_a_reward_that_raises_fails_the_run_naming_it(base, tmp_path):
    data = write_prompts(tmp_path / "data" / "p.jsonl")
    (tmp_path / "rw.py").write_text("def broken(prompts, completions, **kw):\n    return [1.0] * (len(completions) - 1)\n")
    cfg = grpo_config(tmp_path, base, data, {"rewards": [{"name": "broken", "function": f"{tmp_path / 'rw.py'}:broken"}]})
    with pytest.raises(RewardError, match=r"reward 'broken' returned 7 scores for 8 completions"):
        forge_trainer.run(cfg)


@pytest.mark.parametrize("lines, error, message", [
    ([], DataError, r"the prompt set is empty"),
    ([{"question": "x"}], DataError, r"p.jsonl line 1: no string or list field 'prompt'"),
    ([{"prompt": "x " * 200}], DataError, r"line 1: the prompt is \d+ tokens; with method.max_new_tokens 8"),
])
def test_a_bad_prompt_set_is_refused(base, tmp_path, lines, error, message):
    data = tmp_path / "data" / "p.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(error, match=message):
        forge_trainer.run(grpo_config(tmp_path, base, data))


def test_a_reward_module_that_does_not_import_is_a_config_error(base, tmp_path):
    data = write_prompts(tmp_path / "data" / "p.jsonl")
    (tmp_path / "rw.py").write_text("import no_such_module\n")
    cfg = grpo_config(tmp_path, base, data, {"rewards": [{"name": "r", "function": f"{tmp_path / 'rw.py'}:f"}]})
    with pytest.raises(ConfigError, match=r"reward 'r': module .*rw.py does not import: ModuleNotFoundError"):
        forge_trainer.run(cfg)


@pytest.mark.parametrize("overrides, message", [
    ({"method": {"kind": "grpo", "rewards": REWARDS, "group_size": 3}}, "not a multiple of method.group_size 3"),
    ({"method": {"kind": "grpo", "rewards": []}}, "at least 1 item"),
    ({"method": {"kind": "grpo", "rewards": REWARDS, "max_new_tokens": 64}}, "leaves no room for the prompt"),
    ({"method": {"kind": "grpo", "rewards": REWARDS, "rollout": "vllm"}}, "in-process"),
    ({"method": {"kind": "grpo", "rewards": REWARDS + REWARDS[:1]}}, "names must be unique"),
    ({"method": {"kind": "sft"}}, "method sft needs records"),
    ({"method": "dpo"}, "a prompt alone is for methods grpo and online-dpo"),
    ({"training__lora": {}}, "training.lora is only for methods sft and dpo"),
])
def test_grpo_configuration_is_checked(base, tmp_path, overrides, message):
    data = write_prompts(tmp_path / "data" / "p.jsonl")
    with pytest.raises(ValidationError, match=message):
        grpo_config(tmp_path, base, data, **overrides)


# --------------------------------------------------------------------------- online-dpo
def test_online_dpo_pairs_the_best_and_worst_of_each_group():
    from forge_trainer.methods.online_dpo import best_and_worst

    best, worst, valid = best_and_worst(torch.tensor([0.0, 2.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0]), 4)
    assert best.tolist() == [1, 4] and worst.tolist() == [0, 4] and valid.tolist() == [True, False]


def test_a_few_online_dpo_steps(base, tmp_path):
    """The pair's loss starts at log 2 (policy == reference) and the reward figures are reported."""
    data = write_prompts(tmp_path / "data" / "p.jsonl")
    cfg = grpo_config(tmp_path, base, data, {"kind": "online-dpo", "beta": 0.5}, training__budget={"max_steps": 2})
    summary = forge_trainer.run(cfg)
    h = summary.history
    assert [x["step"] for x in h] == [1, 2]
    for x in h:
        assert {"reward_mean", "reward_fruit_mean", "zero_std_fraction"} <= set(x)
        if x["zero_std_fraction"] < 1:
            assert "reward_accuracy" in x
    if h[0]["zero_std_fraction"] < 1:
        assert h[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    with pytest.raises(ValidationError, match="must be even"):
        grpo_config(tmp_path, base, data, {"kind": "online-dpo"}, training__micro_batch_sequences=1,
                    training__global_batch_sequences=3)


@pytest.mark.slow
def test_two_workers_each_sample_their_share_of_the_prompts(base, tmp_path):
    """FSDP2 over two CPU workers (gloo): each rank generates for half of the step's prompts (the decoding
    steps kept in lockstep), scores them, and the figures are combined over both."""
    import re

    data = write_prompts(tmp_path / "data" / "p.jsonl")
    cfg = grpo_config(tmp_path, base, data, {"max_new_tokens": 4}, training__budget={"max_steps": 1})
    log = run_two_workers(cfg, tmp_path)
    steps = re.findall(r"\[rank 0\] step (\d+)/1 \| loss (-?[\d.]+) .* reward mean ([\d.]+) .* completion length ([\d.]+)", log)
    assert [int(s[0]) for s in steps] == [1]
    assert all(0 < float(s[3]) <= 4 for s in steps)
    assert (Path(cfg.output.dir) / "model.safetensors").exists()
