"""`forge eval FILE.yaml` on this machine: the same validation as the API server, the operator's
translation, the evaluator; a table of the metrics against the baseline and the gates, and an exit
code that says whether every gate passed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from forge_operator.cli.main import main as forge

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "trainer"))
from eval_helpers import write_heldout, write_tasks  # noqa: E402


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """A random-weight 2-layer Llama with a tokenizer trained on the toy text (an HF model folder), and task files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from forge_trainer.data.tokenizer import TextTokenizer, train_bpe

    root = tmp_path_factory.mktemp("volumes")
    heldout = write_heldout(root / "data" / "heldout")
    write_tasks(root / "data", n=12)
    texts = [p.read_text() for p in heldout.glob("*.txt")]
    tok = TextTokenizer(train_bpe(texts, vocab_size=300, check=False), "<|endoftext|>")
    model_dir = root / "models" / "tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128, eos_token_id=tok.eos_id,
                                 bos_token_id=tok.eos_id)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return root


def manifest(**spec) -> dict:
    pvc = lambda claim, path: {"pvc": {"claimName": claim, "path": path}}  # noqa: E731
    return {"apiVersion": "forge.dev/v1alpha1", "kind": "ForgeEval", "metadata": {"name": "tiny-eval"},
            "spec": {"model": {"checkpoint": pvc("models", "tiny")}, "baseline": {"checkpoint": pvc("models", "tiny")},
                     "suites": [{"name": "heldout", "type": "perplexity", "format": "text", "seqLen": 32,
                                 "data": pvc("data", "heldout")},
                                {"name": "mc", "type": "multiple-choice", "data": pvc("data", "mc")}],
                     "gates": [{"metric": "mc.acc", "maxDrop": 0.0},
                               {"metric": "heldout.perplexity", "comparator": "<", "threshold": 2}]} | spec}


def run(tmp_path: Path, volumes: Path, doc: dict) -> int:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(doc))
    return forge(["eval", str(path), "--volume", f"models={volumes / 'models'}", "--volume", f"data={volumes / 'data'}"])


def test_forge_eval_prints_the_table_and_fails_on_a_failed_gate(tmp_path, volumes, capsys):
    assert run(tmp_path, volumes, manifest()) == 1  # the perplexity gate fails: a random model is far above 2
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].split() == ["suite", "metric", "model", "baseline", "difference"]
    assert any(line.split()[:2] == ["mc", "acc_norm"] and line.split()[-1] == "+0.0000" for line in lines)
    assert "gate PASSED: mc.acc" in out.out and "gate FAILED: heldout.perplexity" in out.out
    assert "mc (model)" in out.err  # the progress bar
    results = json.loads((volumes / "models" / "tiny" / "evaluations" / "tiny-eval" / "results.json").read_text())
    assert results["gatesPassed"] is False and results["suites"][1]["samples"] == 12


def test_forge_eval_refuses_what_the_api_server_refuses_with_the_same_message(tmp_path, volumes, capsys):
    doc = manifest(gates=[{"metric": "mc.exact_match", "comparator": ">", "threshold": 0.5}])
    assert run(tmp_path, volumes, doc) == 78
    assert "every gate metric must be <suite>.<metric> for one of the suites and a metric its type reports" \
        in capsys.readouterr().err
    doc = manifest(baseline=None)
    doc["spec"].pop("baseline")
    assert run(tmp_path, volumes, doc) == 78
    assert "a gate with maxDrop compares with the baseline: set baseline" in capsys.readouterr().err


def test_forge_eval_names_a_model_or_data_it_cannot_use(tmp_path, volumes, capsys):
    doc = manifest()
    doc["spec"]["model"] = {"checkpoint": {"pvc": {"claimName": "models", "path": "nope"}}}
    assert run(tmp_path, volumes, doc) == 78
    assert "model " in (err := capsys.readouterr().err) and "nope: no such model folder" in err
    doc = manifest()
    doc["spec"]["suites"][1]["data"]["pvc"]["path"] = "empty"
    (volumes / "data" / "empty").mkdir(exist_ok=True)
    assert run(tmp_path, volumes, doc) == 65
    assert "suite mc" in capsys.readouterr().err


REWARDS_PY = '''
def chars(prompts, completions, id, **columns):
    """A KPI in the organisation's own words: a tenth of the completion's length, none for item 0."""
    return [None if i == 0 else len(c) / 10 for c, i in zip(completions, id)]
'''


