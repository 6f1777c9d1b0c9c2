"""training.precision fp8 (torchao's Float8Linear) on CPU: which layers compute in FP8 on a dense and an MoE
model, the refusals (a device without FP8 matrix products, widths that are not multiples of 16, LoRA), a
real FP8 training run (PyTorch's CPU ``torch._scaled_mm`` takes tensorwise-scaled FP8 operands), and FSDP2
on two gloo workers: FP8 all-gather, the scales computed in one all-reduce after each step, and a sharded
checkpoint that resumes."""

from __future__ import annotations

import pytest
import torch
from gloo_helpers import on_ranks
from trainer_helpers import tiny_config
from transformers import AutoModelForCausalLM

pytest.importorskip("torchao.float8")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

import forge_trainer  # noqa: E402
from forge_trainer.config import TrainerConfig  # noqa: E402
from forge_trainer.contract import ConfigError  # noqa: E402
from forge_trainer.methods.pretrain import Pretrain  # noqa: E402
from forge_trainer.models import fp8  # noqa: E402
from forge_trainer.models.build import build_model, hf_config  # noqa: E402
from forge_trainer.runtime.dist import Dist  # noqa: E402
from forge_trainer.runtime.optim import build_optimizer  # noqa: E402
from forge_trainer.train import train_step  # noqa: E402

VOCAB = 320
MOE = {"family": "moe", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
       "num_experts": 4, "num_experts_per_token": 2, "moe_intermediate_size": 24, "max_position_embeddings": 128}


def _fp8(tmp_path, corpus, cache=None, **overrides) -> TrainerConfig:
    return tiny_config(tmp_path, corpus, cache, training__precision="fp8", **overrides)


def _kinds(model: torch.nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or "Experts" in type(m).__name__ or "Router" in type(m).__name__}


def test_the_blocks_linear_layers_compute_in_fp8_not_the_head(tmp_path, corpus):
    cfg = _fp8(tmp_path, corpus)
    kinds = _kinds(build_model(cfg, hf_config(cfg, VOCAB, 0)))
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert kinds == {**{f"model.layers.{i}.{p}": "Float8Linear" for i in (0, 1) for p in projections},
                     "lm_head": "Linear"}
    plain = _kinds(build_model(tiny_config(tmp_path, corpus), hf_config(cfg, VOCAB, 0)))
    assert set(plain.values()) == {"Linear"} and plain.keys() == kinds.keys()


