"""The chunked log-probabilities every loss goes through equal the plain fp32 ones, value and gradient,
and keep no fp32 copy of the logits for the backward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from forge_trainer.models.logprobs import chunk_tokens, cross_entropy_sum, token_logprobs


def _logits(dtype, rows=3, tokens=11, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, tokens, vocab, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows, tokens), generator=g)
    return logits, targets


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_cross_entropy_and_gradients_equal_the_plain_loss(dtype, tol, chunk):
    logits, targets = _logits(dtype)
    targets[0, :5] = -100  # ignored labels (sft's prompt tokens)
    plain = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    (plain_grad,) = torch.autograd.grad(plain, logits)
    chunked = -torch.where(targets != -100, token_logprobs(logits, targets, chunk=chunk), 0.0).sum()
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    assert chunked.dtype == torch.float32 and chunked_grad.dtype == dtype
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(chunked_grad.float(), plain_grad.float(), atol=tol, rtol=tol)
    assert chunked_grad[0, :5].abs().sum() == 0  # an ignored label passes no gradient


def test_cross_entropy_sum_leaves_ignored_labels_out():
    logits, targets = _logits(torch.float32)
    targets[1, 3:] = -100
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    assert cross_entropy_sum(logits, targets, ignore_index=-100).item() == pytest.approx(expected.item(), rel=1e-6)


def test_temperature_scales_the_logits_before_the_softmax():
    logits, targets = _logits(torch.float32)
    weights = torch.randn(targets.shape)  # a per-token weighting, as grpo's advantages
    plain = (torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1) * weights).sum()
    (plain_grad,) = torch.autograd.grad(plain, logits)
    chunked = (token_logprobs(logits, targets, temperature=0.7, chunk=5) * weights).sum()
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(chunked_grad, plain_grad, atol=1e-5, rtol=1e-5)


def _saved_bytes(loss_of, logits) -> int:
    """Bytes the autograd graph keeps for the backward pass, beyond the logits themselves."""
    saved = []

    def pack(t):
        if t.data_ptr() != logits.data_ptr():
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(logits)
    return sum(saved)


def test_the_backward_pass_keeps_no_fp32_copy_of_the_logits():
    logits, targets = _logits(torch.bfloat16, rows=4, tokens=64, vocab=512)
    copy = logits.numel() * 4
    plain = _saved_bytes(lambda x: F.cross_entropy(x.float().flatten(0, 1), targets.flatten()), logits)
    chunked = _saved_bytes(lambda x: -token_logprobs(x, targets, chunk=64).sum(), logits)  # 256 tokens: 4 chunks
    assert plain >= copy  # the fp32 log-softmax of every token
    assert chunked <= 4 * targets.numel() + 8 * targets.numel()  # one log-sum-exp and one target per token


def test_logits_that_fit_in_one_chunk_take_the_fused_loss_and_keep_at_most_a_chunk():
    logits, targets = _logits(torch.bfloat16, rows=4, tokens=64, vocab=512)
    saved = _saved_bytes(lambda x: cross_entropy_sum(x, targets), logits)  # 256 tokens < one chunk at 512
    assert 0 < saved <= chunk_tokens(512) * 512 * 4 + 8 * targets.numel()


def test_a_chunk_holds_a_bounded_number_of_fp32_logits():
    assert chunk_tokens(128_256) == 130  # 64 MiB of fp32 logits at Llama 3's vocabulary
    assert chunk_tokens(10**9) == 1
