"""Expert parallelism for a mixture-of-experts layer: each rank of an expert-parallel (EP) process group
keeps a contiguous slice of the layer's experts, and the routed tokens travel to the experts instead of
every expert's weights travelling to the tokens (what FSDP does: docs/trainer.md, expert parallelism).

One layer's forward pass, on every rank of the group (torchtitan's ``ExpertParallel`` does the same):

1. dispatch: sort this rank's (token, slot) pairs by expert id, so that the pairs bound for each rank
   are contiguous (experts ``[r * L, (r + 1) * L)`` live on rank ``r``, ``L = num_experts / ep``);
   exchange the per-expert counts (one small all-to-all, read back to the host: the splits of the next
   one), then the token rows themselves (``all_to_all_single`` with uneven splits);
2. the local experts: the model's own experts module, its parameters cut to the local slice, run on the
   received rows with their local expert ids (so the same grouped GEMM, or loop, the model uses);
3. combine: the outputs travel back by the reverse all-to-all, return to their (token, slot) order and
   are summed over the slots with the routing weights.

The all-to-alls are autograd functions (the functional collectives), so the backward pass runs the two
reverse exchanges: four all-to-alls of token rows per layer and micro-batch, forward and backward,
whatever the number of experts. Any rank may send or receive no rows for an expert, or none at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from ..contract import ConfigError


@dataclass
class Routed:
    """What dispatch hands the local experts, and what combine needs to undo it."""

    rows: torch.Tensor
    """(R, hidden) the rows this rank's experts received, by source rank, then by local expert."""
    local_ids: torch.Tensor
    """(R,) each received row's expert, numbered from this rank's first expert."""
    order: torch.Tensor
    """(tokens x top_k,) the (token, slot) pairs of this rank in the order they were sent."""
    send_splits: list[int]
    """Rows sent to each rank of the group (this one included)."""
    recv_splits: list[int]
    """Rows received from each rank of the group (this one included)."""
    top_k: int

    def bytes_exchanged(self, rank: int) -> tuple[int, int]:
        """Bytes of token rows this rank sent to and received from the other ranks in the dispatch (the
        combine moves the same bytes the other way, and the backward pass both again)."""
        row = self.rows.shape[-1] * self.rows.element_size()
        sent = sum(n for r, n in enumerate(self.send_splits) if r != rank)
        received = sum(n for r, n in enumerate(self.recv_splits) if r != rank)
        return sent * row, received * row


def dispatch(hidden: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, group) -> Routed:
    """Sends each (token, slot) pair's row to the rank holding its expert. ``hidden`` (tokens, hidden),
    ``top_k_index`` (tokens, top_k) global expert ids, ``num_experts`` the layer's experts in all."""
    ep = dist.get_world_size(group)
    local = num_experts // ep
    top_k = top_k_index.shape[-1]
    with torch.no_grad():
        experts = top_k_index.reshape(-1)
        order = torch.argsort(experts, stable=True)
        counts = torch.bincount(experts, minlength=num_experts)
        # received[s * local + e]: the rows rank s sends to this rank's expert e
        received = funcol.wait_tensor(funcol.all_to_all_single(counts, None, None, group))
        send_splits = counts.view(ep, local).sum(1).tolist()  # a host sync: the splits of the exchange
        recv_splits = received.view(ep, local).sum(1).tolist()
        local_ids = torch.repeat_interleave(torch.arange(local, device=hidden.device).repeat(ep), received)
    rows = funcol.all_to_all_single_autograd(hidden[order // top_k], recv_splits, send_splits, group)
    return Routed(funcol.wait_tensor(rows), local_ids, order, send_splits, recv_splits, top_k)


def combine(out: torch.Tensor, top_k_weights: torch.Tensor, routed: Routed, group) -> torch.Tensor:
    """The experts' outputs ``out`` (one row per received row) back on the ranks their tokens came from,
    weighted by ``top_k_weights`` (tokens, top_k) and summed over the slots: (tokens, hidden)."""
    back = funcol.all_to_all_single_autograd(out, routed.send_splits, routed.recv_splits, group)
    back = funcol.wait_tensor(back)
    inverse = torch.empty_like(routed.order)
    inverse[routed.order] = torch.arange(routed.order.numel(), device=routed.order.device)
    tokens = top_k_weights.shape[0]
    per_slot = back[inverse].view(tokens, routed.top_k, -1)
    return (per_slot * top_k_weights.unsqueeze(-1).to(per_slot.dtype)).sum(dim=1)


def shard_experts(experts: torch.nn.Module, group) -> None:
    """Turns a Hugging Face experts module (``num_experts``, parameters with the expert first, called as
    ``experts(hidden, top_k_index, top_k_weights)``, as Qwen3-MoE's and Mixtral's) into this rank's part
    of an expert-parallel layer over ``group``: it keeps its slice of the experts (parameter names
    unchanged) and its forward exchanges the tokens with the other ranks. The model's own forward (the
    grouped GEMM or loop that ``config._experts_implementation`` selects) runs the local experts."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    num_experts = experts.num_experts
    if num_experts % ep:
        raise ConfigError(f"model.architecture.num_experts {num_experts} is not a multiple of the "
                          f"{ep} expert-parallel workers")
    local = num_experts // ep
    params = list(experts.named_parameters(recurse=False))
    for name, p in params:
        if p.shape[0] != num_experts:
            raise ConfigError(f"expert parallelism: {type(experts).__name__}.{name} has {p.shape[0]} rows, "
                              f"not one per expert ({num_experts})")
    for name, p in params:
        piece = p.detach()[rank * local:(rank + 1) * local].clone()
        experts.register_parameter(name, torch.nn.Parameter(piece, requires_grad=p.requires_grad))
    experts.num_experts = local
    run_local = experts.forward  # the class's forward, which selects the experts implementation

    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        routed = dispatch(hidden, top_k_index, num_experts, group)
        if routed.rows.shape[0] == 0:
            # nothing for this rank's experts; the (empty) output still depends on the received rows, so
            # this rank takes part in the backward pass's exchanges as the others do
            out = routed.rows * 0
        else:
            # each received row goes to one local expert, with weight 1: the routing weights apply in combine
            ones = torch.ones(routed.rows.shape[0], 1, dtype=routed.rows.dtype, device=routed.rows.device)
            out = run_local(routed.rows, routed.local_ids.unsqueeze(1), ones)
        return combine(out, top_k_weights, routed, group).to(hidden.dtype)

    experts.forward = forward
