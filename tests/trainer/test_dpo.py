"""Direct preference optimisation (method dpo) on the tiny Llama and Qwen3 bases of sft_helpers: the
loss by hand, pairs packed without seeing each other, a frozen reference, learning a toy preference,
resuming, bad records."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sft_helpers import DONT_KNOW, dpo_config, make_base, preference, write_preferences
from trainer_helpers import run_trainer, write_config, run_two_workers

import forge_trainer
from forge_trainer.contract import DataError, ExitCode
from forge_trainer.data.records import ChatRenderer, ExampleEncoder, _Examples, packed_row
from forge_trainer.data.tokenizer import TextTokenizer
from forge_trainer.methods import METHODS, build_method
from forge_trainer.methods.dpo import Dpo, answer_logps
from forge_trainer.runtime.dist import Dist


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {family: make_base(root, family) for family in ("llama", "qwen3")}


def _method(tmp_path, base, **method) -> Dpo:
    return build_method(dpo_config(tmp_path, base, tmp_path, method={"kind": "dpo", **method}))


@pytest.mark.parametrize("loss_type, expected", [
    # h = (-3 - -5) - (-4 - -4) = 2; -log sigmoid(0.1 x 2)
    ("sigmoid", math.log1p(math.exp(-0.2))),
    # per-token means: policy -3/2 - -5/4 = -0.25, reference -4/2 - -4/4 = -1; h = 0.75; (h - 1/(2 x 0.1))^2
    ("ipo", (0.75 - 5.0) ** 2),
])
def test_the_dpo_loss_equals_the_hand_computed_value(bases, tmp_path, loss_type, expected):
    method = _method(tmp_path, bases["llama"], beta=0.1, loss_type=loss_type)
    method.reference = torch.tensor([[0.0, 0.0], [-4.0, -4.0]], dtype=torch.float64)  # pair 1's
    keys, sums, counts = torch.tensor([2, 3]), torch.tensor([-3.0, -5.0]), torch.tensor([2.0, 4.0])
    losses, metrics = method._pair_losses(keys, sums, counts)
    assert losses.tolist() == pytest.approx([expected])
    accuracy, margin, chosen, rejected = metrics.tolist()
    rewards = [0.1 * (-3 + 4), 0.1 * (-5 + 4)] if loss_type == "sigmoid" else [0.1 * (-1.5 + 2), 0.1 * (-1.25 + 1)]
    assert (accuracy, chosen, rejected) == (1.0, -3.0, -5.0)
    assert margin == pytest.approx(rewards[0] - rewards[1])


@pytest.mark.parametrize("family, chat", [("llama", False), ("qwen3", True)])
def test_packed_pairs_score_each_answer_as_it_scores_alone(bases, tmp_path, family, chat):
    """The summed log-probability of each answer in a row of two packed pairs is the one computed on
    the prompt + answer alone, and only the answer (with its end marker) is scored."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bases[family], attn_implementation="sdpa", dtype=torch.float32).eval()
    tok = TextTokenizer.from_pretrained(bases[family])
    src = dpo_config(tmp_path, bases[family], tmp_path).data.sources[0]
    encoder = ExampleEncoder(tok, ChatRenderer(tok))
    rng = random.Random(5)
    records = [preference(rng, chat) for _ in range(2)]
    examples = [e for r in records for e in encoder.encode_pair(src, r, "x")]
    offsets = np.cumsum([0] + [len(ids) for ids, _ in examples])
    ex = _Examples(np.concatenate([ids for ids, _ in examples]), np.concatenate([m for _, m in examples]).astype(np.uint8),
                   np.array([[offsets[i], len(e[0]), 0, i // 2 + 1] for i, e in enumerate(examples)]), group=2, base=7)
    row = packed_row(ex, np.array([0, 1]), int(offsets[-1]) + 3, tok.eos_id)
    with torch.no_grad():
        keys, sums, counts = answer_logps(model, torch.from_numpy(row[None]))
    assert keys.tolist() == [14, 15, 16, 17]  # pairs 7 and 8 (base 7), chosen then rejected
    assert (row[3, -3:] == -1).all() and set(row[3][row[1] == -100].tolist()) == {-1}  # padding, context: none
    for (ids, mask), got, n in zip(examples, sums.tolist(), counts.tolist()):
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(ids[1:])
        learned = torch.tensor(mask[1:], dtype=torch.bool)
        alone = logp[torch.arange(len(targets)), targets][learned].sum().item()
        assert n == learned.sum().item() and got == pytest.approx(alone, abs=1e-4)
    if chat:  # the answer after a conversation: only the last assistant turn is learned
        learned = [i for i, m in zip(examples[0][0], examples[0][1]) if m]
        assert tok.tok.decode(learned, skip_special_tokens=False) == records[0]["chosen"] + "<|im_end|>\n"


def test_no_gradient_reaches_the_reference(bases, tmp_path):
    """The reference log-probabilities are constants computed once from the starting model: training
    steps leave them as they were, they take no part in the graph, and they equal a fresh computation."""
    from forge_trainer.models.build import build_model, hf_config
    from forge_trainer.runtime.signals import SigtermFlag

    data = write_preferences(tmp_path / "data" / "p.jsonl", 40)
    cfg = dpo_config(tmp_path, bases["llama"], data.parent)
    d = Dist()  # one process, no process group: the model stays a plain module
    method = build_method(cfg)
    tok = method.prepare(d, SigtermFlag()).tokenizer
    model = build_model(cfg, hf_config(cfg, tok.vocab_size, tok.eos_id))
    method.start(model, torch.autocast("cpu", enabled=False), d)
    before = method.reference.clone()
    assert not before.requires_grad and before.shape == (40, 2) and (before < 0).all()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = method.batches()
    for _ in range(3):
        loss = method.loss(model, torch.as_tensor(loader.next_step(4, 0, 1)))
        assert loss.value.grad_fn is not None and method.reference.grad is None
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(method.reference, before)  # untouched by the steps
    method.start(model, torch.autocast("cpu", enabled=False), d)  # the trained model would give other values
    assert not torch.allclose(method.reference, before)


def _held_out_accuracy(trained, base, records: list[dict], family_base: Path) -> float:
    """The share of held-out pairs whose chosen answer has the larger reward beta x log(pi / pi_ref)."""
    from transformers import AutoModelForCausalLM

    tok = TextTokenizer.from_pretrained(family_base)
    cfg = dpo_config(Path("/w"), family_base, Path("/d"))
    encoder = ExampleEncoder(tok, ChatRenderer(tok))
    examples = [e for r in records for e in encoder.encode_pair(cfg.data.sources[0], r, "held")]
    offsets = np.cumsum([0] + [len(ids) for ids, _ in examples])
    ex = _Examples(np.concatenate([ids for ids, _ in examples]), np.concatenate([m for _, m in examples]).astype(np.uint8),
                   np.array([[offsets[i], len(e[0]), 0, 0] for i, e in enumerate(examples)]), group=2)
    rows = torch.from_numpy(np.stack([packed_row(ex, np.array([u]), 128, tok.eos_id) for u in range(len(records))]))
    scores = []
    for folder in (trained, base):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            scores.append(answer_logps(model, rows)[1].view(-1, 2))
    reward = scores[0] - scores[1]
    return (reward[:, 0] > reward[:, 1]).float().mean().item()


def test_dpo_raises_held_out_reward_accuracy_on_a_toy_preference(bases, tmp_path):
    """Right facts preferred to wrong ones or to "i do not know": after 30 steps the trained model's
    implicit reward ranks the chosen answer first on most held-out pairs, and the step metrics say so."""
    data = write_preferences(tmp_path / "data" / "train.jsonl", 240, seed=0)
    held = [json.loads(x) for x in write_preferences(tmp_path / "held.jsonl", 60, seed=99).read_text().splitlines()]
    cfg = dpo_config(tmp_path, bases["llama"], data.parent, training__budget={"max_steps": 30},
                     training__eval_interval_steps=None)
    summary = forge_trainer.run(cfg)
    accuracy = _held_out_accuracy(cfg.output.dir, bases["llama"], held, bases["llama"])
    assert accuracy >= 0.8, accuracy
    first, last = summary.history[0], summary.history[-1]
    assert set(first) >= {"loss", "reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected"}
    assert first["loss"] == pytest.approx(math.log(2), abs=0.02)  # policy == reference at the start
    assert last["loss"] < first["loss"] - 0.2 and last["reward_margin"] > 0.2 and last["reward_accuracy"] > 0.8
    assert summary.val_loss < math.log(2) - 0.2
    provenance = json.loads((Path(cfg.output.dir) / "provenance.json").read_text())
    assert provenance["method"] == "dpo" and provenance["data"]["sources"][0]["examples"] == 240


def test_resuming_from_a_checkpoint_continues_the_same_curve(bases, tmp_path):
    """Chat prompts on the Qwen3 base, ipo: a run resumed from its step-6 checkpoint recomputes the same
    reference from the base and trains steps 7-12 exactly as the first run did."""
    data = write_preferences(tmp_path / "data" / "chat.jsonl", 120, chat=True)
    cfg = dpo_config(tmp_path, bases["qwen3"], data.parent, checkpoint__interval_steps=6, training__seq_len=256,
                     method={"kind": "dpo", "beta": 0.5, "loss_type": "ipo"})
    first = forge_trainer.run(cfg)
    again = forge_trainer.run(cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(
        update={"resume": str(Path(cfg.checkpoint.dir) / "step-00000006")})}))
    assert again.start_step == 6 and again.step == 12
    steps = {h["step"]: h for h in first.history}
    assert [h["step"] for h in again.history] == list(range(7, 13))
    for h in again.history:
        for key in ("loss", "reward_margin", "logp_chosen"):
            assert h[key] == pytest.approx(steps[h["step"]][key], rel=1e-5, abs=1e-6), (h["step"], key)
    assert first.history[-1]["loss"] < first.history[0]["loss"]


# --------------------------------------------------------------------------- bad input
def _bad(tmp_path, bases, lines: list, **overrides) -> str:
    path = tmp_path / "data" / "bad.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    good = write_preferences(tmp_path / "good.jsonl", 5).read_text().splitlines()
    path.write_text("\n".join(good + [x if isinstance(x, str) else json.dumps(x) for x in lines]) + "\n")
    with pytest.raises(DataError) as err:
        forge_trainer.run(dpo_config(tmp_path, bases["llama"], path.parent, **overrides))
    return str(err.value)


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "hi", "chosen": ', "bad.jsonl line 6: invalid JSON"),
    ({"prompt": "hi\n", "chosen": "yes.", "rejected": "yes."},
     "bad.jsonl line 6: 'chosen' and 'rejected' are the same answer (nothing to prefer)"),
    ({"prompt": "hi\n", "chosen": "yes."}, "bad.jsonl line 6: no string field 'rejected'"),
    ({"chosen": "yes.", "rejected": "no."}, "bad.jsonl line 6: no string or list field 'prompt'"),
    ({"prompt": "", "chosen": "y", "rejected": "n"}, "bad.jsonl line 6: 'prompt' is empty"),
    ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "y", "rejected": "n"},
     "bad.jsonl line 6: prompt[0].role 'robot' is not one of system, user, assistant"),
])
def test_a_bad_preference_record_is_named_by_file_and_line(bases, tmp_path, line, expected):
    assert expected in _bad(tmp_path, bases, [line])


