"""The model at scale, on CPU: built on the meta device and materialised as it is sharded (the same weights
on any number of workers), a base model read by one process and handed out in shards, gradients that stay
sharded through gradient accumulation, and activation checkpointing per block."""

from __future__ import annotations

import math

import pytest
import torch
from gloo_helpers import on_ranks
from trainer_helpers import tiny_config
from transformers import AutoModelForCausalLM

from forge_trainer.methods.pretrain import Pretrain
from forge_trainer.models.build import build_model, hf_config
from forge_trainer.models.stats import activation_bytes, held_bytes
from forge_trainer.runtime.dist import Dist
from forge_trainer.train import train_step

VOCAB = 320


def _config(tmp_path, corpus, **overrides):
    return tiny_config(tmp_path, corpus, **overrides)


def _base_config(tmp_path, corpus, base):
    return tiny_config(tmp_path, corpus, model={"base_path": str(base)}, method="continued-pretrain")


def _batch(seed: int, rows: int = 4, length: int = 33) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_a_new_model_is_built_on_the_meta_device_with_hugging_faces_initialisation(tmp_path, corpus):
    cfg = _config(tmp_path, corpus)
    hf = hf_config(cfg, VOCAB, 0)
    built = build_model(cfg, hf).state_dict()
    # Hugging Face's initialisation of the whole model, drawn from the same seed, in the same order
    with torch.device("meta"):
        whole = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
    whole.to_empty(device="cpu")
    torch.manual_seed(cfg.training.seed)
    whole.initialize_weights()
    assert built.keys() == whole.state_dict().keys()
    for name, value in whole.state_dict().items():
        assert torch.equal(built[name], value), name
    # An eager build draws PyTorch's default initialisation before Hugging Face's, so its values differ
    # for the same seed; its distributions do not.
    torch.manual_seed(cfg.training.seed)
    eager = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
    for name, value in eager.state_dict().items():
        assert built[name].mean().item() == pytest.approx(value.mean().item(), abs=0.01), name
        assert built[name].std().item() == pytest.approx(value.std().item(), rel=0.1, abs=1e-6), name
    rotary = [m for m in eager.modules() if "Rotary" in type(m).__name__][0]
    built_rotary = [m for m in build_model(cfg, hf).modules() if "Rotary" in type(m).__name__][0]
    assert torch.equal(built_rotary.inv_freq, rotary.inv_freq)  # a buffer, not a parameter: rebuilt exactly


def _at_scale(d: Dist, cfg, base_cfg) -> dict:
    """On each of the gloo workers: the built and the base model's full weights, and one step with and without
    gradient accumulation."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    def full(model):
        return {k: v.clone() for k, v in get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True)).items()}

    out = {"built": full(build_model(cfg, hf_config(cfg, VOCAB, 0), d)),
           "base": full(build_model(base_cfg, hf_config(base_cfg, VOCAB, 0), d))}
    rows = _batch(seed=d.rank)  # this worker's four sequences
    for accum in (1, 4):
        model = build_model(cfg, hf_config(cfg, VOCAB, 0), d)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        method = _Probe(Pretrain(cfg))
        loss, _, _ = train_step(model, optimizer, method, rows, accum, 4 // accum, None, torch.autocast("cpu", enabled=False), d)
        out[accum] = {"loss": loss.item(), "weights": full(model), "held": method.held}
    return out


class _Probe:
    """The method's loss; records, before each micro-batch after the first, the gradients held since the last."""

    def __init__(self, method):
        self.method, self.held = method, []

    def loss(self, model, batch):
        grads = [p.grad for p in model.parameters()]
        if any(g is not None for g in grads):
            self.held.append({"local": sum(g.to_local().numel() if g is not None else 0 for g in grads),
                              "all": sum(p.numel() for p in model.parameters()),
                              "sharded": all(g is not None and type(g).__name__ == "DTensor" for g in grads)})
        return self.method.loss(model, batch)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, corpus):
    """One run of _at_scale on two gloo workers, with a saved tiny base model; (results by rank, configs, base)."""
    work = tmp_path_factory.mktemp("at-scale")
    cfg = _config(work, corpus)
    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_config(hf_config(cfg, VOCAB, 0), attn_implementation="sdpa")
    base.save_pretrained(work / "base")
    base_cfg = _base_config(work, corpus, work / "base")
    return on_ranks(work / "ranks", _at_scale, cfg, base_cfg), cfg, base


def test_two_workers_materialise_the_weights_one_process_builds(two_workers, tmp_path, corpus):
    results, cfg, _ = two_workers
    one = build_model(cfg, hf_config(cfg, VOCAB, 0)).state_dict()
    for rank in (0, 1):
        assert results[rank]["built"].keys() == one.keys()
        for name, value in one.items():
            assert torch.equal(results[rank]["built"][name], value), (rank, name)


