"""Supervised fine-tuning (method sft) on tiny Llama and Qwen3 bases made here: which tokens are
learned, packing without cross-example attention, learning, resuming, bad records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sft_helpers import CHATML, LIKES, conversation, make_base, sft_config, write_records
from trainer_helpers import run_trainer, write_config, run_two_workers

import forge_trainer
from forge_trainer.contract import DataError, ExitCode
from forge_trainer.data.records import (
    DEFAULT_CHAT_TEMPLATE, IGNORE, ChatRenderer, ExampleEncoder, _Examples, pack, packed_row, prepare_records,
)
from forge_trainer.data.sources import data_digest
from forge_trainer.data.tokenizer import TextTokenizer
from forge_trainer.methods import METHODS, build_method
from forge_trainer.methods.sft import Sft


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {family: make_base(root, family) for family in ("llama", "qwen3")}


def _learned_runs(ids: list[int], mask: list[int], tok: TextTokenizer) -> list[str]:
    """The text of each run of learned tokens, in order."""
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tok.tok.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("family, end", [("llama", "<|endoftext|>"), ("qwen3", "<|im_end|>\n")])
def test_the_loss_mask_covers_exactly_the_assistant_turns_of_multi_turn_conversations(bases, family, end):
    """The base's own chat template (Qwen3's ChatML) or the default (the Llama folder has none): what is
    learned is each assistant turn with the marker that ends it, and nothing else."""
    tok = TextTokenizer.from_pretrained(bases[family])
    renderer = ChatRenderer(tok)
    assert renderer.template == (CHATML if family == "qwen3" else DEFAULT_CHAT_TEMPLATE)
    assert renderer.end_of_turn() == tok.tok.token_to_id(end.strip())
    encoder = ExampleEncoder(tok, renderer)
    src = sft_config(Path("/w"), bases[family], Path("/d")).data.sources[0]
    rng = random.Random(3)
    for turns in (1, 2, 3, 4):
        for system in (True, False):
            msgs = conversation(rng, turns, system)
            ids, mask = encoder.encode(src, {"messages": msgs}, "here")
            assert _learned_runs(ids, mask, tok) == [m["content"] + end for m in msgs if m["role"] == "assistant"]
            # the whole example is the rendered conversation, special tokens encoded as themselves
            assert tok.tok.decode(ids, skip_special_tokens=False) == renderer.render(msgs, False)
            if family == "qwen3":
                assert ids.count(tok.tok.token_to_id("<|im_start|>")) == len(msgs)


def test_a_prompt_completion_record_learns_the_completion_and_the_end_of_text(bases):
    tok = TextTokenizer.from_pretrained(bases["llama"])
    src = sft_config(Path("/w"), bases["llama"], Path("/d"), kind="pairs").data.sources[0]
    encoder = ExampleEncoder(tok, ChatRenderer(tok))
    ids, mask = encoder.encode(src, {"prompt": "what does bob like?\n", "completion": "figs."}, "x")
    assert _learned_runs(ids, mask, tok) == ["figs.<|endoftext|>"]
    assert tok.tok.decode(ids, skip_special_tokens=False) == "what does bob like?\nfigs.<|endoftext|>"


def test_examples_are_packed_whole_and_padding_is_never_learned():
    lengths = np.array([5, 3, 7, 2, 8, 1, 4])
    rows = pack(lengths, np.arange(7), 10)
    assert [r.tolist() for r in rows] == [[0, 1], [2, 3], [4, 5], [6]]
    assert sorted(np.concatenate(rows).tolist()) == list(range(7))
    tokens = np.arange(100, 100 + lengths.sum())
    mask = np.ones(lengths.sum(), dtype=np.uint8)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ex = _Examples(tokens, mask, np.stack([offsets, lengths, 0 * lengths, 0 * lengths], 1))
    row = packed_row(ex, rows[0], 10, pad_id=0)
    assert row[0].tolist() == [100, 101, 102, 103, 104, 105, 106, 107, 0, 0]
    # each example's last token predicts nothing (the next one belongs to another example or is padding)
    assert row[1].tolist() == [101, 102, 103, 104, IGNORE, 106, 107, IGNORE, IGNORE, IGNORE]
    assert row[2].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]


def _prepared(cfg, tokenizer) -> tuple[str, list[np.ndarray]]:
    """prepare_records' folder name, and the tokens, mask and index of its one source."""
    digest, listing = data_digest(cfg.data)
    path = prepare_records(cfg, tokenizer, digest, listing)
    return path.name, [np.fromfile(path / "toy.tokens", dtype=np.uint16), np.fromfile(path / "toy.mask", dtype=np.uint8),
                       np.load(path / "toy.index.npy")]