def test_a_pair_longer_than_the_sequence_is_refused_not_cut(bases, tmp_path):
    long = {"prompt": "what does bob like? " * 30 + "\n", "chosen": "figs.", "rejected": DONT_KNOW}
    message = _bad(tmp_path, bases, [long])
    assert "bad.jsonl line 6: the pair (prompt + chosen and prompt + rejected, trained as one sequence) has" in message
    assert "more than training.seq_len 128 (1 of the source's 6 pairs are)" in message


def test_a_bad_pair_exits_65_with_one_line(bases, tmp_path):
    path = write_preferences(tmp_path / "data" / "a.jsonl", 3)
    path.write_text(path.read_text() + '{"prompt": "q\\n", "chosen": "same", "rejected": "same"}\n')
    proc = run_trainer(write_config(dpo_config(tmp_path, bases["llama"], path.parent), tmp_path / "config.yaml"))
    assert proc.returncode == ExitCode.DATA_ERROR, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"forge-trainer: data error: data.sources[0].path {path.parent}: a.jsonl line 4: "
        "'chosen' and 'rejected' are the same answer (nothing to prefer)")


def test_dpo_configuration_is_checked(bases, tmp_path):
    cfg = dpo_config(tmp_path, bases["llama"], tmp_path)
    assert METHODS["dpo"] is Dpo and cfg.method.beta == 0.1 and cfg.method.loss_type == "sigmoid"
    assert dpo_config(tmp_path, bases["llama"], tmp_path, method="dpo").method.beta == 0.1
    with pytest.raises(ValidationError, match="method dpo needs model.base_path"):
        dpo_config(tmp_path, bases["llama"], tmp_path, model={"architecture": {}}, tokenizer={"path": "/t"})
    with pytest.raises(ValidationError, match=r"method dpo needs preference records: data sources \['toy'\]"):
        dpo_config(tmp_path, bases["llama"], tmp_path, data={"sources": [
            {"name": "toy", "path": "/d", "format": "jsonl", "prompt_field": "p", "completion_field": "c"}]})
    with pytest.raises(ValidationError, match="no completion_field or messages_field"):
        dpo_config(tmp_path, bases["llama"], tmp_path, data={"sources": [
            {"name": "toy", "path": "/d", "format": "jsonl", "messages_field": "m", "chosen_field": "c",
             "rejected_field": "r"}]})
    with pytest.raises(ValidationError, match="chosen_field and rejected_field go together"):
        dpo_config(tmp_path, bases["llama"], tmp_path, data={"sources": [
            {"name": "toy", "path": "/d", "format": "jsonl", "prompt_field": "p", "chosen_field": "c"}]})
    with pytest.raises(ValidationError, match="use tokenizer.from_base"):
        dpo_config(tmp_path, bases["llama"], tmp_path, tokenizer={"train": {}})
    with pytest.raises(ValidationError, match="loss_type"):
        dpo_config(tmp_path, bases["llama"], tmp_path, method={"kind": "dpo", "loss_type": "hinge"})
    with pytest.raises(ValidationError, match="are for methods sft, dpo, grpo and online-dpo"):
        dpo_config(tmp_path, bases["llama"], tmp_path, method="continued-pretrain")


