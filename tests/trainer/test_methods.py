"""Training methods behind their protocol (methods/): the registry, pretraining's loss, and a loop step
that knows nothing of the method it runs."""

from __future__ import annotations

import copy

import pytest
import torch
from trainer_helpers import tiny_config

from forge_trainer.config import ArchitectureConfig
from forge_trainer.runtime.dist import Dist
from forge_trainer.methods import METHODS, Loss, build_method
from forge_trainer.methods.pretrain import Pretrain
from forge_trainer.models.build import build_model, hf_config
from forge_trainer.train import train_step


def test_pretraining_and_continued_pretraining_share_one_method(tmp_path, corpus):
    assert METHODS["pretrain"] is METHODS["continued-pretrain"] is Pretrain
    assert isinstance(build_method(tiny_config(tmp_path, corpus)), Pretrain)


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_the_pretraining_loss_is_next_token_cross_entropy_plus_the_routers_term(tmp_path, corpus, family):
    arch = {"family": family, "num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_experts": 4, "num_experts_per_token": 2, "moe_intermediate_size": 32, "max_position_embeddings": 128,
            "router_aux_loss_coef": 0.5}
    cfg = tiny_config(tmp_path, corpus, model__architecture=arch)
    model = build_model(cfg, hf_config(cfg, 300, 0))
    batch = torch.randint(0, 300, (2, 17))
    loss = Pretrain(cfg).loss(model, batch)
    plain = {"output_router_logits": False} if family == "moe" else {}  # Hugging Face's loss without the router's term
    assert loss.value.item() == pytest.approx(model(input_ids=batch, labels=batch, **plain).loss.item(), rel=1e-5)
    if family == "dense":
        assert loss.aux is None and loss.total is loss.value
    else:
        assert loss.total.item() == pytest.approx(loss.value.item() + 0.5 * loss.aux.item(), rel=1e-6)
    assert ArchitectureConfig(**arch).router_aux_loss_coef == 0.5


class _SquaredOutput:
    """A method the loop has never heard of: the mean squared output of a linear model."""

    def loss(self, model, batch):
        value = model(batch.float()).pow(2).mean()
        return Loss(value=value, total=value)


def test_a_step_accumulates_micro_batches_to_the_full_batchs_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    rows = torch.randint(-3, 4, (8, 4))
    whole = copy.deepcopy(model)
    whole(rows.float()).pow(2).mean().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {n: p.detach() - 0.1 * p.grad for n, p in whole.named_parameters()}
    loss, aux, grad_norm = train_step(model, optimizer, _SquaredOutput(), rows, accum=4, micro=2, grad_clip=None,
                                      autocast=torch.autocast("cpu", enabled=False), d=Dist())
    assert loss.item() == pytest.approx(whole(rows.float()).pow(2).mean().item(), rel=1e-5)
    assert aux is None and grad_norm is None
    for name, p in model.named_parameters():
        assert torch.allclose(p, expected[name], atol=1e-6), name
