"""Expert parallelism (models/expert_parallel.py) on 2 and 4 gloo workers: a Qwen3-MoE layer whose experts
are split over the workers, the tokens sent to them by all-to-all, computes what the whole layer computes on
one worker, forward and backward, also where a worker's experts receive no tokens at all, and under
activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from gloo_helpers import on_ranks

from forge_trainer.runtime.dist import Dist

HIDDEN, TOKENS, EXPERTS, TOP_K = 16, 12, 8, 2


def _config(implementation: str, experts: int = EXPERTS):
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=8, num_experts=experts,
                         num_experts_per_tok=TOP_K, norm_topk_prob=True)
    cfg._experts_implementation = implementation
    return cfg


def _whole_and_split(module_type, cfg, group):
    """The module with every expert, and a copy with this worker's experts only (shard_experts)."""
    from forge_trainer.models.expert_parallel import shard_experts

    torch.manual_seed(0)
    whole = module_type(cfg)
    for p in whole.parameters():
        torch.nn.init.normal_(p, std=0.3)
    split = module_type(cfg)
    split.load_state_dict(whole.state_dict())
    shard_experts(split.experts if hasattr(split, "experts") else split, group)
    return whole, split


def _inputs(world: int, rows: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each worker's tokens and the gradient its loss sends back to the layer's output."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, HIDDEN, generator=g), torch.randn(rows, HIDDEN, generator=g)) for _ in range(world)]


def _gap(a: torch.Tensor | None, b: torch.Tensor) -> float:
    return (b if a is None else a - b).abs().max().item()


def _block(d: Dist, checkpointing: str) -> dict:
    """A whole sparse MoE block (router, then experts): this worker's tokens through the split block,
    against every worker's tokens through the whole block; the split block under activation checkpointing
    (models/parallel.py) recomputes its dispatch and combine, exchanges included, in the backward pass."""
    import torch.distributed as dist
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from forge_trainer.models.parallel import checkpoint_block

    whole, split = _whole_and_split(Qwen3MoeSparseMoeBlock, _config("grouped_mm"), dist.group.WORLD)
    checkpoint_block(split, checkpointing)
    data = _inputs(d.world, TOKENS)
    x = data[d.rank][0].clone().requires_grad_()
    out = split(x.view(2, TOKENS // 2, HIDDEN))
    (out.view(TOKENS, HIDDEN) * data[d.rank][1]).sum().backward()
    router_grad = split.gate.weight.grad.clone()
    dist.all_reduce(router_grad)  # the router is replicated: its gradient is the sum of every worker's
    xs = torch.cat([x for x, _ in data]).requires_grad_()
    ref = whole(xs.view(2 * d.world, TOKENS // 2, HIDDEN)).view(-1, HIDDEN)
    (ref * torch.cat([up for _, up in data])).sum().backward()
    mine, local = slice(d.rank * TOKENS, (d.rank + 1) * TOKENS), EXPERTS // d.world
    ours = slice(d.rank * local, (d.rank + 1) * local)
    return {"output": _gap(out.view(TOKENS, HIDDEN), ref[mine]), "input grad": _gap(x.grad, xs.grad[mine]),
            "router grad": _gap(router_grad, whole.gate.weight.grad),
            **{f"{n} grad": _gap(getattr(split.experts, n).grad, getattr(whole.experts, n).grad[ours])
               for n in ("gate_up_proj", "down_proj")},
            "local experts": split.experts.gate_up_proj.shape[0]}


def _skewed(d: Dist, implementation: str) -> dict:
    """Routing chosen so that expert 1 gets no token from anyone and the last worker's experts none at all
    (that worker receives nothing), with the experts module called as the model calls it."""
    import torch.distributed as dist
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from forge_trainer.models.expert_parallel import dispatch

    whole, split = _whole_and_split(Qwen3MoeExperts, _config(implementation), dist.group.WORLD)
    local = EXPERTS // d.world
    allowed = torch.tensor([e for e in range(EXPERTS - local) if e != 1])
    g = torch.Generator().manual_seed(1)
    routes = [torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:TOP_K]] for _ in range(TOKENS)])
              for _ in range(d.world)]
    weights = [torch.rand(TOKENS, TOP_K, generator=g) for _ in range(d.world)]
    data = _inputs(d.world, TOKENS, seed=2)
    x = data[d.rank][0].clone().requires_grad_()
    w = weights[d.rank].clone().requires_grad_()
    out = split(x, routes[d.rank], w)
    (out * data[d.rank][1]).sum().backward()
    received = dispatch(data[d.rank][0], routes[d.rank], EXPERTS, dist.group.WORLD).recv_splits
    xs, ws = torch.cat([x for x, _ in data]).requires_grad_(), torch.cat(weights).requires_grad_()
    ref = whole(xs, torch.cat(routes), ws)
    (ref * torch.cat([up for _, up in data])).sum().backward()
    mine, ours = slice(d.rank * TOKENS, (d.rank + 1) * TOKENS), slice(d.rank * local, (d.rank + 1) * local)
    return {"output": _gap(out, ref[mine]), "input grad": _gap(x.grad, xs.grad[mine]),
            "routing weight grad": _gap(w.grad, ws.grad[mine]),
            **{f"{n} grad": _gap(getattr(split, n).grad, getattr(whole, n).grad[ours])
               for n in ("gate_up_proj", "down_proj")},
            "received": sum(received)}


def _refused(d: Dist) -> str:
    import torch.distributed as dist
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from forge_trainer.contract import ConfigError
    from forge_trainer.models.expert_parallel import shard_experts

    try:
        shard_experts(Qwen3MoeExperts(_config("grouped_mm", experts=d.world + 1)), dist.group.WORLD)
    except ConfigError as e:
        return str(e)
    return ""


def _all(d: Dist) -> dict:
    return {**{f"block, {mode} checkpointing": _block(d, mode) for mode in ("none", "selective", "full")},
            "skewed grouped_mm": _skewed(d, "grouped_mm"), "skewed loop": _skewed(d, "eager"), "refused": _refused(d)}


def _check(results: list[dict], world: int) -> None:
    for rank, result in enumerate(results):
        cases = [case for case in result if case != "refused"]
        assert len(cases) == 5
        for case in cases:
            if case.startswith("block"):
                assert result[case].pop("local experts") == EXPERTS // world
            received = result[case].pop("received", None)
            if received is not None:  # the last worker's experts get no rows; the others get some
                assert (received == 0) == (rank == world - 1), (case, rank, received)
            for name, gap in result[case].items():
                assert gap < 1e-5, (case, rank, name, gap)
        assert result["refused"].endswith(f"model.architecture.num_experts {world + 1} is not a multiple of the "
                                          f"{world} expert-parallel workers")


def test_experts_split_over_two_workers_compute_what_the_whole_layer_does(tmp_path):
    _check(on_ranks(tmp_path, _all, world=2), world=2)


@pytest.mark.slow
def test_experts_split_over_four_workers_compute_what_the_whole_layer_does(tmp_path):
    _check(on_ranks(tmp_path, _all, world=4), world=4)
