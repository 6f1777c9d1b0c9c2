"""Checkpoints written in the background (runtime/checkpoint.py Checkpointer), the collective timeouts, and
the export of a sharded model (runtime/export.py), in two gloo processes on CPU with tiny models."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from gloo_helpers import on_ranks
from trainer_helpers import tiny_config

from forge_trainer.runtime.checkpoint import LATEST, SLEEP_ENV, Checkpointer, TrainState, find_latest, is_complete


def _sharded(seed: int = 0):
    """A tiny FSDP2 model (each rank holds half of every weight) and its optimizer."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, optimizer, step: int) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _full(model, optimizer) -> dict:
    """The whole model and optimizer state (every rank's shards gathered), comparable across runs."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": model_sd, "optim": optim_sd}


def _loaded(path: Path, d) -> dict:
    from forge_trainer.runtime.checkpoint import load

    model, optimizer = _sharded(seed=1)  # other weights: the checkpoint must replace them
    _step(model, optimizer, 99)
    load(path, model, optimizer, d)
    return _full(model, optimizer)


def _async_and_sync(d, background_cfg, sync_cfg, final_cfg) -> dict:
    model, optimizer = _sharded()
    _step(model, optimizer, 1)
    Checkpointer(sync_cfg, d).save(model, optimizer, TrainState(step=1), final=True)
    saves = Checkpointer(background_cfg, d)
    os.environ[SLEEP_ENV] = "2"  # the background thread sleeps this long before the commit
    t0 = time.monotonic()
    saves.save(model, optimizer, TrainState(step=1))
    returned_after = time.monotonic() - t0
    committed_at_return = is_complete(Path(background_cfg.checkpoint.dir) / "step-00000001")
    _step(model, optimizer, 2)  # the training goes on, changing the weights in place while they are written
    _step(model, optimizer, 3)
    last = saves.wait()
    del os.environ[SLEEP_ENV]
    return {"returned_after": returned_after, "committed_at_return": committed_at_return, "last": last.step,
            "background": _loaded(Path(background_cfg.checkpoint.dir) / "step-00000001", d),
            "sync": _loaded(Path(sync_cfg.checkpoint.dir) / "step-00000001", d),
            "final": _final_after_background(d, final_cfg)}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_equal(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def saves_on_two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One pair of gloo processes for the tests below (each pair costs seconds to start)."""
    tmp = tmp_path_factory.mktemp("saves")
    cfgs = [tiny_config(tmp, tmp / "corpus", checkpoint__dir=str(tmp / name)) for name in ("bg", "sync", "final")]
    return tmp, on_ranks(tmp / "run", _async_and_sync, *cfgs)


def test_a_background_save_resumes_to_the_same_state_as_a_sync_save(saves_on_two_ranks):
    tmp_path, results = saves_on_two_ranks
    for r in results:
        # the training went on before the checkpoint was committed (the commit waits for the write)
        assert r["returned_after"] < 2 and not r["committed_at_return"] and r["last"] == 1
        _assert_equal(r["background"], r["sync"])  # written from the state as it was at the save
    assert (tmp_path / "bg" / LATEST).read_text().strip() == "step-00000001"
    assert len(list((tmp_path / "bg" / "step-00000001").glob("*.distcp"))) == 2


def _killed_in_background_write(d, cfg) -> None:
    model, optimizer = _sharded()
    saves = Checkpointer(cfg, d)
    _step(model, optimizer, 1)
    saves.save(model, optimizer, TrainState(step=1))
    _step(model, optimizer, 2)
    os.environ[SLEEP_ENV] = "60"
    saves.save(model, optimizer, TrainState(step=2))  # waits for step 1's commit, then starts step 2's write
    written = Path(cfg.checkpoint.dir) / "step-00000002.tmp" / ".metadata"  # every rank's shards are written
    while not written.exists():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_kill_during_the_background_write_leaves_the_previous_checkpoint_and_latest(tmp_path):
    import torch.distributed.checkpoint as dcp
    import torch.multiprocessing as mp

    ckpt = tmp_path / "ckpt"
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        on_ranks(tmp_path / "run", _killed_in_background_write, tiny_config(tmp_path, tmp_path / "corpus"))
    assert (ckpt / "step-00000002.tmp" / ".metadata").is_file() and not is_complete(ckpt / "step-00000002.tmp")
    assert not (ckpt / "step-00000002").exists()
    assert (ckpt / LATEST).read_text().strip() == "step-00000001" and find_latest(ckpt) == ckpt / "step-00000001"
    metadata = dcp.FileSystemReader(str(ckpt / "step-00000001")).read_metadata()
    assert any(k.startswith("model.") for k in metadata.state_dict_metadata)