def test_a_base_model_read_by_one_worker_reaches_every_shard(two_workers):
    results, _, base = two_workers
    for name, value in base.state_dict().items():
        assert torch.equal(results[1]["base"][name], value), name


def test_gradient_accumulation_keeps_gradients_sharded_and_equals_one_micro_batch(two_workers):
    results, _, _ = two_workers
    for rank in (0, 1):
        whole, accumulated = results[rank][1], results[rank][4]
        assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-5)
        for name, value in whole["weights"].items():
            torch.testing.assert_close(accumulated["weights"][name], value, atol=2e-6, rtol=1e-5, msg=name)
        # between micro-batches each worker holds its shard of the gradients (reduce-scattered), never all of them
        assert len(accumulated["held"]) == 3
        for held in accumulated["held"]:
            assert held["sharded"] and held["local"] <= math.ceil(held["all"] / 2) + 4 * 64, held


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_keeps_fewer_bytes_and_the_same_gradients(tmp_path, corpus, mode):
    def step(m):
        cfg = _config(tmp_path, corpus, training__activation_checkpointing=m)
        model = build_model(cfg, hf_config(cfg, VOCAB, 0))
        loss, held = held_bytes(lambda: Pretrain(cfg).loss(model, _batch(0, rows=2)), exclude=model.parameters())
        loss.total.backward()
        with torch.no_grad():  # evaluation: the blocks run as they are, nothing recomputed
            evaluated = Pretrain(cfg).loss(model, _batch(0, rows=2)).value.item()
        return loss.value.item(), held, {n: p.grad for n, p in model.named_parameters()}, evaluated

    plain_loss, plain_held, plain_grads, _ = step("none")
    loss, held, grads, evaluated = step(mode)
    assert loss == pytest.approx(plain_loss, rel=1e-6) and evaluated == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert held < {"selective": 0.8, "full": 0.35}[mode] * plain_held, (held, plain_held)


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_the_memory_estimate_counts_the_activations_each_mode_keeps(tmp_path, corpus, family):
    arch = {"family": family, "num_layers": 2, "hidden_size": 64, "intermediate_size": 192, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_token": 2, "moe_intermediate_size": 96,
            "max_position_embeddings": 128}
    for mode in ("none", "selective", "full"):
        cfg = _config(tmp_path, corpus, model__architecture=arch, training__seq_len=128,
                      training__activation_checkpointing=mode)
        hf = hf_config(cfg, VOCAB, 0)
        model = build_model(cfg, hf)
        _, held = held_bytes(lambda: Pretrain(cfg).loss(model, _batch(0, rows=2, length=129)),
                             exclude=model.parameters())
        assert 0.9 < activation_bytes(hf, 2, 128, False, mode) / held < 1.4, (mode, held)


# ---------------------------------------------------------------------------
# Hybrid sharding (HSDP) on two "nodes" of two workers, against full sharding (FSDP) on the same four