@pytest.mark.parametrize("kind", ["chat", "pairs"])
def test_parquet_records_prepare_like_jsonl_records(bases, tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_records(tmp_path / "jsonl" / "r.jsonl", kind, 20)
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist([json.loads(x) for x in jsonl.read_text().splitlines()]),
                   tmp_path / "parquet" / "r.parquet")
    tok = TextTokenizer.from_pretrained(bases["qwen3"])
    _, from_jsonl = _prepared(sft_config(tmp_path / "a", bases["qwen3"], jsonl.parent, kind=kind), tok)
    cfg = sft_config(tmp_path / "b", bases["qwen3"], tmp_path / "parquet", kind=kind)
    cfg.data.sources[0].format = "parquet"
    _, from_parquet = _prepared(cfg, tok)
    for a, b in zip(from_jsonl, from_parquet):
        assert np.array_equal(a, b)


def test_a_node_preparing_its_own_copy_renders_with_rank_0s_template(bases, tmp_path):
    """Another node gets rank 0's tokenizer as JSON, without the base folder's settings: it still
    renders with the base's template, into the folder rank 0 named."""
    data = write_records(tmp_path / "data" / "c.jsonl", "chat", 10)
    loaded = TextTokenizer.from_pretrained(bases["qwen3"])
    sent = TextTokenizer.from_json(loaded.json, loaded.eos_token)
    here = _prepared(sft_config(tmp_path / "rank0", bases["qwen3"], data.parent), loaded)
    there = _prepared(sft_config(tmp_path / "node1", bases["qwen3"], data.parent), sent)
    assert here[0] == there[0] and all(np.array_equal(a, b) for a, b in zip(here[1], there[1]))
    assert sent.chat_template == loaded.chat_template == CHATML


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_examples_never_attend_to_each_other(bases, family, tmp_path):
    """Two examples packed in one sequence have exactly the loss they have each alone; with the
    position ids running on (what an attention leak looks like) the second example's loss changes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bases[family], attn_implementation="sdpa", dtype=torch.float32)
    tok = TextTokenizer.from_pretrained(bases[family])
    src = sft_config(tmp_path, bases[family], tmp_path).data.sources[0]
    encoder = ExampleEncoder(tok, ChatRenderer(tok))
    a = encoder.encode(src, {"messages": conversation(random.Random(0), 2)}, "a")
    b = encoder.encode(src, {"messages": conversation(random.Random(1), 1)}, "b")
    tokens = np.array(a[0] + b[0])
    mask = np.array(a[1] + b[1], dtype=np.uint8)
    ex = _Examples(tokens, mask, np.array([[0, len(a[0]), 0, 1], [len(a[0]), len(b[0]), 0, 2]]))
    method = Sft(sft_config(tmp_path, bases[family], tmp_path))
    L = len(tokens) + 5  # room for both, and a little padding

    def loss(rows):
        batch = torch.from_numpy(np.stack(rows))
        with torch.no_grad():
            return method.loss(model, batch).value.item()

    packed = packed_row(ex, np.array([0, 1]), L, tok.eos_id)
    alone = [packed_row(ex, np.array([i]), L, tok.eos_id) for i in (0, 1)]
    n = [int((r[1] != IGNORE).sum()) for r in alone]
    assert int((packed[1] != IGNORE).sum()) == sum(n)
    separately = (loss([alone[0]]) * n[0] + loss([alone[1]]) * n[1]) / sum(n)
    assert loss([packed]) == pytest.approx(separately, abs=1e-5)
    # the second example's tokens alone: what a leak from the first would change
    second = packed.copy()
    second[1, : len(a[0])] = IGNORE
    assert loss([second]) == pytest.approx(loss([alone[1]]), abs=1e-5)
    leaky = second.copy()
    leaky[2, : len(tokens)] = np.arange(len(tokens))
    assert abs(loss([leaky]) - loss([alone[1]])) > 1e-3


def _answer_logprob(model_dir, prompts: list[str], answers: list[str]) -> float:
    """Mean log-probability per token of each answer (and its end-of-text) after its prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    total = count = 0.0
    for p, a in zip(prompts, answers):
        pi, ai = tok(p, add_special_tokens=False).input_ids, tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = torch.tensor([pi + ai])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        total += logp[torch.arange(len(targets)), targets][len(pi) - 1 :].sum().item()
        count += len(ai)
    return total / count