def generation(volumes: Path, **suite) -> dict:
    gen = volumes / "data" / "gen"
    gen.mkdir(exist_ok=True)
    lines = [json.loads(x) for x in (volumes / "data" / "em" / "tasks.jsonl").read_text().splitlines()]
    (gen / "prompts.jsonl").write_text("".join(json.dumps({"prompt": x["question"], "id": i}) + "\n" for i, x in enumerate(lines)))
    (volumes / "kpi").mkdir(exist_ok=True)
    (volumes / "kpi" / "kpi.py").write_text(REWARDS_PY)
    rewards = [{"name": "chars", "weight": 2, "python": {"configMap": {"name": "kpi", "key": "kpi.py"}, "function": "chars"}},
               {"name": "no-digit", "regex": {"mustNotMatch": [r"\d"]}}]
    doc = manifest(suites=[{"name": "gen", "type": "generation", "maxNewTokens": 5, "rewards": rewards,
                            "data": {"pvc": {"claimName": "data", "path": "gen"}}} | suite],
                   gates=[{"metric": "gen.reward_chars", "maxDrop": 0.0}, {"metric": "gen.reward", "comparator": ">=", "threshold": 0}])
    return doc


def run_with_kpi(tmp_path: Path, volumes: Path, doc: dict) -> int:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(doc))
    return forge(["eval", str(path), "--volume", f"models={volumes / 'models'}", "--volume", f"data={volumes / 'data'}",
                  "--volume", f"kpi={volumes / 'kpi'}"])


def test_forge_eval_scores_a_generation_suite_with_the_rewards_a_training_declares(tmp_path, volumes, capsys):
    assert run_with_kpi(tmp_path, volumes, generation(volumes)) == 0
    out = capsys.readouterr().out
    assert "gate PASSED: gen.reward_chars" in out and "sign test p = 1" in out
    results = json.loads((volumes / "models" / "tiny" / "evaluations" / "tiny-eval" / "results.json").read_text())
    metrics, per_item = results["suites"][0]["metrics"], results["perItem"]["gen"]["model"]
    assert set(metrics) == {"reward", "reward_chars", "reward_no-digit"} and results["suites"][0]["samples"] == 12
    chars, no_digit = per_item["reward_chars"], per_item["reward_no-digit"]
    assert chars[0] is None and all(c is not None for c in chars[1:])
    assert per_item["reward"] == pytest.approx([2 * (c or 0) + d for c, d in zip(chars, no_digit)])
    assert metrics["reward_chars"] == pytest.approx(sum(chars[1:]) / 11)
    assert metrics["reward"] == pytest.approx(sum(per_item["reward"]) / 12)


def test_forge_eval_refuses_a_generation_suite_without_rewards_and_names_a_bad_reward(tmp_path, volumes, capsys):
    doc = generation(volumes)
    doc["spec"]["suites"][0].pop("rewards")
    doc["spec"]["gates"] = []
    assert run_with_kpi(tmp_path, volumes, doc) == 78
    assert "a generation suite needs rewards; the other suite types take none" in capsys.readouterr().err
    doc = generation(volumes)
    doc["spec"]["suites"][0]["rewards"][0]["python"]["function"] = "missing"
    assert run_with_kpi(tmp_path, volumes, doc) == 78
    assert "reward 'chars': module" in (err := capsys.readouterr().err) and "has no 'missing'" in err


def test_the_example_evaluation_runs(tmp_path, volumes, capsys):
    """examples/eval.yaml as written, on folders for the claims it names; its model a folder of that claim
    (a trainingRef needs the ForgeTraining in the same file)."""
    doc = yaml.safe_load((ROOT / "examples" / "eval.yaml").read_text())
    doc["spec"]["model"] = {"checkpoint": {"pvc": {"claimName": "forge-models", "path": "sft-assistant-1b"}}}
    models, data = tmp_path / "forge-models", tmp_path / "eval-data"
    for name in ("sft-assistant-1b", "sft-assistant-1b-previous"):
        shutil.copytree(volumes / "models" / "tiny", models / name, ignore=shutil.ignore_patterns("evaluations"))
    for name, source in (("heldout", "heldout"), ("contracts-mc", "mc"), ("clause-qa", "em")):
        shutil.copytree(volumes / "data" / source, data / name)
    (data / "support-prompts").mkdir()
    (data / "support-prompts" / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"A customer asks about refund number {i}. Reply:"}) + "\n" for i in range(6)))
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert forge(["eval", str(path), "--volume", f"forge-models={models}", "--volume", f"eval-data={data}"]) == 1
    out = capsys.readouterr().out
    assert "gate FAILED: heldout.perplexity" in out  # a random model
    assert "gate PASSED: support-replies.reward_cites-policy" in out  # the baseline is the same model
    results = json.loads((models / "sft-assistant-1b" / "evaluations" / "sft-assistant-eval" / "results.json").read_text())
    assert [s["suite"] for s in results["suites"]] == ["heldout", "contracts-mc", "clause-qa", "support-replies"]
    replies = results["suites"][3]
    assert replies["samples"] == 6 and set(replies["metrics"]) == {"reward", "reward_cites-policy", "reward_length"}
    assert replies["metrics"] == replies["baseline"]
