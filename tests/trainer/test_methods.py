"""Training methods behind their protocol (methods/): the registry, pretraining's loss, and a loop step
that knows nothing of the method it runs."""

from __future__ import annotations

import copy

import pytest
import torch
from trainer_helpers import tiny_config

from forge_trainer.config import ArchitectureConfig
from forge_trainer.data.packed import document_positions
from forge_trainer.runtime.dist import Dist
from forge_trainer.methods import METHODS, Loss, build_method
from forge_trainer.methods.pretrain import Pretrain
from forge_trainer.models.build import build_model, hf_config
from forge_trainer.runtime.signals import SigtermFlag
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


def test_document_positions_restart_after_every_end_of_text_token():
    ids = torch.tensor([[5, 0, 7, 8, 0, 0, 9], [0, 3, 4, 5, 6, 0, 2]])
    assert document_positions(ids, eos_id=0).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 0]]


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_with_document_masking_a_packed_document_sees_only_itself(tmp_path, corpus, shared_cache, family):
    arch = {"family": family, "num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_experts": 4, "num_experts_per_token": 2, "moe_intermediate_size": 32, "max_position_embeddings": 128}
    masking = {"kind": "pretrain", "document_masking": True}
    cfg = tiny_config(tmp_path, corpus, shared_cache, model__architecture=arch, method=masking)
    masked, plain = Pretrain(cfg), Pretrain(tiny_config(tmp_path, corpus, shared_cache, model__architecture=arch))
    tok = masked.prepare(Dist(), SigtermFlag()).tokenizer
    plain.prepare(Dist(), SigtermFlag())
    assert (masked.eos_id, plain.eos_id) == (tok.eos_id, None)
    model = build_model(cfg, hf_config(cfg, tok.vocab_size, tok.eos_id)).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(tok.eos_id + 1, tok.vocab_size, (n,), generator=g) for n in (5, 9, 6)]
    eos = torch.tensor([tok.eos_id])
    window = torch.cat([docs[0], eos, docs[1], eos, docs[2]])[None]
    second = slice(6, 16)  # the second document and its end-of-text token
    with torch.no_grad():
        packed, unmasked = (m.forward(model, window).logits[0] for m in (masked, plain))
        alone = model(input_ids=torch.cat([docs[1], eos])[None]).logits[0]
        last_alone = model(input_ids=docs[2][None]).logits[0]
    torch.testing.assert_close(packed[second], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[16:], last_alone, atol=1e-5, rtol=1e-4)
    assert (unmasked[second] - alone).abs().max() > 1e-3  # without masking it sees the document before it
    torch.testing.assert_close(unmasked[:6], packed[:6])  # the first document has nothing before it either way
    # the loss and the validation loss take the same path
    loss = masked.loss(model, torch.cat([window, eos[None]], dim=1))
    expected = torch.nn.functional.cross_entropy(packed, torch.cat([window[0, 1:], eos]))
    assert loss.value.item() == pytest.approx(expected.item(), rel=1e-5)