def test_sft_raises_the_held_out_likelihood_of_the_answers(bases, tmp_path):
    data = write_records(tmp_path / "data" / "train.jsonl", "pairs", 240, seed=0)
    held = [json.loads(x) for x in write_records(tmp_path / "held.jsonl", "pairs", 40, seed=99).read_text().splitlines()]
    cfg = sft_config(tmp_path, bases["llama"], data.parent, kind="pairs", training__budget={"max_steps": 30},
                     training__eval_interval_steps=None)
    summary = forge_trainer.run(cfg)
    prompts, answers = [r["prompt"] for r in held], [r["completion"] for r in held]
    before, after = _answer_logprob(bases["llama"], prompts, answers), _answer_logprob(cfg.output.dir, prompts, answers)
    assert after > before + 2.0, (before, after)  # per token: the answers became e^2 times likelier or more
    assert summary.val_loss == pytest.approx(-after, rel=0.1)  # validation measures the same thing
    provenance = json.loads((Path(cfg.output.dir) / "provenance.json").read_text())
    assert provenance["method"] == "sft" and provenance["data"]["sources"][0]["examples"] == 240
    assert provenance["data"]["chat_template"] == DEFAULT_CHAT_TEMPLATE


def test_resuming_from_a_checkpoint_continues_the_same_curve(bases, tmp_path):
    """Chat records on the Qwen3 base: a run that goes back to its step-6 checkpoint (model, optimizer,
    loader position, RNG) trains steps 7-12 exactly as the first run did, and exports the base's template."""
    data = write_records(tmp_path / "data" / "chat.jsonl", "chat", 160)
    cfg = sft_config(tmp_path, bases["qwen3"], data.parent, checkpoint__interval_steps=6)
    first = forge_trainer.run(cfg)
    again = forge_trainer.run(cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(
        update={"resume": str(Path(cfg.checkpoint.dir) / "step-00000006")})}))
    assert again.start_step == 6 and again.step == 12
    losses = {h["step"]: h["loss"] for h in first.history}
    assert [h["step"] for h in again.history] == list(range(7, 13))
    for h in again.history:
        assert h["loss"] == pytest.approx(losses[h["step"]], rel=1e-5), h["step"]
    assert first.history[-1]["loss"] < first.history[0]["loss"] - 1.0
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(cfg.output.dir)
    assert tok.chat_template == CHATML
    # generation stops at the end of an assistant turn as well as at the end of text
    stops = GenerationConfig.from_pretrained(cfg.output.dir).eos_token_id
    assert stops == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


# --------------------------------------------------------------------------- bad input
def _bad(tmp_path, bases, lines: list, kind="chat", **overrides) -> str:
    path = tmp_path / "data" / "bad.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    good = [json.dumps(json.loads(x)) for x in write_records(tmp_path / "good.jsonl", kind, 5).read_text().splitlines()]
    path.write_text("\n".join(good + [x if isinstance(x, str) else json.dumps(x) for x in lines]) + "\n")
    with pytest.raises(DataError) as err:
        forge_trainer.run(sft_config(tmp_path, bases["llama"], path.parent, kind=kind, **overrides))
    return str(err.value)


@pytest.mark.parametrize("line, expected", [
    ('{"messages": [', "bad.jsonl line 6: invalid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "bad.jsonl line 6: the conversation has no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "bad.jsonl line 6: messages[0].role 'bot' is not one of system, user, assistant"),
    ({"conversation": []}, "bad.jsonl line 6: no list field 'messages'"),
])
def test_a_bad_chat_record_is_named_by_file_and_line(bases, tmp_path, line, expected):
    assert expected in _bad(tmp_path, bases, [line])


