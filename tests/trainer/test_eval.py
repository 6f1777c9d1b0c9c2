"""The evaluator on real tiny models trained here: perplexity agrees with the trainer's validation loss,
multiple-choice and exact-match score as lm-evaluation-harness and SQuAD define them, gates (absolute,
and relative with McNemar's test), results.json, the report and the termination message."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from forge_trainer.contract import ConfigError, DataError
from forge_trainer.eval.__main__ import main as eval_main
from forge_trainer.eval.config import EvalConfig, GateConfig, SuiteConfig
from forge_trainer.eval.gates import judge, mcnemar_p
from forge_trainer.eval.model import load_model
from forge_trainer.eval.run import compact, evaluate
from forge_trainer.eval.suites import (choose, cut_at_stop, encode_pair, is_exact_match, loglikelihoods,
                                       normalize_answer, score_multiple_choice, score_perplexity)


def ppl_suite(path: Path, **kw) -> SuiteConfig:
    return SuiteConfig(name="heldout", type="perplexity", path=str(path), format="text", seq_len=64, **kw)


def test_perplexity_equals_exp_of_the_trainers_validation_loss(models):
    for summary in (models["strong"], models["weak"]):
        lm = load_model(summary.output_dir, "model")
        score = score_perplexity(lm, ppl_suite(models["heldout"]), batch_size=5, tick=lambda n: None)
        assert score.metrics["loss"] == pytest.approx(summary.val_loss, rel=1e-5)
        assert score.metrics["perplexity"] == pytest.approx(math.exp(summary.val_loss), rel=1e-5)
        # bits per byte: the same nats over the bytes the predicted tokens spell (ASCII text: one per character)
        text_bytes = sum(len(p.read_bytes()) for p in models["heldout"].glob("*.txt"))
        assert score.metrics["bits_per_byte"] * math.log(2) * text_bytes == pytest.approx(
            score.metrics["loss"] * score.samples * 64, rel=0.05)
    assert models["strong"].val_loss < models["weak"].val_loss


def test_acc_and_acc_norm_on_known_log_likelihoods():
    # acc: the highest summed log-prob; acc_norm: the highest per character of the choice
    assert choose([-4.0, -6.0, -5.5], ("a", "bbbbbb", "ccccc")) == (0, 1)
    assert choose([-3.0, -2.0], ("xx", "y")) == (1, 0)  # -1.5 per character against -2


def test_batched_log_likelihoods_equal_one_sequence_at_a_time(models):
    lm = load_model(models["strong"].output_dir, "model")
    pairs = [encode_pair(lm.tokenizer, "alice has 3 apples. alice eats one. now alice has", " " + c)
             for c in ("2 apples.", "2 figs.", "bob bob bob bob bob")] + [encode_pair(lm.tokenizer, "", "erin")]
    batched = loglikelihoods(lm, pairs, batch_size=4)
    with torch.no_grad():
        for (ctx, cont), got in zip(pairs, batched):
            ids = torch.tensor([(ctx or [lm.eos_id]) + cont])
            logp = lm.model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
            want = logp[-len(cont):].gather(-1, ids[0, -len(cont):, None]).sum().item()
            assert got == pytest.approx(want, abs=1e-4)
    # lm-evaluation-harness's split: the context's trailing space goes to the continuation
    ctx, cont = encode_pair(lm.tokenizer, "now alice has ", "2")
    assert lm.tokenizer.decode(ctx) == "now alice has" and lm.tokenizer.decode(cont) == " 2"


def test_the_trained_model_beats_the_weak_one_on_multiple_choice(models):
    suite = SuiteConfig(name="mc", type="multiple-choice", path=str(models["mc"]))
    strong = score_multiple_choice(load_model(models["strong"].output_dir, "model"), suite, 8, lambda n: None)
    weak = score_multiple_choice(load_model(models["weak"].output_dir, "model"), suite, 8, lambda n: None)
    assert strong.samples == 40 and len(strong.per_item["acc"]) == 40
    assert strong.metrics["acc"] > weak.metrics["acc"] and strong.metrics["acc"] > 0.4  # chance: 1/3


@pytest.mark.parametrize("prediction, answers, right", [
    ("The Answer!", ("answer",), True),
    ("  2   apples. ", ("2 apples",), True),
    ("an apple", ("apple", "pear"), True),
    ("2 apple", ("2 apples",), False),
    ("", ("0",), False),
])
def test_exact_match_normalisation(prediction, answers, right):
    assert is_exact_match(prediction, answers) is right


def test_answers_stop_at_the_first_stop_sequence():
    assert cut_at_stop("2 figs.\nbob has", ["\n", "bob"]) == "2 figs."
    assert cut_at_stop("2 figs", ["\n"]) == "2 figs"
    assert normalize_answer("A  Tale of the City.") == "tale of city"


def test_mcnemar_exact_p_values():
    assert mcnemar_p(3, 1) == pytest.approx(5 / 16)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(0, 4) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(1 / 1024)


def _pairs(both: int, worse: int, better: int, neither: int):
    model = [True] * both + [False] * worse + [True] * better + [False] * neither
    base = [True] * both + [True] * worse + [False] * better + [False] * neither
    return model, base


def test_a_relative_gate_passes_on_noise_and_fails_on_a_real_drop():
    gate = GateConfig(metric="mc.acc", max_drop=0.01)
    noise = _pairs(78, 3, 1, 18)  # 0.79 against 0.81: two items net, p = 0.31
    out = judge(gate, sum(noise[0]) / 100, sum(noise[1]) / 100, noise)
    assert out.passed and out.drop == pytest.approx(0.02) and out.p_value == pytest.approx(5 / 16)
    assert "not significant" in out.message
    real = _pairs(60, 20, 2, 18)  # 0.62 against 0.80
    out = judge(gate, sum(real[0]) / 100, sum(real[1]) / 100, real)
    assert not out.passed and out.p_value < 1e-4 and "failed" in out.message
    # a loss may rise by maxDrop (no per-item test for it)
    loss_gate = GateConfig(metric="heldout.loss", max_drop=0.1)
    assert judge(loss_gate, 2.05, 2.0).passed and not judge(loss_gate, 2.2, 2.0).passed
    absolute = judge(GateConfig(metric="heldout.perplexity", comparator="<", threshold=20), 25.0)
    assert not absolute.passed and absolute.message == "heldout.perplexity = 25, needs < 20: failed"


def test_bad_configs_are_refused_naming_the_field(tmp_path):
    suite = {"name": "mc", "type": "multiple-choice", "path": str(tmp_path)}
    base = {"model_path": str(tmp_path), "output_dir": str(tmp_path), "suites": [suite]}
    with pytest.raises(ValidationError, match="gate mc.exact_match: no suite reports this metric"):
        EvalConfig.model_validate(base | {"gates": [{"metric": "mc.exact_match", "comparator": ">", "threshold": 0.5}]})
    with pytest.raises(ValidationError, match="maxDrop compares with a baseline"):
        EvalConfig.model_validate(base | {"gates": [{"metric": "mc.acc", "max_drop": 0.1}]})
    with pytest.raises(ValidationError, match="set comparator and threshold"):
        EvalConfig.model_validate(base | {"gates": [{"metric": "mc.acc", "comparator": ">"}]})
    with pytest.raises(ValidationError, match="read jsonl or parquet"):
        SuiteConfig(name="mc", type="multiple-choice", path=".", format="text")
    with pytest.raises(ValidationError, match="at least 1"):
        EvalConfig.model_validate(base | {"suites": []})


def test_bad_inputs_are_errors_naming_what_is_wrong(models, tmp_path):
    with pytest.raises(ConfigError, match=r"model .*/nope: no such model folder"):
        load_model(str(tmp_path / "nope"), "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="baseline .*no config.json"):
        load_model(str(tmp_path / "empty"), "baseline")
    lm = load_model(models["strong"].output_dir, "model")
    (tmp_path / "e" / "x.jsonl").parent.mkdir()
    (tmp_path / "e" / "x.jsonl").write_text("\n")
    with pytest.raises(DataError, match="suite mc .* the files hold no items"):
        score_multiple_choice(lm, SuiteConfig(name="mc", type="multiple-choice", path=str(tmp_path / "e")), 4, print)
    (tmp_path / "e" / "x.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q", "answer": 0}\n')
    with pytest.raises(DataError, match=r"x.jsonl line 2: field 'choices' \(choicesField\) must be a list"):
        score_multiple_choice(lm, SuiteConfig(name="mc", type="multiple-choice", path=str(tmp_path / "e")), 4, print)
    with pytest.raises(DataError, match="suite heldout .*does not exist"):
        score_perplexity(lm, ppl_suite(tmp_path / "missing"), 4, print)


def test_the_eval_command_writes_results_report_and_termination_message(models, tmp_path):
    out = tmp_path / "results"
    cfg = EvalConfig(
        name="toy-eval", model_path=models["strong"].output_dir, baseline_path=models["weak"].output_dir,
        output_dir=str(out), termination_message_path=str(tmp_path / "termination-log"), batch_size=8,
        suites=[ppl_suite(models["heldout"], max_samples=2),
                SuiteConfig(name="mc", type="multiple-choice", path=str(models["mc"])),
                SuiteConfig(name="qa", type="exact-match", path=str(models["em"]), max_new_tokens=6, stop=["."],
                            max_samples=16)],
        gates=[GateConfig(metric="mc.acc", max_drop=0.0), GateConfig(metric="heldout.perplexity", comparator="<", threshold=1.5)])
    (tmp_path / "eval.yaml").write_text(cfg.to_yaml())
    assert eval_main(["--config", str(tmp_path / "eval.yaml")]) == 0  # python -m forge_trainer.eval
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["status"] == "completed" and message["gatesPassed"] is False
    assert [s["suite"] for s in message["suites"]] == ["heldout", "mc", "qa"]
    mc_gate, ppl_gate = message["gates"]
    assert mc_gate["passed"] and mc_gate["drop"] < 0  # better than the weak baseline
    assert not ppl_gate["passed"] and ppl_gate["threshold"] == 1.5 and "needs < 1.5: failed" in ppl_gate["message"]
    results = json.loads((out / "results.json").read_text())
    assert results["suites"] == message["suites"] and len(results["perItem"]["qa"]["model"]["exact_match"]) == 16
    assert 0 <= results["suites"][2]["metrics"]["exact_match"] <= 1
    report = (out / "report.md").read_text()
    assert "| mc | acc |" in report and "![qa](qa.png)" in report and "FAILED" in report
    assert (out / "qa.png").read_bytes()[:4] == b"\x89PNG"
    # the model came from a Forge training: its loss curve, from the training log next to it
    assert "## Training" in report and "The model's training: 30 steps; training loss" in report
    assert f", {models['strong'].val_loss:.4f} at step 30." in report  # the last validation loss
    assert "![training loss](training_loss.png)" in report and (out / "training_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failed_evaluation_writes_the_error_and_its_exit_code(tmp_path, capsys):
    cfg = EvalConfig(model_path=str(tmp_path / "none"), output_dir=str(tmp_path), termination_message_path=str(tmp_path / "t"),
                     suites=[ppl_suite(tmp_path)])
    (tmp_path / "eval.yaml").write_text(cfg.to_yaml())
    assert eval_main(["--config", str(tmp_path / "eval.yaml")]) == 78
    assert "no such model folder" in capsys.readouterr().err
    message = json.loads((tmp_path / "t").read_text())
    assert message["status"] == "failed" and message["exitCode"] == 78 and "model " in message["message"]


def test_a_long_summary_is_cut_to_the_kubelets_limit(models, tmp_path):
    from forge_trainer.contract import EvalTerminationMessage, GateOutcome, SuiteOutcome

    big = EvalTerminationMessage(status="completed", exit_code=0, gates_passed=True,
                                 suites=[SuiteOutcome(suite=f"s{i}", metrics={"acc": 0.5, "acc_norm": 0.5}, baseline={"acc": 0.4})
                                         for i in range(32)],
                                 gates=[GateOutcome(metric=f"s{i}.acc", passed=True, value=0.5, message="x" * 200)
                                        for i in range(32)])
    small = compact(big)
    assert len(small.to_json()) <= 4096 and small.gates_passed and len(small.gates) == 32


# ---- generation ----------------------------------------------------------------------------------

REWARD_FILE = '''
def fruit_count(prompts, completions, answer, **columns):
    """1 when the completion starts with the right count; None (does not apply) for a record without one."""
    return [None if a is None else float(c.strip().startswith(a.split()[0])) for c, a in zip(completions, answer)]


def broken(prompts, completions, **columns):
    raise ZeroDivisionError("division by zero")


def short(prompts, completions, **columns):
    return [1.0]
'''


def generation_suite(models, tmp_path: Path, rewards: list[dict], **kw) -> SuiteConfig:
    """The exact-match questions as prompts, their answers a column (one record without it)."""
    from forge_trainer.config import RewardConfig

    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    lines = [json.loads(x) for x in (models["em"] / "tasks.jsonl").read_text().splitlines()][:12]
    data = tmp_path / "gen"
    data.mkdir(exist_ok=True)
    records = [{"prompt": x["question"], "answer": x["answer"], "id": i} for i, x in enumerate(lines)]
    del records[5]["answer"]
    (data / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    configs = [RewardConfig(**{**r, "function": f"{tmp_path}/rewards.py:{r['function']}"} if "function" in r else r)
               for r in rewards]
    return SuiteConfig(name="gen", type="generation", path=str(data), rewards=configs, max_new_tokens=6, stop=["."], **kw)


def test_generation_metrics_are_the_reward_functions_on_the_generated_completions(models, tmp_path):
    from forge_trainer.eval.suites import generate, score_generation
    from forge_trainer.rewards import build_rewards

    suite = generation_suite(models, tmp_path, [{"name": "digit", "regex": {"must_match": [r"\d"]}, "weight": 0.5},
                                                {"name": "fruit-count", "function": "fruit_count"}])
    lm = load_model(models["strong"].output_dir, "model")
    completions: list[str] = []
    score = score_generation(lm, suite, 5, lambda n: None, completions)
    prompts = [json.loads(x)["prompt"] for x in (tmp_path / "gen" / "prompts.jsonl").read_text().splitlines()]
    # greedy, batched with left padding and the KV cache: the same as one prompt at a time
    assert completions == [cut_at_stop(generate(lm, [p], 6)[0], ["."]) for p in prompts]
    answers = [json.loads(x).get("answer") for x in (tmp_path / "gen" / "prompts.jsonl").read_text().splitlines()]
    expected = build_rewards(suite.rewards).score(prompts, completions, {"answer": answers, "id": list(range(12))})
    digit, fruit = expected.by_function["digit"], expected.by_function["fruit-count"]
    assert fruit[5] is None and score.per_item["reward_fruit-count"] == fruit and score.per_item["reward"] == expected.total
    assert score.metrics == pytest.approx({"reward": sum(expected.total) / 12, "reward_digit": sum(digit) / 12,
                                           "reward_fruit-count": sum(f for f in fruit if f is not None) / 11})
    # not a trivial agreement: the completions scored differently (which ones depends on the tiny model)
    assert len(set(score.per_item["reward"])) > 1 and 0 < score.metrics["reward"]
    sampled = generation_suite(models, tmp_path, [{"name": "digit", "regex": {"must_match": [r"\d"]}}], temperature=1.5, seed=7)
    first, again = [], []
    score_generation(lm, sampled, 5, lambda n: None, first)
    score_generation(lm, sampled, 5, lambda n: None, again)
    assert first == again and first != completions  # seeded sampling: the same completions each run


def test_a_relative_gate_on_a_reward_uses_the_sign_test():
    gate = GateConfig(metric="gen.reward", max_drop=0.0, significance=0.05)
    model, base = [0.5] * 6 + [1.0] * 4, [1.0] * 6 + [0.5] * 4  # 6 items worse, 4 better: noise
    out = judge(gate, sum(model) / 10, sum(base) / 10, (model, base))
    assert out.passed and out.p_value == pytest.approx(mcnemar_p(6, 4)) and "sign test p" in out.message
    out = judge(gate, 0.5, 1.0, ([0.5] * 10 + [None], [1.0] * 10 + [0.0]))  # the None item is left out
    assert not out.passed and out.p_value == pytest.approx(2 ** -10)


@pytest.mark.parametrize("function, error", [
    ("broken", "reward 'bad' raised ZeroDivisionError: division by zero"),
    ("short", "reward 'bad' returned 1 scores for 5 completions"),
])
def test_a_failing_reward_function_is_an_error_naming_it(models, tmp_path, function, error):
    from forge_trainer.contract import RewardError
    from forge_trainer.eval.suites import score_generation

    suite = generation_suite(models, tmp_path, [{"name": "bad", "function": function}])
    lm = load_model(models["strong"].output_dir, "model")
    with pytest.raises(RewardError, match=error.replace("(", r"\(")):
        score_generation(lm, suite, 5, lambda n: None)


def test_generation_configs_are_refused_naming_what_is_wrong(tmp_path):
    with pytest.raises(ValidationError, match="a generation suite needs rewards"):
        SuiteConfig(name="gen", type="generation", path=str(tmp_path))
    with pytest.raises(ValidationError, match="temperature is for generation suites"):
        SuiteConfig(name="qa", type="exact-match", path=str(tmp_path), temperature=1.0)
    with pytest.raises(ValidationError, match=r"gate gen.reward_other: no suite reports this metric \(reported: "
                                              r"gen.reward, gen.reward_digit\)"):
        EvalConfig(model_path="m", output_dir="o", gates=[GateConfig(metric="gen.reward_other", comparator=">", threshold=0)],
                   suites=[SuiteConfig(name="gen", type="generation", path="p",
                                       rewards=[{"name": "digit", "regex": {"must_match": ["1"]}}])])


EXFILTRATE = '''
import socket


def post_elsewhere(prompts, completions, **columns):
    socket.create_connection(("192.0.2.7", 80), timeout=5)  # TEST-NET-1: not a reward service of the suite
    return [1.0] * len(completions)
'''


def test_the_evaluation_runs_under_the_egress_lock_with_the_reward_services_allowed(models, tmp_path):
    from forge_trainer.config import EgressConfig
    from forge_trainer.contract import RewardError
    from forge_trainer.eval.run import egress_policy

    suite = generation_suite(models, tmp_path, [{"name": "leak", "function": "post_elsewhere"}], max_samples=2)
    (tmp_path / "rewards.py").write_text(EXFILTRATE)
    cfg = EvalConfig(model_path=models["strong"].output_dir, output_dir=str(tmp_path / "out"), suites=[suite])
    with pytest.raises(RewardError, match="reward 'leak' raised EgressRefused: .*192.0.2.7"):
        evaluate(cfg)
    judge_suite = generation_suite(models, tmp_path, [{"name": "judge", "http": {"url": "http://192.0.2.9:8080/score"}}])
    policy = egress_policy(cfg.model_copy(update={"suites": [judge_suite]}))
    assert ("192.0.2.9", 8080) in policy.endpoints and "192.0.2.7" not in policy.hosts
    assert egress_policy(cfg.model_copy(update={"egress": EgressConfig(lock=False)})) is None


def test_a_training_checkpoint_is_evaluated_as_the_model_it_holds(models, tmp_path):
    ckpt_dir = models["work"] / "strong" / "ckpt"  # the checkpoint.dir of the 30-step training
    export = score_perplexity(load_model(models["strong"].output_dir, "model"), ppl_suite(models["heldout"]), 8, print)
    latest = load_model(str(ckpt_dir), "model")  # the newest complete checkpoint in it: step 30, as exported
    assert score_perplexity(latest, ppl_suite(models["heldout"]), 8, print).metrics["loss"] == pytest.approx(
        export.metrics["loss"], rel=1e-6)
    assert latest.tokenizer.eos_token == "<|endoftext|>" and latest.model.config.use_cache
    early = load_model(str(ckpt_dir / "step-00000010"), "baseline")  # one checkpoint of it
    assert score_perplexity(early, ppl_suite(models["heldout"]), 8, print).metrics["loss"] > export.metrics["loss"] + 0.05
    # a checkpoint without its model files (an older trainer's) is refused naming the field and what to do
    old = tmp_path / "old"
    shutil.copytree(ckpt_dir / "step-00000010", old / "step-00000010")
    shutil.rmtree(old / "step-00000010" / "model")
    with pytest.raises(ConfigError, match=r"baseline .*/old: checkpoint step-00000010 has no model/config.json .*export"):
        load_model(str(old), "baseline")


def test_the_evaluators_lock_allows_the_s3_endpoint_of_its_locations_and_refuses_the_rest(tmp_path, monkeypatch):
    import socket

    from forge_trainer.config import S3Config
    from forge_trainer.eval.run import egress_policy
    from forge_trainer.runtime.egress import EgressRefused, egress_locked

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # a pod's API server: not the evaluator's business
    cfg = EvalConfig(model_path="s3://models/m", output_dir="s3://models/m/evaluations/e", scratch_dir=str(tmp_path),
                     s3=S3Config(endpoint="http://192.0.2.20:9000"), suites=[ppl_suite(Path("/data"))])
    outcomes = {}
    with egress_locked(egress_policy(cfg)):
        for address in [("192.0.2.20", 9000), ("203.0.113.5", 443), ("10.96.0.1", 443)]:
            s = socket.socket()
            s.settimeout(0.2)
            try:
                s.connect(address)
            except EgressRefused as e:
                outcomes[address] = str(e)
            except OSError:
                outcomes[address] = "let through"  # TEST-NET: nothing answers
            finally:
                s.close()
    assert outcomes[("192.0.2.20", 9000)] == "let through"
    assert outcomes[("203.0.113.5", 443)] == ("egress to 203.0.113.5:443 refused: the evaluation may connect to "
                                              "192.0.2.20:9000 (spec.network.egress: Restricted)")
    assert outcomes[("10.96.0.1", 443)].startswith("egress to 10.96.0.1:443 refused")
