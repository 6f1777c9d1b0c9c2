"""Bad input: each ends with the documented exit code, one line naming the cause, and no output that looks valid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from trainer_helpers import read_termination, run_trainer, tiny_config, write_config

from forge_trainer.contract import ExitCode
from forge_trainer.__main__ import main


def _no_valid_output(cfg) -> None:
    assert not Path(cfg.output.dir).exists()
    assert not Path(cfg.checkpoint.dir).exists()
    assert not list(Path(cfg.cache_dir).glob("tokens/*/manifest.json"))


def _run_main(cfg, tmp_path, capsys) -> tuple[int, str]:
    code = main(["--config", str(write_config(cfg, tmp_path / "config.yaml"))])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forge-trainer:")]
    assert len(err) == 1, err
    return code, err[0]


def _bad_data(tmp_path: Path, case: str) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    if case == "unreadable":
        (d / "ok.txt").write_text("some perfectly fine text " * 50)
        os.symlink(tmp_path / "vanished.txt", d / "broken.txt")
    elif case == "small-vocab":
        (d / "a.txt").write_text("the cat sat on the mat. " * 100)
    return d


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("empty", ExitCode.DATA_ERROR, r"^forge-trainer: data error: data.sources\[0\].path \S+/data: no files match \*\*/\*.txt$"),
        ("unreadable", ExitCode.DATA_ERROR, r"^forge-trainer: data error: data.sources\[0\].path \S+/data: cannot read broken.txt: No such file or directory$"),
        ("small-vocab", ExitCode.DATA_ERROR, r"^forge-trainer: data error: tokenizer.train.vocab_size 320 is larger than the training data supports \(\d+ tokens"),
    ],
)
def test_data_problems_exit_65(tmp_path, capsys, case, code, message):
    cfg = tiny_config(tmp_path, _bad_data(tmp_path, case))
    got, line = _run_main(cfg, tmp_path, capsys)
    assert got == code
    assert __import__("re").match(message, line), line
    _no_valid_output(cfg)
    assert read_termination(cfg) == {"status": "failed", "exitCode": code, "message": line.removeprefix("forge-trainer: ")}


@pytest.mark.parametrize(("local_rank", "writes"), [("0", True), ("1", False)])
def test_each_nodes_first_process_writes_the_failure(tmp_path, capsys, monkeypatch, local_rank, writes):
    """Under torchrun every pod needs its exit code: local rank 0 of each node writes it, whatever its global rank."""
    monkeypatch.setenv("RANK", "1")  # node 1 of a multi-node run (WORLD_SIZE unset: the process trains alone)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    cfg = tiny_config(tmp_path, _bad_data(tmp_path, "empty"))
    code, line = _run_main(cfg, tmp_path, capsys)
    assert code == ExitCode.DATA_ERROR
    if writes:
        assert read_termination(cfg) == {"status": "failed", "exitCode": code, "message": line.removeprefix("forge-trainer: ")}
    else:
        assert not Path(cfg.termination_message_path).exists()


def test_seq_len_above_the_model_context_exits_78(tmp_path, corpus, capsys):
    cfg = tiny_config(tmp_path, corpus)
    raw = json.loads(cfg.model_dump_json())
    raw["training"]["seq_len"] = 512
    (tmp_path / "config.yaml").write_text(json.dumps(raw))
    assert main(["--config", str(tmp_path / "config.yaml")]) == ExitCode.CONFIG_ERROR
    line = capsys.readouterr().err.strip()
    assert line == ("forge-trainer: config error: training.seq_len 512 exceeds the model's context "
                    "(model.architecture.max_position_embeddings 128)")
    _no_valid_output(cfg)


def test_seq_len_above_a_base_models_context_exits_78(reference, tmp_path, corpus, capsys):
    base, _, _ = reference
    cfg = tiny_config(tmp_path, corpus, method="continued-pretrain", model={"base_path": base.output.dir},
                      tokenizer={"from_base": True}, training__seq_len=256)
    code, line = _run_main(cfg, tmp_path, capsys)
    assert code == ExitCode.CONFIG_ERROR
    assert line == "forge-trainer: config error: training.seq_len 256 exceeds the model's context (max_position_embeddings 128)"
    _no_valid_output(cfg)


def test_a_model_too_big_for_memory_exits_78_before_allocating(tmp_path, corpus, capsys):
    cfg = tiny_config(tmp_path, corpus, model__architecture={
        "num_layers": 48, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
        "max_position_embeddings": 128})
    code, line = _run_main(cfg, tmp_path, capsys)
    assert code == ExitCode.CONFIG_ERROR
    assert __import__("re").match(
        r"forge-trainer: config error: the model \([\d,.]+M parameters\) with micro_batch_sequences 4 and seq_len 64 "
        r"needs about [\d,.]+ GiB per worker, but only [\d,.]+ GiB is available on cpu", line), line
    assert not Path(cfg.output.dir).exists() and not Path(cfg.checkpoint.dir).exists()


def test_an_unknown_method_and_a_missing_file_are_config_errors(tmp_path, corpus, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == ExitCode.CONFIG_ERROR
    assert "config error: cannot read" in capsys.readouterr().err
    cfg = json.loads(tiny_config(tmp_path, corpus).model_dump_json())
    cfg["method"] = "ppo"
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["--config", str(tmp_path / "c.json")]) == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("forge-trainer: config error:") and "'ppo'" in err and "'grpo'" in err and "'dpo'" in err, err


def test_the_process_exit_code_is_the_documented_one(tmp_path):
    """The same path as the operator sees it: a real process, its status and its termination message."""
    (tmp_path / "data").mkdir()
    cfg = tiny_config(tmp_path, tmp_path / "data")
    proc = run_trainer(write_config(cfg, tmp_path / "config.yaml"))
    assert proc.returncode == ExitCode.DATA_ERROR, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("forge-trainer: data error: data.sources[0].path")
    assert "Traceback" not in proc.stderr
    assert read_termination(cfg)["exitCode"] == 65
