"""s3:// locations against a real S3-compatible server (versitygw, tests/s3server): data copied to local
scratch with its per-file SHA-256 manifest, checkpoints uploaded and resumed from, the export uploaded with
provenance.json last, and a wrong credential or an unreachable endpoint failing with a message that names
the field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from s3server import free_port
from trainer_helpers import read_termination, tiny_config, write_config

import forge_trainer
from forge_trainer.__main__ import main
from forge_trainer.contract import ExitCode
from forge_trainer.runtime.checkpoint import retain_after_success
from forge_trainer.runtime.egress import policy_of
from forge_trainer.runtime.s3checkpoint import S3Checkpoints
from forge_trainer.runtime.storage import S3Url, scratch_of


def _upload(client, bucket: str, local: Path, prefix: str) -> dict[str, str]:
    """Upload a folder; the SHA-256 of each file by its relative path."""
    digests = {}
    for path in sorted(local.rglob("*")):
        if path.is_file():
            rel = path.relative_to(local).as_posix()
            client.upload_file(str(path), bucket, f"{prefix}/{rel}")
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def _keys(client, bucket: str, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", [])}


def _s3_config(work: Path, bucket: str, server, **overrides):
    return tiny_config(work, f"s3://{bucket}/data", work / "cache", checkpoint__dir=f"s3://{bucket}/ckpt",
                       output__dir=f"s3://{bucket}/model", s3={"endpoint": server.endpoint, "path_style": True},
                       **overrides)


@pytest.fixture
def s3_env(s3server, monkeypatch):
    for name, value in s3server.env().items():
        monkeypatch.setenv(name, value)
    return s3server


def test_training_reads_data_from_s3_checkpoints_there_resumes_from_it_and_exports_there(
        s3_env, bucket, corpus, tmp_path):
    client = s3_env.client()
    digests = _upload(client, bucket, corpus, "data")
    cfg = _s3_config(tmp_path, bucket, s3_env, training__budget__max_steps=20)

    first = forge_trainer.run(cfg)
    assert first.status == "completed" and first.step == 20
    assert first.checkpoint == f"s3://{bucket}/ckpt/step-00000020"
    ckpt = _keys(client, bucket, "ckpt")
    assert "latest" in ckpt and "step-00000020/trainer_state.json" in ckpt and "step-00000020/.metadata" in ckpt
    assert client.get_object(Bucket=bucket, Key="ckpt/latest")["Body"].read().decode().strip() == "step-00000020"
    assert any(k.startswith("step-00000020/__") and k.endswith(".distcp") for k in ckpt)

    # the export is in the bucket; its provenance lists every data file with the SHA-256 of what was uploaded
    model = _keys(client, bucket, "model")
    assert {"provenance.json", "config.json", "model.safetensors", "tokenizer.json"} <= model
    provenance = json.loads(client.get_object(Bucket=bucket, Key="model/provenance.json")["Body"].read())
    files = {f["path"]: f["sha256"] for src in provenance["data"]["sources"] for f in src["files"]}
    assert files == digests
    assert provenance["config"]["data"]["sources"][0]["path"] == f"s3://{bucket}/data"
    # nothing of the checkpoints or the export is left in the local staging; the data copy stays for reuse
    scratch = scratch_of(cfg)
    assert not list((scratch / "checkpoints").rglob("*.distcp")) and not (scratch / "output").exists()
    assert sorted(p.name for p in (scratch / "s3" / bucket / "data").iterdir()) == sorted(digests)

    # a second run with a larger budget resumes from the checkpoint in the bucket
    second = forge_trainer.run(cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"budget": cfg.training.budget.model_copy(update={"max_steps": 30})})}))
    assert second.start_step == 20 and second.step == 30 and second.status == "completed"
    assert second.history[0]["step"] == 21
    provenance = json.loads(client.get_object(Bucket=bucket, Key="model/provenance.json")["Body"].read())
    assert provenance["steps"] == 30 and provenance["resumed_from"] == f"s3://{bucket}/ckpt/step-00000020"
    assert client.get_object(Bucket=bucket, Key="ckpt/latest")["Body"].read().decode().strip() == "step-00000030"


def test_a_checkpoint_is_complete_only_once_its_trainer_state_is_uploaded(s3_env, bucket, corpus, tmp_path):
    client = s3_env.client()
    _upload(client, bucket, corpus, "data")
    cfg = _s3_config(tmp_path, bucket, s3_env, training__budget__max_steps=20, checkpoint__retain_after_success="All")
    forge_trainer.run(cfg)
    ckpts = S3Checkpoints(cfg.checkpoint.dir, cfg.s3)
    assert str(ckpts.find_latest()) == f"s3://{bucket}/ckpt/step-00000020"
    # an upload killed before its commit: shards there, trainer state not yet
    client.delete_object(Bucket=bucket, Key="ckpt/step-00000020/trainer_state.json")
    assert str(ckpts.find_latest()) == f"s3://{bucket}/ckpt/step-00000010"
    assert not ckpts.is_complete(S3Url.parse(f"s3://{bucket}/ckpt/step-00000020"))

    # checkpoint.retain_after_success on S3: Last keeps the newest complete one, None removes all and latest
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"retain_after_success": "Last"})})
    assert retain_after_success(cfg.checkpoint, cfg.s3) == [f"s3://{bucket}/ckpt/step-00000020"]
    assert {k.partition("/")[0] for k in _keys(client, bucket, "ckpt")} == {"latest", "step-00000010"}
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"retain_after_success": "None"})})
    assert retain_after_success(cfg.checkpoint, cfg.s3) == [f"s3://{bucket}/ckpt/step-00000010"]
    assert _keys(client, bucket, "ckpt") == set()


def test_a_wrong_credential_fails_with_a_message_naming_the_field(s3_env, bucket, corpus, tmp_path, monkeypatch):
    _upload(s3_env.client(), bucket, corpus, "data")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    cfg = _s3_config(tmp_path, bucket, s3_env)
    assert main(["--config", str(write_config(cfg, tmp_path / "config.yaml"))]) == ExitCode.CONFIG_ERROR
    message = read_termination(cfg)["message"]
    assert message.startswith(f"storage error: data.sources[0].path s3://{bucket}/data: the S3 credentials were "
                              f"refused by {s3_env.endpoint}: check the Secret of data.sources[0].path.s3.secretRef "
                              "(SignatureDoesNotMatch: ")


def test_an_unreachable_endpoint_fails_with_a_message_naming_the_field(s3_env, tmp_path, corpus):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = tiny_config(tmp_path, corpus, tmp_path / "cache", checkpoint__dir="s3://forge-nowhere/ckpt",
                      s3={"endpoint": endpoint, "path_style": True, "max_attempts": 1, "connect_timeout_seconds": 2})
    assert main(["--config", str(write_config(cfg, tmp_path / "config.yaml"))]) == ExitCode.CONFIG_ERROR
    message = read_termination(cfg)["message"]
    assert message.startswith(f"storage error: checkpoint.dir s3://forge-nowhere/ckpt: cannot reach the S3 endpoint "
                              f"{endpoint} (checkpoint.dir.s3.endpoint)"), message


def test_the_egress_lock_allows_the_s3_endpoint_of_the_locations(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, output__dir="s3://models/run",
                      s3={"endpoint": "http://192.0.2.10:9000", "path_style": True})
    policy = policy_of(cfg)
    assert "192.0.2.10:9000" in policy.names and policy.allows("192.0.2.10", 9000)
    assert not policy.allows("192.0.2.10", 9001) and not policy.allows("192.0.2.11", 9000)
    assert "192.0.2.10:9000" not in policy_of(tiny_config(tmp_path, corpus, s3={"endpoint": "http://192.0.2.10:9000"})).names


def test_the_evaluator_reads_a_model_a_checkpoint_folder_and_suites_from_s3_as_from_local_files(
        s3_env, bucket, models, tmp_path, monkeypatch):
    from forge_trainer.config import S3Config
    from forge_trainer.contract import StorageError
    from forge_trainer.eval.config import EvalConfig, SuiteConfig
    from forge_trainer.eval.run import evaluate
    from forge_trainer.runtime.checkpoint import find_latest

    client = s3_env.client()
    export, ckpt = Path(models["strong"].output_dir), models["work"] / "weak" / "ckpt"
    for local, prefix in ((export, "model"), (ckpt, "ckpt"), (models["heldout"], "heldout"), (models["mc"], "mc")):
        _upload(client, bucket, local, prefix)

    def config(model, baseline, heldout, mc, output, **kw) -> EvalConfig:
        return EvalConfig(name="e", model_path=str(model), baseline_path=str(baseline), output_dir=str(output), device="cpu",
                          suites=[SuiteConfig(name="heldout", type="perplexity", path=str(heldout), format="text", seq_len=64),
                                  SuiteConfig(name="mc", type="multiple-choice", path=str(mc))], **kw)

    on_disk = evaluate(config(export, ckpt, models["heldout"], models["mc"], tmp_path / "out"))
    s3 = dict(s3=S3Config(endpoint=s3_env.endpoint, path_style=True), scratch_dir=str(tmp_path / "scratch"),
              fields={f"s3://{bucket}/model": "spec.model.checkpoint"})
    in_bucket = config(f"s3://{bucket}/model", f"s3://{bucket}/ckpt", f"s3://{bucket}/heldout", f"s3://{bucket}/mc",
                       f"s3://{bucket}/model/evaluations/e", **s3)
    from_s3 = evaluate(in_bucket)
    assert [(s.suite, s.samples, s.metrics, s.baseline) for s in from_s3.suites] == [
        (s.suite, s.samples, s.metrics, s.baseline) for s in on_disk.suites]
    # the results are uploaded beside the model, results.json last; of the checkpoint folder only the newest
    # complete checkpoint (the one evaluated) was downloaded
    assert from_s3.results == f"s3://{bucket}/model/evaluations/e/results.json"
    assert {"results.json", "report.md"} <= _keys(client, bucket, "model/evaluations/e")
    uploaded = json.loads(client.get_object(Bucket=bucket, Key="model/evaluations/e/results.json")["Body"].read())
    assert uploaded["model"] == f"s3://{bucket}/model" and uploaded["baseline"] == f"s3://{bucket}/ckpt"
    assert [p.name for p in (tmp_path / "scratch" / "s3" / bucket / "ckpt").iterdir()] == [find_latest(ckpt).name]

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match=rf"^storage error: spec.model.checkpoint s3://{bucket}/model: the S3 "
                                           r"credentials were refused by .*: check the Secret of "
                                           r"spec.model.checkpoint.s3.secretRef"):
        evaluate(in_bucket)