def _hybrid_and_full(d: Dist, full_cfg, hybrid_cfg, ckpt) -> dict:
    """On each of four gloo workers: one SGD step of the same batch with FullShard and with HybridShard
    (loss, whole gradients and weights after it, how the weights are laid out), and the HybridShard
    checkpoint loaded into a new FullShard model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from forge_trainer.runtime import checkpoint
    from forge_trainer.runtime.checkpoint import TrainState

    def full(model):
        return {k: v.clone() for k, v in get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True)).items()}

    rows, out = _batch(seed=d.rank), {}
    for name, cfg in (("FullShard", full_cfg), ("HybridShard", hybrid_cfg)):
        model = build_model(cfg, hf_config(cfg, VOCAB, 0), d)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = Pretrain(cfg).loss(model, rows)
        loss.total.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        optimizer.step()
        q = next(p for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
        out[name] = {"loss": loss.value.item(), "grads": grads, "weights": full(model),
                     "mesh": tuple(q.device_mesh.shape), "rows": (q.to_local().shape[0], q.shape[0])}
        if name == "HybridShard":
            checkpoint.save(ckpt, model, optimizer, TrainState(step=1), 1, d)
    model = build_model(full_cfg, hf_config(full_cfg, VOCAB, 0), d)
    checkpoint.load(checkpoint.find_latest(ckpt), model, torch.optim.SGD(model.parameters(), lr=0.5), d)
    out["resumed"] = full(model)
    return out


@pytest.fixture(scope="module")
def two_nodes_of_two(tmp_path_factory, corpus):
    work = tmp_path_factory.mktemp("hsdp")
    full_cfg = _config(work, corpus)
    hybrid_cfg = _config(work, corpus, training__sharding="HybridShard")
    return on_ranks(work / "ranks", _hybrid_and_full, full_cfg, hybrid_cfg, work / "ckpt", world=4, local_world=2)


@pytest.mark.slow
def test_hybrid_sharding_computes_the_loss_and_gradients_of_full_sharding(two_nodes_of_two):
    for rank, r in enumerate(two_nodes_of_two):
        full, hybrid = r["FullShard"], r["HybridShard"]
        assert hybrid["loss"] == pytest.approx(full["loss"], rel=1e-6), rank
        for name, grad in full["grads"].items():  # the mean over all four workers, either way
            torch.testing.assert_close(hybrid["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
            torch.testing.assert_close(two_nodes_of_two[0]["HybridShard"]["grads"][name], hybrid["grads"][name])
        for name, value in full["weights"].items():
            torch.testing.assert_close(hybrid["weights"][name], value, atol=1e-6, rtol=1e-5, msg=name)
        # a 2-D mesh, each weight split over a node's two workers (half each) instead of all four (a quarter)
        assert (full["mesh"], full["rows"]) == ((4,), (16, 64)), rank
        assert (hybrid["mesh"], hybrid["rows"]) == ((2, 2), (32, 64)), rank


@pytest.mark.slow
def test_a_hybrid_sharded_checkpoint_resumes_fully_sharded(two_nodes_of_two):
    for r in two_nodes_of_two:
        for name, value in r["HybridShard"]["weights"].items():
            assert torch.equal(r["resumed"][name], value), name


def test_the_memory_estimate_counts_hybrid_sharding_shards_within_a_node(tmp_path, corpus):
    from forge_trainer.models.stats import estimate_memory, model_stats, shards_of

    assert shards_of("HybridShard", world=16, local_world=8) == 8  # two nodes of eight: a replica per node
    assert shards_of("FullShard", world=16, local_world=8) == 16
    assert shards_of("HybridShard", world=8, local_world=8) == 8  # one node: as FullShard
    hf = hf_config(_config(tmp_path, corpus), VOCAB, 0)
    stats = model_stats(hf, 64)
    hybrid, full = (estimate_memory(hf, stats, 4, 64, shards_of(s, 16, 8), torch.device("cpu"), False)
                    for s in ("HybridShard", "FullShard"))
    # parameters, gradients and AdamW's two moments in fp32: 16 bytes a parameter, over 8 workers instead of 16
    assert hybrid - full == pytest.approx(16 * stats.params / 8 - 16 * stats.params / 16, abs=1)


# ---------------------------------------------------------------------------
# One process: FSDP2 on a process group of its own


def test_one_process_shards_on_a_group_of_its_own_and_trains_like_an_unsharded_model(tmp_path, corpus, monkeypatch):
    """As train.run sets up one process: a one-rank group, the model sharded as on many workers (the same
    mixed precision, the same checkpoints), the step an unsharded model takes; an unsharded checkpoint
    (an earlier trainer's) resumes sharded, and the group is gone after the shutdown."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from forge_trainer.runtime import checkpoint
    from forge_trainer.runtime.checkpoint import TrainState
    from forge_trainer.runtime.dist import init_distributed, shutdown
    from forge_trainer.runtime.optim import build_optimizer

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cfg = _config(tmp_path, corpus)
    hf = hf_config(cfg, VOCAB, 0)

    def step(model, d):
        optimizer = build_optimizer(model, cfg.training, d.device)
        loss, _, norm = train_step(model, optimizer, Pretrain(cfg), _batch(0), 2, 2, 0.5,
                                   torch.autocast("cpu", enabled=False), d)
        return loss.item(), norm.item(), optimizer

    def full(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))

    plain = build_model(cfg, hf)  # no process group (a model built outside a run): unsharded
    plain_loss, plain_norm, plain_optimizer = step(plain, Dist())
    checkpoint.save(tmp_path / "unsharded", plain, plain_optimizer, TrainState(step=1), 1, Dist())
    d = init_distributed()
    try:
        assert d.group_of_one and d.sharded and not d.distributed and dist.get_world_size() == 1
        model = build_model(cfg, hf, d)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        loss, norm, _ = step(model, d)
        assert (loss, norm) == (pytest.approx(plain_loss, rel=1e-6), pytest.approx(plain_norm, rel=1e-5))
        stepped = full(model)
        for name, value in plain.state_dict().items():
            torch.testing.assert_close(stepped[name], value, atol=1e-6, rtol=1e-5, msg=name)
        resumed = build_model(cfg, hf, d)
        checkpoint.load(checkpoint.find_latest(tmp_path / "unsharded"), resumed,
                        build_optimizer(resumed, cfg.training, d.device), d)
        loaded = full(resumed)
        for name, value in plain.state_dict().items():
            assert torch.equal(loaded[name], value), name
    finally:
        shutdown(d)
    assert not dist.is_initialized()