def _final_after_background(d, cfg) -> dict:
    model, optimizer = _sharded()
    saves = Checkpointer(cfg, d)
    _step(model, optimizer, 1)
    os.environ[SLEEP_ENV] = "1"
    saves.save(model, optimizer, TrainState(step=1))
    _step(model, optimizer, 2)
    t0 = time.monotonic()
    saves.save(model, optimizer, TrainState(step=2), final=True)  # SIGTERM: wait for step 1, then write step 2
    root = Path(cfg.checkpoint.dir)
    return {"seconds": time.monotonic() - t0, "complete": [is_complete(root / f"step-0000000{s}") for s in (1, 2)],
            "latest": (root / LATEST).read_text().strip(), "last": saves.last.step, "pending": saves.wait().step}


def test_the_final_save_waits_for_the_background_one_and_is_written_before_it_returns(saves_on_two_ranks):
    """The end of a run and SIGTERM write the last checkpoint in front: committed when save returns."""
    for r in (r["final"] for r in saves_on_two_ranks[1]):
        assert r["complete"] == [True, True] and r["latest"] == "step-00000002"
        assert r["last"] == r["pending"] == 2
        assert r["seconds"] >= 2  # step 1's background sleep, then step 2's own (the hook sleeps in both)


def _timeouts(d) -> dict:
    from datetime import timedelta

    import torch.distributed as dist

    d.set_timeout(timedelta(seconds=1))
    if d.rank == 1:
        time.sleep(4)
    t0 = time.monotonic()
    try:
        dist.barrier()
        step_group = "waited"
    except RuntimeError:
        step_group = "timed out"
    waited = time.monotonic() - t0
    dist.monitored_barrier(group=d.setup_group, timeout=timedelta(seconds=30))  # the side groups keep theirs
    dist.barrier(group=d.checkpoint_group)
    return {"step_group": step_group, "waited": waited}




class _Tokenizer:
    eos_id, stop_ids = 0, [0]

    def save_pretrained(self, out_dir) -> None:
        pass


def _export_sharded(d, cfg, out: Path) -> dict:
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from forge_trainer.runtime.export import export

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    unsharded = {k: v.clone() for k, v in model.state_dict().items()}
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    rng = torch.get_rng_state()
    export(out, model, cfg, _Tokenizer(), {"run_name": "test"}, d)
    return {"unsharded": unsharded, "rng_untouched": torch.equal(rng, torch.get_rng_state()), **_timeouts(d)}


@pytest.fixture(scope="module")
def exported_on_two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    from transformers import LlamaConfig

    tmp = tmp_path_factory.mktemp("export")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return tmp / "out", on_ranks(tmp / "run", _export_sharded, cfg, tmp / "out")


def test_the_training_timeout_is_tightened_and_the_side_groups_keep_theirs(exported_on_two_ranks):
    rank0 = exported_on_two_ranks[1][0]
    assert rank0["step_group"] == "timed out" and rank0["waited"] < 3.5


def test_the_export_of_a_sharded_model_equals_the_unsharded_weights(exported_on_two_ranks):
    from transformers import AutoModelForCausalLM

    out, results = exported_on_two_ranks
    unsharded = results[0]["unsharded"]
    # rank 0 built the exported model empty (meta) and loaded the gathered weights: no initialisation drawn
    assert results[0]["rng_untouched"]
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert exported.keys() == unsharded.keys()
    for k, v in unsharded.items():
        assert exported[k].dtype == torch.float32 and torch.equal(exported[k], v), k
    assert exported["lm_head.weight"].data_ptr() == exported["model.embed_tokens.weight"].data_ptr()