def test_a_bad_prompt_completion_record_is_named_by_file_and_line(bases, tmp_path):
    message = _bad(tmp_path, bases, [{"prompt": "what does bob like?"}], kind="pairs")
    assert message.endswith("bad.jsonl line 6: no string field 'completion'")


def test_an_example_longer_than_the_sequence_is_refused_not_cut(bases, tmp_path):
    long = {"messages": [{"role": "user", "content": " ".join(LIKES) * 20}, {"role": "assistant", "content": "no."}]}
    message = _bad(tmp_path, bases, [long, long])
    assert "bad.jsonl line 6: the example has" in message and "more than training.seq_len 128" in message
    assert "(2 of the source's 7 examples are); examples are never cut" in message


def test_a_bad_record_exits_65_with_one_line(bases, tmp_path):
    path = write_records(tmp_path / "data" / "a.jsonl", "chat", 3)
    path.write_text(path.read_text() + '{"messages": [{"role": "user", "content": "hi"}]}\n')
    cfg = sft_config(tmp_path, bases["llama"], path.parent)
    proc = run_trainer(write_config(cfg, tmp_path / "config.yaml"))
    assert proc.returncode == ExitCode.DATA_ERROR, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"forge-trainer: data error: data.sources[0].path {path.parent}: a.jsonl line 4: "
        "the conversation has no assistant turn (nothing to learn)")


def test_sft_configuration_is_checked(bases, tmp_path):
    assert METHODS["sft"] is Sft and isinstance(build_method(sft_config(tmp_path, bases["llama"], tmp_path)), Sft)
    with pytest.raises(ValidationError, match="method sft needs model.base_path"):
        sft_config(tmp_path, bases["llama"], tmp_path, model={"architecture": {}}, tokenizer={"path": "/t"})
    with pytest.raises(ValidationError, match=r"method sft needs records: data sources \['toy'\]"):
        sft_config(tmp_path, bases["llama"], tmp_path, data={"sources": [{"name": "toy", "path": "/d"}]})
    with pytest.raises(ValidationError, match="use tokenizer.from_base"):
        sft_config(tmp_path, bases["llama"], tmp_path, tokenizer={"train": {}})
    with pytest.raises(ValidationError, match="set messages_field or prompt_field and completion_field, not both"):
        sft_config(tmp_path, bases["llama"], tmp_path, data={"sources": [
            {"name": "toy", "path": "/d", "format": "jsonl", "messages_field": "m", "prompt_field": "p",
             "completion_field": "c"}]})
    with pytest.raises(ValidationError, match="are for methods sft, dpo, grpo and online-dpo"):
        sft_config(tmp_path, bases["llama"], tmp_path, method="continued-pretrain")


@pytest.mark.slow
def test_two_workers_under_torchrun_fine_tune_like_one_process(bases, tmp_path):
    """FSDP2 over two CPU workers (gloo): rank 0 prepares the records for both, each packs and takes its
    half of every step, and the loss curve is the single process's."""
    import re

    data = write_records(tmp_path / "data" / "chat.jsonl", "chat", 120)
    single = forge_trainer.run(sft_config(tmp_path / "one", bases["qwen3"], data.parent, cache=tmp_path / "cache",
                                          training__budget={"max_steps": 6}))
    cfg = sft_config(tmp_path / "two", bases["qwen3"], data.parent, cache=tmp_path / "cache2",
                     training__budget={"max_steps": 6})
    log = run_two_workers(cfg, tmp_path)
    curve = {int(m[1]): float(m[2]) for m in re.finditer(r"\[rank 0\] step (\d+)/6 \| loss ([\d.]+)", log)}
    assert sorted(curve) == list(range(1, 7))
    for h in single.history:
        assert curve[h["step"]] == pytest.approx(h["loss"], abs=2e-4), h["step"]
    assert json.loads((Path(cfg.output.dir) / "provenance.json").read_text())["world_size"] == 2