def test_an_fp8_step_computes_the_loss_and_gradients_of_a_bf16_step(tmp_path, corpus):
    """The same weights, the same 2 x 45 tokens (no multiple of 16), bf16 autocast: FP8's quantisation
    moves the loss and the gradients a little, not their direction."""
    rows = torch.randint(0, VOCAB, (2, 46), generator=torch.Generator().manual_seed(3))
    results = []
    for cfg in (tiny_config(tmp_path, corpus, training__precision="bf16"), _fp8(tmp_path, corpus)):
        model = build_model(cfg, hf_config(cfg, VOCAB, 0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = Pretrain(cfg).loss(model, rows).total
        loss.backward()
        results.append((loss.item(), {n: p.grad.flatten().float() for n, p in model.named_parameters()}))
    (bf16_loss, bf16_grads), (fp8_loss, fp8_grads) = results
    assert fp8_loss == pytest.approx(bf16_loss, rel=0.01)
    for name, grad in bf16_grads.items():
        similarity = torch.nn.functional.cosine_similarity(grad, fp8_grads[name], dim=0).item()
        assert similarity > 0.95, (name, similarity)


def test_an_moe_model_keeps_its_experts_and_routers_in_bf16(tmp_path, corpus):
    cfg = _fp8(tmp_path, corpus, model__architecture=MOE)
    model = build_model(cfg, hf_config(cfg, VOCAB, 0))
    kinds = _kinds(model)
    attention = {f"model.layers.{i}.self_attn.{p}": "Float8Linear" for i in (0, 1)
                 for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert kinds == {**attention, **{f"model.layers.{i}.mlp.experts": "Qwen3MoeExperts" for i in (0, 1)},
                     **{f"model.layers.{i}.mlp.gate": "Qwen3MoeTopKRouter" for i in (0, 1)}, "lm_head": "Linear"}
    # the experts' widths (24) are no multiple of 16: they are not FP8 layers, so the model is accepted
    loss = Pretrain(cfg).loss(model, torch.randint(0, VOCAB, (2, 30)))  # 58 tokens: no multiple of 16
    loss.total.backward()
    assert torch.isfinite(loss.total) and all(p.grad is not None for p in model.parameters())


def test_a_router_written_as_a_linear_layer_stays_in_bf16():
    """Qwen2-MoE, Mixtral and others write their router (and a shared expert's gate) as nn.Linear."""
    block = torch.nn.Module()
    block.mlp = torch.nn.Module()
    block.mlp.gate = torch.nn.Linear(64, 8)
    block.mlp.shared_expert_gate = torch.nn.Linear(64, 1)
    block.mlp.shared_expert = torch.nn.Linear(64, 64)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([block])
    assert list(fp8.fp8_linears(model, [block])) == ["layers.0.mlp.shared_expert"]


def test_widths_that_are_not_multiples_of_16_are_refused(tmp_path, corpus):
    # a new model: by its configuration, before anything runs
    with pytest.raises(ValueError, match="training.precision fp8 needs the widths .* the key/value width is 8"):
        _fp8(tmp_path, corpus, model__architecture={"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
                                                    "num_key_value_heads": 1, "max_position_embeddings": 128})
    with pytest.raises(ValueError, match="the MLP width is 200"):
        _fp8(tmp_path, corpus, model__architecture__intermediate_size=200)
    # a base model: when it is built
    cfg = tiny_config(tmp_path, corpus, model__architecture__num_attention_heads=8,
                      model__architecture__num_key_value_heads=1)
    AutoModelForCausalLM.from_config(hf_config(cfg, VOCAB, 0)).save_pretrained(tmp_path / "base")
    base = _fp8(tmp_path, corpus, method="continued-pretrain", model={"base_path": str(tmp_path / "base")},
                tokenizer={"from_base": True})
    with pytest.raises(ConfigError, match=r"training.precision fp8 needs .* model.layers.0.self_attn.k_proj maps "
                                          r"64 to 8 features"):
        build_model(base, hf_config(base, VOCAB, 0))


def test_lora_is_refused(tmp_path, corpus):
    with pytest.raises(ValueError, match="training.precision fp8 does not combine with training.lora"):
        _fp8(tmp_path, corpus, method="sft", model={"base_path": str(tmp_path)}, tokenizer={"from_base": True},
             training__lora={"r": 4},
             data={"sources": [{"name": "chat", "path": str(tmp_path), "format": "jsonl", "messages_field": "m"}]})


def test_a_gpu_without_fp8_and_an_image_without_torchao_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"training.precision fp8 needs GPUs of compute capability 8.9 or later "
                                          r"\(Ada, Hopper, Blackwell\): NVIDIA A100-SXM4-80GB is 8.0; use bf16"):
        fp8.check_device(torch.device("cuda"))
    fp8.check_device(torch.device("cpu"))  # this PyTorch's CPU kernel multiplies FP8
    monkeypatch.setitem(__import__("sys").modules, "torchao.float8", None)
    with pytest.raises(ConfigError, match="training.precision fp8 needs torchao, which is not installed"):
        fp8.check_device(torch.device("cpu"))


def test_a_device_without_fp8_products_fails_the_run_before_any_work(tmp_path, corpus, monkeypatch):
    def no_fp8(*args, **kwargs):
        raise RuntimeError('"_scaled_mm" not implemented for \'Float8_e4m3fn\'')

    monkeypatch.setattr(torch, "_scaled_mm", no_fp8)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cfg = _fp8(tmp_path, corpus)
    with pytest.raises(ConfigError, match=r"training.precision fp8: this cpu device computes no FP8 matrix products "
                                          r"\(\"_scaled_mm\" not implemented for 'Float8_e4m3fn'\); use bf16"):
        forge_trainer.run(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_run_trains_in_fp8_and_exports_a_plain_model(reference, tmp_path, corpus, shared_cache, monkeypatch):
    """The whole run on one process (FSDP2 on a group of one, FP8 all-gather): the loss falls as the fp32
    reference's does, and the export is a Hugging Face model with plain linear layers."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    _, ref, ref_progress = reference
    cfg = _fp8(tmp_path, corpus, shared_cache)
    summary = forge_trainer.run(cfg)
    first, last = summary.history[0]["loss"], summary.history[-1]["loss"]
    assert last < first - 1.5, (first, last)
    assert summary.train_loss == pytest.approx(ref.train_loss, rel=0.1)  # fp8 + bf16 against fp32
    assert summary.val_loss == pytest.approx(ref.val_loss, rel=0.1)
    exported = AutoModelForCausalLM.from_pretrained(summary.output_dir)
    assert {type(m) for m in exported.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    assert all(torch.isfinite(p).all() for p in exported.parameters())


def _two_workers(d: Dist, cfg, ckpt) -> dict:
    """On each of two gloo workers: three FP8 steps, the precomputed scales after them, and the model
    saved and loaded back into a new one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from forge_trainer.runtime import checkpoint
    from forge_trainer.runtime.checkpoint import TrainState

    def full(model):
        return {k: v.clone() for k, v in get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True)).items()}

    hf = hf_config(cfg, VOCAB, 0)
    model = build_model(cfg, hf, d, bf16=True)
    optimizer = build_optimizer(model, cfg.training, d.device)
    fp8.rescale_after_steps(optimizer, model)
    rows = torch.randint(0, VOCAB, (4, 65), generator=torch.Generator().manual_seed(d.rank))
    losses = [train_step(model, optimizer, Pretrain(cfg), rows, 2, 2, 1.0, torch.autocast("cpu", dtype=torch.bfloat16),
                         d)[0].item() for _ in range(3)]
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    local = [m.weight._local_tensor for m in layers]
    scales = [(w._precomputed_scale.item(), torch.finfo(torch.float8_e4m3fn).max / m.weight.full_tensor().abs().max().item())
              for m, w in zip(layers, local)]
    checkpoint.save(ckpt, model, optimizer, TrainState(step=3), d.world, d)
    resumed = build_model(cfg, hf, d, bf16=True)
    checkpoint.load(checkpoint.find_latest(ckpt), resumed, build_optimizer(resumed, cfg.training, d.device), d)
    return {"losses": losses, "fp8_gathered": all(isinstance(w, WeightWithDynamicFloat8CastTensor) for w in local),
            "resumed_fp8_gathered": all(isinstance(m.weight._local_tensor, WeightWithDynamicFloat8CastTensor)
                                        for m in resumed.modules() if isinstance(m, Float8Linear)),
            "layers": len(layers), "scales": scales, "saved": full(model), "loaded": full(resumed)}


@pytest.mark.slow
def test_two_workers_gather_fp8_weights_rescale_after_each_step_and_resume(tmp_path, corpus):
    cfg = _fp8(tmp_path, corpus)
    results = on_ranks(tmp_path / "ranks", _two_workers, cfg, tmp_path / "ckpt")
    for r in results:
        assert r["layers"] == 14 and r["fp8_gathered"] and r["resumed_fp8_gathered"]
        assert r["losses"][-1] < r["losses"][0]
        # one all-reduce gave every shard the scale of its whole weight
        for precomputed, of_whole in r["scales"]:
            assert precomputed == pytest.approx(of_whole, rel=1e-5)
        for name, value in r["saved"].items():
            assert torch.equal(r["loaded"][name], value), name
    assert results[0]["scales"] == results[1]["scales"]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_base_moe_models_router_and_experts_stay_in_bf16(tmp_path, corpus, family):
    from sft_helpers import make_base

    base = make_base(tmp_path, family)
    cfg = _fp8(tmp_path, corpus, method="continued-pretrain", model={"base_path": str(base)},
               tokenizer={"from_base": True})
    model = build_model(cfg, hf_config(cfg, VOCAB, 0))
    fp8_layers = {name.split(".", 3)[-1] for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert fp8_layers == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}


@pytest.mark.slow
def test_grpo_trains_in_fp8_beside_a_bf16_reference(tmp_path, monkeypatch):
    """GRPO samples with the FP8 policy (rows as long as their completions) and holds it near a plain copy
    of the starting weights (the KL term)."""
    from sft_helpers import make_base
    from test_grpo import grpo_config, write_prompts

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    data = write_prompts(tmp_path / "data" / "p.jsonl")
    cfg = grpo_config(tmp_path, make_base(tmp_path / "bases", "llama"), data, {"beta": 0.1},
                      training__precision="fp8", training__budget={"max_steps": 2})
    summary = forge_trainer.run(cfg)
    assert [x["step"] for x in summary.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor([x["loss"], x["kl"]])).all() for x in summary.history)
    assert AutoModelForCausalLM.from_pretrained(summary.output_dir) is not None
