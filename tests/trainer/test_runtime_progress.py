"""Progress reporting pieces (runtime/progress.py): the Progress object, the pod annotation writer, the
termination message."""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta, timezone

from forge_trainer.contract import PROGRESS_ANNOTATION, ConfigError, TerminationMessage
from forge_trainer.runtime.progress import PodAnnotator, build_progress, write_termination_message

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def _progress(**kw):
    args = dict(step=25, total_steps=100, tokens_seen=25_000, token_budget=None, loss=2.5, learning_rate=1e-3,
                grad_norm=0.5, tokens_per_second=1000.0, mfu=None, last_checkpoint=None, now=NOW)
    return build_progress(**{**args, **kw})


def test_percent_and_eta_follow_the_nearest_budget():
    p = _progress()
    assert p.percent == 25.0 and p.eta_seconds == 75  # 75 steps x 1000 tokens at 1000 tokens/s
    assert p.updated_at == "2030-01-01T12:00:00Z"
    p = _progress(token_budget=50_000)  # the token budget ends the run first
    assert p.percent == 50.0 and p.eta_seconds == 25
    p = _progress(deadline=NOW + timedelta(seconds=10))
    assert p.eta_seconds == 10
    p = _progress(total_steps=None, tokens_per_second=None)
    assert p.percent is None and p.eta_seconds is None


class _FakeApi:
    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail
        self.done = threading.Event()

    def patch_namespaced_pod(self, name, namespace, body, _request_timeout=None):
        self.calls.append((name, namespace, body))
        self.done.set()
        if self.fail:
            raise RuntimeError("forbidden")


def test_the_pod_annotation_carries_the_progress_json():
    api = _FakeApi()
    annotator = PodAnnotator("worker-0", "team-a", api)
    annotator.submit(_progress())
    assert api.done.wait(5)
    annotator.close()
    name, namespace, body = api.calls[-1]
    assert (name, namespace) == ("worker-0", "team-a")
    assert json.loads(body["metadata"]["annotations"][PROGRESS_ANNOTATION]) == _progress().to_wire()


def test_failed_patches_are_logged_once_and_never_raise(caplog):
    api = _FakeApi(fail=True)
    annotator = PodAnnotator("worker-0", "team-a", api)
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            api.done.clear()
            annotator.submit(_progress(step=step))
            assert api.done.wait(5)
        annotator.close()
    assert len([r for r in caplog.records if "cannot annotate pod" in r.getMessage()]) == 1


def test_no_annotator_outside_a_cluster(monkeypatch):
    monkeypatch.delenv("FORGE_POD_NAME", raising=False)
    assert PodAnnotator.from_env() is None
    monkeypatch.setenv("FORGE_POD_NAME", "p")
    monkeypatch.setenv("FORGE_POD_NAMESPACE", "n")
    assert PodAnnotator.from_env() is None  # no service account token here


def test_termination_message_only_where_it_can_be_written(tmp_path):
    message = TerminationMessage.failed(ConfigError("bad field"))
    write_termination_message(str(tmp_path / "term"), message)
    assert (tmp_path / "term").read_text() == '{"status":"failed","exitCode":78,"message":"config error: bad field"}\n'
    write_termination_message(str(tmp_path / "missing-dir" / "term"), message)
    assert not (tmp_path / "missing-dir").exists()