@pytest.mark.slow
def test_two_workers_under_torchrun_train_like_one_process(bases, tmp_path):
    """FSDP2 over two CPU workers (gloo): each computes the reference of its share of the pairs, and the
    loss and reward curves are the single process's."""
    import re

    data = write_preferences(tmp_path / "data" / "p.jsonl", 120)
    single = forge_trainer.run(dpo_config(tmp_path / "one", bases["llama"], data.parent, cache=tmp_path / "cache",
                                          training__budget={"max_steps": 6}))
    cfg = dpo_config(tmp_path / "two", bases["llama"], data.parent, cache=tmp_path / "cache2",
                     training__budget={"max_steps": 6})
    log = run_two_workers(cfg, tmp_path)
    pattern = r"\[rank 0\] step (\d+)/6 \| loss ([\d.]+) .* reward accuracy ([\d.]+) \| reward margin (-?[\d.]+)"
    curve = {int(m[1]): (float(m[2]), float(m[4])) for m in re.finditer(pattern, log)}
    assert sorted(curve) == list(range(1, 7))
    for h in single.history:
        assert curve[h["step"]] == pytest.approx((h["loss"], h["reward_margin"]), abs=2e-4), h["step"]


def test_the_reward_figures_reach_prometheus(free_tcp_port):
    from prometheus_client import generate_latest

    from forge_trainer.contract import Progress
    from forge_trainer.runtime.progress import Metrics

    metrics = Metrics(free_tcp_port)
    metrics.update(Progress(step=3, tokens_seen=10, learning_rate=1e-6,
                            method_metrics={"reward_accuracy": 0.75, "reward_margin": 0.5}))
    scraped = generate_latest(metrics.registry).decode()
    metrics.close()
    assert 'forge_trainer_method_metric{name="reward_accuracy"} 0.75' in scraped
    assert 'forge_trainer_method_metric{name="reward_margin"} 0.5' in scraped
