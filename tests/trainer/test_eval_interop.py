"""lm-evaluation-harness and the evaluator on the same task and model: a multiple-choice task written as an
lm-eval task YAML (doc_to_text, doc_to_choice, doc_to_target; acc and acc_norm) over a local JSONL file, and a
loglikelihood_rolling task over held-out documents, scored by lm-eval's `hf` backend on a Forge export
(offline: no hub, no downloads) and by our evaluator. Accuracy agrees item by item; log-likelihoods and
bits per byte agree within float tolerance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from forge_trainer.eval.config import EvalConfig, SuiteConfig
from forge_trainer.eval.model import load_model
from forge_trainer.eval.run import evaluate
from forge_trainer.eval.suites import encode_pair, loglikelihoods, token_bytes

# A local JSONL file as the task's test split (the datasets cache in the test's own folder)
LOCAL_JSONL = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""

MC_TASK = "task: forge_fruit_mc\n" + LOCAL_JSONL + """output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

pytestmark = pytest.mark.slow  # lm-eval's import and its run: about 40 s of CPU

ROLLING_TASK = "task: forge_fruit_text\n" + LOCAL_JSONL + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def lm_eval_run(models, tmp_path_factory):
    """lm-eval's simple_evaluate on both tasks, with every request's response kept (log_samples)."""
    work = tmp_path_factory.mktemp("lm-eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        import lm_eval
        from lm_eval.tasks import TaskManager

        docs = [line for f in sorted(models["heldout"].glob("*.txt")) for line in f.read_text().splitlines()][:24]
        (work / "text.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        tasks = work / "tasks"
        tasks.mkdir()
        (tasks / "mc.yaml").write_text(MC_TASK.format(data=models["mc"] / "tasks.jsonl", cache=work / "hf-datasets"))
        (tasks / "text.yaml").write_text(ROLLING_TASK.format(data=work / "text.jsonl", cache=work / "hf-datasets"))
        out = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={models['strong'].output_dir},dtype=float32", device="cpu",
            tasks=["forge_fruit_mc", "forge_fruit_text"], task_manager=TaskManager(include_path=str(tasks)),
            batch_size=16, log_samples=True)
    return out, docs


def test_accuracy_agrees_with_lm_evaluation_harness_item_by_item(models, lm_eval_run, tmp_path):
    theirs, _ = lm_eval_run
    message = evaluate(EvalConfig(model_path=models["strong"].output_dir, output_dir=str(tmp_path), device="cpu",
                                  suites=[SuiteConfig(name="mc", type="multiple-choice", path=str(models["mc"]))]))
    ours = json.loads((tmp_path / "results.json").read_text())["perItem"]["mc"]["model"]
    samples = sorted(theirs["samples"]["forge_fruit_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ours["acc"]) == 40
    assert [bool(s["acc"]) for s in samples] == ours["acc"]
    assert [bool(s["acc_norm"]) for s in samples] == ours["acc_norm"]
    metrics = message.suites[0].metrics
    assert metrics["acc"] == theirs["results"]["forge_fruit_mc"]["acc,none"]
    assert metrics["acc_norm"] == theirs["results"]["forge_fruit_mc"]["acc_norm,none"]
    assert 0.4 < metrics["acc"] < 1  # chance is 1/3: the comparison is of a model that knows something


def test_log_likelihoods_and_bits_per_byte_agree_with_lm_evaluation_harness(models, lm_eval_run):
    theirs, docs = lm_eval_run
    lm = load_model(models["strong"].output_dir, "model", device="cpu")
    samples = sorted(theirs["samples"]["forge_fruit_mc"], key=lambda s: s["doc_id"])
    requests = [args for s in samples for args in s["arguments"]]
    expected = [resp[0] for s in samples for resp in s["filtered_resps"]]
    ours = loglikelihoods(lm, [encode_pair(lm.tokenizer, ctx, cont) for ctx, cont in requests], batch_size=16)
    assert ours == pytest.approx(expected, abs=1e-4)

    # A document scored alone from end-of-text (lm-eval's rolling log-likelihood when it fits one window):
    # the same log-likelihood, and our bytes of the predicted tokens are its UTF-8 bytes of the document.
    pairs = [encode_pair(lm.tokenizer, "", d) for d in docs]
    nats = -sum(loglikelihoods(lm, pairs, batch_size=16))
    nbytes = token_bytes(lm.tokenizer)
    predicted_bytes = sum(nbytes[t] for _, cont in pairs for t in cont)
    assert predicted_bytes == sum(len(d.encode()) for d in docs)
    rolling = theirs["results"]["forge_fruit_text"]
    assert nats / math.log(2) / predicted_bytes == pytest.approx(rolling["bits_per_byte,none"], rel=1e-5)
    assert math.exp(nats / sum(len(d.split()) for d in docs)) == pytest.approx(rolling["word_perplexity,none"], rel=1e-5)
