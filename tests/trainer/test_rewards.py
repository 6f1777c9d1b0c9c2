"""Reward functions: TRL-signature callables from a file, the built-in verifiers, the HTTP verifier, weights,
and every way a reward can fail, reported with the function's name and the first bad item."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from forge_trainer.config import RewardConfig
from forge_trainer.contract import ConfigError
from forge_trainer.rewards import RewardError, build_rewards

TRL_STYLE = '''
import re
from helper import WORD  # a neighbour module: the file's folder is importable

def format_reward(completions, **kwargs):
    """TRL's example: 1.0 when the completion has the think/answer format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    contents = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [1.0 if re.match(pattern, c) else 0.0 for c in contents]

def correct(prompts, completions, answer, difficulty, **kwargs):
    return [float(c.strip() == a) * d for c, a, d in zip(completions, answer, difficulty)]

def only_some(prompts, completions, **kwargs):
    return [None if WORD in p else 1.0 for p in prompts]

def no_columns(prompts, completions):
    return [0.0] * len(completions)

def positional_only(texts):
    return [0.0] * len(texts)

def raises(prompts, completions, **kwargs):
    raise ZeroDivisionError("division by zero")

def short(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)

def text_score(prompts, completions, **kwargs):
    return [1.0, "high", 0.0][: len(completions)]

