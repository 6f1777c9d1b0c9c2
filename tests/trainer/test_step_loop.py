"""What runs around the step: compile by device, controlled garbage collection, the CUDA allocator's
environment, and no read-back from the device between log lines."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import _free_port
from trainer_helpers import REPO, tiny_config

import forge_trainer
from forge_trainer.contract import ConfigError
from forge_trainer.models.build import build_model, compiles, hf_config
from forge_trainer.models.parallel import blocks
from forge_trainer.runtime.dist import ALLOCATOR_CONF, EXPANDABLE_SEGMENTS, Dist, default_allocator_conf

TRAINER = Path(forge_trainer.__file__).parent
ALLOCATOR_NAMES = (ALLOCATOR_CONF, "PYTORCH_ALLOC_CONF")


@pytest.mark.parametrize("setting, device, compiled", [
    (None, "cuda", True), (None, "cpu", False), (True, "cpu", True), (False, "cuda", False), (True, "cuda", True),
])
def test_blocks_compile_on_gpus_unless_training_compile_says(tmp_path, setting, device, compiled):
    cfg = tiny_config(tmp_path, tmp_path, training__compile=setting)
    assert compiles(cfg, torch.device(device)) is compiled


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_without_the_compiler_torch_compile_needs_the_default_is_eager_and_true_is_refused(tmp_path, monkeypatch,
                                                                                          device):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for name in ("CC", "CXX"):
        monkeypatch.delenv(name, raising=False)
    assert not compiles(tiny_config(tmp_path, tmp_path), torch.device(device))
    with pytest.raises(ConfigError, match="^config error: training.compile: torch.compile needs a C.* compiler"):
        compiles(tiny_config(tmp_path, tmp_path, training__compile=True), torch.device(device))
    monkeypatch.setenv("CC" if device == "cuda" else "CXX", "/opt/cc")
    assert compiles(tiny_config(tmp_path, tmp_path), torch.device("cuda")) is (device == "cuda")


@pytest.mark.parametrize("setting", [None, True])
def test_the_built_model_has_its_blocks_compiled_as_decided(tmp_path, setting):
    cfg = tiny_config(tmp_path, tmp_path, training__compile=setting)
    model = build_model(cfg, hf_config(cfg, 320, 0))  # on CPU: the default leaves them eager
    assert all((layer._compiled_call_impl is not None) is bool(setting) for layer in blocks(model))


def _step_of_the_loop() -> int | None:
    """The step train.run's loop is at, read from its frame (None: not inside run)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "run" and frame.f_code.co_filename == str(TRAINER / "train.py"):
            state = frame.f_locals.get("state")
            return state.step if state is not None else None
        frame = frame.f_back
    return None


def test_training_runs_without_automatic_gc_collecting_every_n_steps_and_reads_the_device_only_to_log(
        tmp_path, corpus, shared_cache, monkeypatch):
    """Automatic collection is off while the loop runs, a collection comes every gc_interval_steps at a
    step boundary, and the trainer's own code reads tensors back (item, tolist, float, ...: a device
    sync on a GPU) only at the log steps and the final evaluation; the collector is as it was afterwards."""
    collections, reads = [], []

    def on_gc(phase, info):
        if phase == "start" and not gc.isenabled():
            collections.append((_step_of_the_loop(), info["generation"]))

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if Path(sys._getframe(1).f_code.co_filename).is_relative_to(TRAINER):
                step = _step_of_the_loop()
                if step is not None:  # the set-up's reads come before the loop
                    reads.append(step)
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    for name in ALLOCATOR_NAMES:
        monkeypatch.delenv(name, raising=False)
    cfg = tiny_config(tmp_path, corpus, shared_cache, training__budget={"max_steps": 6}, training__gc_interval_steps=2,
                      training__log_interval_steps=3, training__eval_interval_steps=None,
                      checkpoint__interval_steps=None, metrics__progress_interval_seconds=3600)
    gc.callbacks.append(on_gc)
    try:
        summary = forge_trainer.run(cfg)
    finally:
        gc.callbacks.remove(on_gc)
    assert summary.step == 6 and [h["step"] for h in summary.history] == [3, 6]
    assert collections == [(2, 1), (4, 1), (6, 1)]  # generation 1, after steps 2, 4 and 6; nothing automatic
    assert set(reads) == {3, 6}, reads  # the log lines (3, 6) and the final evaluation (6)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert os.environ[ALLOCATOR_CONF] == EXPANDABLE_SEGMENTS  # set before the process group (and CUDA) starts


def test_the_loops_decisions_are_reduced_on_the_host_never_through_the_device(monkeypatch):
    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None, group=None: reduced.append((t, group)))
    d = Dist(rank=0, world=2, device=torch.device("meta"), control_group="the gloo control group")
    assert d.max_flags([1, 0, 1]) == [1, 0, 1]
    [(tensor, group)] = reduced
    assert tensor.device.type == "cpu" and group == "the gloo control group"


@pytest.mark.parametrize("environ, expected", [
    ({}, {ALLOCATOR_CONF: EXPANDABLE_SEGMENTS}),
    ({ALLOCATOR_CONF: "backend:cudaMallocAsync"}, {ALLOCATOR_CONF: "backend:cudaMallocAsync"}),
    ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}, {"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}),
])
def test_expandable_segments_unless_the_user_configures_the_allocator(environ, expected):
    default_allocator_conf(environ)
    assert environ == expected


@pytest.mark.parametrize("user", [None, "backend:cudaMallocAsync"])
def test_the_launchers_workers_start_with_the_allocator_setting(tmp_path, user):
    """The pod's command (forge_trainer.launch, torchrun): both workers have the setting from their start,
    or the pod's own value when its env sets one."""
    script = tmp_path / "worker.py"
    script.write_text("import os, sys\n"
                      f"open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').write(os.environ.get({ALLOCATOR_CONF!r}, ''))\n")
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_NAMES} | {"OMP_NUM_THREADS": "1"}
    if user is not None:
        env[ALLOCATOR_CONF] = user
    out = subprocess.run(
        [sys.executable, "-m", "forge_trainer.launch", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=static",
         f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--max-restarts=0", str(script), str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [(tmp_path / r).read_text() for r in "01"] == [user or EXPANDABLE_SEGMENTS] * 2
