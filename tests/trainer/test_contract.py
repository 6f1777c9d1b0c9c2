"""The wire format shared with the operator (contract.py): the exact JSON it parses, exit codes, errors."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from forge_trainer.contract import (ConfigError, DataError, ExitCode, LastCheckpoint, Progress, StoppedBeforeTraining,
                                    TerminationMessage, TrainerError, error_named)
from forge_trainer.runtime.progress import build_progress

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
CKPT = LastCheckpoint(step=20, path="/ckpt/step-00000020", time="2030-01-01T11:59:00Z")


def test_the_progress_annotation_has_every_key_in_camel_case():
    p = build_progress(step=25, total_steps=100, tokens_seen=25_000, token_budget=None, loss=2.5, learning_rate=1e-3,
                       grad_norm=0.5, tokens_per_second=1000.0, mfu=None, last_checkpoint=CKPT, now=NOW)
    assert p.to_json() == (
        '{"step":25,"totalSteps":100,"tokensSeen":25000,"tokenBudget":null,"percent":25.0,"loss":2.5,'
        '"learningRate":0.001,"gradNorm":0.5,"tokensPerSecond":1000.0,"mfu":null,"etaSeconds":75,'
        '"updatedAt":"2030-01-01T12:00:00Z",'
        '"lastCheckpoint":{"step":20,"path":"/ckpt/step-00000020","time":"2030-01-01T11:59:00Z"},'
        '"methodMetrics":null}')
    assert Progress.model_validate_json(p.to_json()) == p  # what the operator parses is what was sent
    # a method's own figures (dpo's) go along by name; an operator that does not know the key ignores it
    dpo = build_progress(step=1, total_steps=None, tokens_seen=1, token_budget=None, loss=0.6, learning_rate=1e-6,
                         grad_norm=None, tokens_per_second=None, mfu=None, last_checkpoint=None, now=NOW,
                         method_metrics={"reward_accuracy": 0.75, "reward_margin": 0.1234567})
    assert json.loads(dpo.to_json())["methodMetrics"] == {"reward_accuracy": 0.75, "reward_margin": 0.123457}


def test_a_finished_runs_message_has_every_key_a_failed_ones_only_the_error():
    done = TerminationMessage(status="completed", reason="max_steps", step=30, total_steps=30, tokens_seen=30_720,
                              train_loss=1.5, val_loss=None, output_dir="/out", checkpoint=CKPT.path, last_checkpoint=CKPT,
                              started_at="2030-01-01T11:00:00Z", ended_at="2030-01-01T12:00:00Z", exit_code=ExitCode.OK)
    assert list(json.loads(done.to_json())) == [
        "status", "reason", "step", "totalSteps", "tokensSeen", "trainLoss", "valLoss", "outputDir", "checkpoint",
        "lastCheckpoint", "startedAt", "endedAt", "exitCode"]
    assert json.loads(done.to_json())["valLoss"] is None  # present: the operator tells a summary by its keys
    failed = TerminationMessage.failed(DataError("data.sources[0].path /d: no files match **/*.txt"))
    assert failed.to_json() == ('{"status":"failed","exitCode":65,'
                                '"message":"data error: data.sources[0].path /d: no files match **/*.txt"}')
    for message in (done, failed):
        assert TerminationMessage.model_validate_json(message.to_json()).to_json() == message.to_json()


def test_the_operator_reads_messages_with_keys_it_does_not_know():
    line = '{"status":"preempted","exitCode":75,"step":12,"fromTheFuture":true}'
    message = TerminationMessage.model_validate_json(line)
    assert (message.status, message.exit_code, message.step) == ("preempted", ExitCode.PREEMPTED, 12)


def test_the_operator_reads_older_or_partial_messages():
    # an older trainer's preempted line has no exitCode; a progress report needs only its step
    older = TerminationMessage.model_validate_json('{"status":"preempted","reason":"sigterm","step":7}')
    assert (older.status, older.exit_code, older.step) == ("preempted", None, 7)
    partial = Progress.model_validate_json('{"step":95,"loss":1.95,"lastCheckpoint":{"step":90}}')
    assert (partial.step, partial.loss, partial.tokens_seen, partial.last_checkpoint.path) == (95, 1.95, None, None)
    # ... and the trainer still writes every key
    assert set(json.loads(Progress(step=1).to_json())) == set(json.loads(partial.to_json())) == {
        Progress.model_fields[name].alias for name in Progress.model_fields}
    # a crash's stderr tail, or JSON of another shape, is no message
    for text in ("Traceback (most recent call last):", '["step", 7]', '{"status":"crashed","exitCode":1}', '{}x'):
        with pytest.raises(ValidationError):
            TerminationMessage.model_validate_json(text)
    with pytest.raises(ValidationError):
        Progress.model_validate_json('{"loss":1.95}')


def test_exit_codes_and_the_errors_that_carry_them():
    assert {c.name: int(c) for c in ExitCode} == {"OK": 0, "DATA_ERROR": 65, "RENDEZVOUS_TIMEOUT": 69, "PREEMPTED": 75,
                                                  "CONFIG_ERROR": 78}
    assert (DataError.exit_code, ConfigError.exit_code, StoppedBeforeTraining.exit_code) == (65, 78, 75)
    assert str(ConfigError("bad")) == "config error: bad"
    # another rank's error, sent by class name and message, is the same error here
    again = error_named("ConfigError", "bad")
    assert isinstance(again, ConfigError) and again.exit_code == ExitCode.CONFIG_ERROR and str(again) == "config error: bad"
    assert isinstance(error_named("TrainerError", "x"), TrainerError) and error_named("OSError", "x") is None