def nan_score(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

NOT_CALLABLE = 3
'''


@pytest.fixture
def module(tmp_path):
    (tmp_path / "helper.py").write_text("WORD = 'skip'\n")
    path = tmp_path / "my_rewards.py"
    path.write_text(TRL_STYLE)
    return path


def rewards(*configs):
    return build_rewards([RewardConfig.model_validate(c) for c in configs])


def test_a_trl_function_from_a_file_gets_the_prompt_records_columns(module):
    r = rewards({"name": "fmt", "function": f"{module}:format_reward"},
                {"name": "correct", "function": f"{module}:correct", "weight": 2.0})
    completions = ["<think>2+2</think><answer>4</answer>", " 5 ", "4"]
    s = r.score(["a", "b", "c"], completions, {"answer": ["4", "5", "3"], "difficulty": [1, 3, 1]})
    assert s.by_function == {"fmt": [1.0, 0.0, 0.0], "correct": [0.0, 3.0, 0.0]}
    assert s.total == [1.0, 6.0, 0.0]
    r.check_columns(["answer", "difficulty"])  # accepted
    with pytest.raises(ConfigError, match=r"reward 'correct'.*missing a required argument: 'difficulty'"):
        r.check_columns(["answer"])


def test_chat_completions_and_none_where_a_function_does_not_apply(module):
    r = rewards({"name": "fmt", "function": f"{module}:format_reward", "weight": 0.5},
                {"name": "some", "function": f"{module}:only_some"})
    completions = [[{"role": "assistant", "content": "<think>x</think><answer>1</answer>"}],
                   [{"role": "assistant", "content": "1"}]]
    s = r.score(["skip this", "keep"], completions)
    assert s.by_function["some"] == [None, 1.0]
    assert s.total == [0.5, 1.0]


def test_a_function_without_columns_refuses_them_before_training(module):
    r = rewards({"name": "plain", "function": f"{module}:no_columns"})
    r.check_columns([])
    with pytest.raises(ConfigError, match=r"reward 'plain'.*unexpected keyword argument 'answer'"):
        r.check_columns(["answer"])


@pytest.mark.parametrize("ref, message", [
    ("missing.py:f", r"reward 'r': module .*missing.py not found"),
    ("{module}:nope", r"reward 'r': module .*my_rewards.py has no 'nope'"),
    ("{module}:NOT_CALLABLE", r"reward 'r': .*NOT_CALLABLE is a int, not a function"),
    ("{module}:positional_only", r"reward 'r': .*\(texts\) does not take prompts and completions as keyword"),
    ("{broken}:f", r"reward 'r': module .*broken.py does not import: ModuleNotFoundError: No module named 'torchx'"),
])
def test_a_function_that_cannot_be_loaded_is_a_config_error(module, tmp_path, ref, message):
    broken = tmp_path / "broken.py"
    broken.write_text("import torchx\n\ndef f(prompts, completions, **kw):\n    return []\n")
    with pytest.raises(ConfigError, match=message):
        rewards({"name": "r", "function": ref.format(module=module, broken=broken)})


@pytest.mark.parametrize("fn, message", [
    ("raises", r"reward 'r' raised ZeroDivisionError: division by zero \(batch of 3 completions, the first: 'one'\)"),
    ("short", r"reward 'r' returned 2 scores for 3 completions"),
    ("text_score", r"reward 'r': item 1 is 'high' \(str\), not a finite number \(completion: 'two'\)"),
    ("nan_score", r"reward 'r': item 0 is nan \(float\), not a finite number \(completion: 'one'\)"),
])
def test_a_failing_function_fails_the_step_naming_it_and_the_first_bad_item(module, fn, message):
    r = rewards({"name": "r", "function": f"{module}:{fn}"})
    with pytest.raises(RewardError, match=message):
        r.score(["p"] * 3, ["one", "two", "three"])


def test_the_built_in_verifiers():
    r = rewards(
        {"name": "exact", "exact_match": {"column": "answer"}},
        {"name": "strict", "exact_match": {"column": "answer", "normalize": False}},
        {"name": "tagged", "exact_match": {"column": "answer", "extract": r"<answer>(.*?)</answer>"}},
        {"name": "format", "regex": {"must_match": [r"<answer>"], "must_not_match": [r"(?i)sorry"]}},
        {"name": "json", "json_schema": {"schema": {"type": "object", "required": ["x"],
                                                    "properties": {"x": {"type": "integer"}}}}},
        {"name": "short", "length": {"min_chars": 2, "max_chars": 20}},
    )
    completions = ["  Paris. ", "Sorry: <answer>Paris</answer>", '{"x": 1}', '{"x": "1"}', "x"]
    s = r.score(["q"] * 5, completions, {"answer": ["paris", "Paris", "Paris", "Paris", "x"]})
    assert s.by_function == {
        "exact": [1.0, 0.0, 0.0, 0.0, 1.0],
        "strict": [0.0, 0.0, 0.0, 0.0, 1.0],
        "tagged": [0.0, 1.0, 0.0, 0.0, 0.0],
        "format": [0.0, 0.0, 0.0, 0.0, 0.0],
        "json": [0.0, 0.0, 1.0, 0.0, 0.0],
        "short": [1.0, 0.0, 1.0, 1.0, 0.0],
    }
    with pytest.raises(RewardError, match=r"reward 'exact' raised KeyError: .*no column 'answer' \(they have: none\)"):
        r.score(["q"], ["x"])


@pytest.mark.parametrize("config, message", [
    ({"name": "r"}, "set exactly one of function, exact_match, regex, json_schema, length, http"),
    ({"name": "r", "regex": {"must_match": ["("]}}, "invalid regular expression"),
    ({"name": "r", "exact_match": {"column": "a", "extract": "x"}}, "needs exactly 1 group"),
    ({"name": "r", "length": {"min_chars": 5, "max_chars": 2}}, "min_chars 5 exceeds max_chars 2"),
    ({"name": "r", "function": "rewards.py"}, "should match pattern"),
    ({"name": "r", "http": {"url": "scorer:80"}}, "should match pattern"),
])
def test_bad_reward_settings_are_refused(config, message):
    with pytest.raises(ValidationError, match=message):
        RewardConfig.model_validate(config)


def test_an_invalid_json_schema_is_a_config_error():
    with pytest.raises(ConfigError, match="json_schema reward: the schema is invalid"):
        rewards({"name": "j", "json_schema": {"schema": {"type": "no-such-type"}}})


class _Scorer(BaseHTTPRequestHandler):
    behaviour: list[str] = []  # one per request: ok | fail | slow | bad
    seen: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Scorer.seen.append(body)
        what = _Scorer.behaviour.pop(0) if _Scorer.behaviour else "ok"
        if what == "slow":
            time.sleep(1.0)
        if what == "fail":
            self.send_response(503)
            self.end_headers()
            return
        code, doc = (400, {"error": "no"}) if what == "bad" else (200, {"scores": [len(c) for c in body["completions"]]})
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def scorer():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Scorer.behaviour, _Scorer.seen = [], []
    yield f"http://127.0.0.1:{server.server_port}/score"
    server.shutdown()
    server.server_close()


def http(url, **kw):
    return rewards({"name": "svc", "http": {"url": url, "timeout_seconds": 0.3, "retries": 2, **kw}})


def test_the_http_verifier_posts_the_batch_and_retries_a_failing_service(scorer, monkeypatch):
    monkeypatch.setattr("forge_trainer.rewards.http.BACKOFF_SECONDS", 0.01)
    _Scorer.behaviour = ["fail", "slow"]  # a 503, a timeout, then an answer
    s = http(scorer).score(["p", "q"], ["ab", "abcd"], {"answer": ["x", "y"]})
    assert s.total == [2.0, 4.0]
    assert len(_Scorer.seen) == 3
    assert _Scorer.seen[-1] == {"prompts": ["p", "q"], "completions": ["ab", "abcd"], "answer": ["x", "y"]}


def test_an_http_verifier_that_is_down_slow_or_refuses_fails_clearly(scorer):
    _Scorer.behaviour = ["slow"] * 3
    with pytest.raises(RewardError, match=r"reward 'svc': POST .* failed after 3 attempt\(s\): timed out after 0.3s"):
        http(scorer).score(["p"], ["a"])
    _Scorer.behaviour = ["bad"]
    with pytest.raises(RewardError, match=r"reward 'svc': POST .*: HTTP 400"):
        http(scorer).score(["p"], ["a"])
    down = scorer.replace(scorer.split(":")[2].split("/")[0], "1")  # nothing listens on port 1
    with pytest.raises(RewardError, match=r"reward 'svc': POST .* failed after 1 attempt\(s\): ConnectionRefusedError"):
        http(down, retries=0).score(["p"], ["a"])
