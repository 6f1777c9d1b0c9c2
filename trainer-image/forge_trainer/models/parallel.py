"""Placing a model built on the meta device on its devices, per transformer block and in torchtitan's
order: FP8 linear layers (training.precision fp8), then activation checkpointing, then compile, then
sharding (FSDP2), over a 1-D device mesh of every worker (FullShard) or a 2-D one of nodes x workers per
node (HybridShard: sharded within a node, replicated across nodes, so the all-gathers and reduce-scatters
stay on a node's fast links and only the gradients' all-reduce crosses nodes).

Every parameter is materialised (given memory and its initial value) module by module in the order
Hugging Face initialises a model (children before their parent), and each block is sharded as soon
as it is materialised: a worker never holds more than one whole block beside its shards and the
embeddings, and every worker draws the same initial values whatever the number of workers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..contract import ConfigError
from ..runtime.dist import Dist

Materialise = Callable[[torch.nn.Module], None]
"""Gives one module's own parameters and buffers (not its children's) memory and values."""

_aten = torch.ops.aten
SELECTIVE_SAVE = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._grouped_mm.default,
}
"""Selective checkpointing keeps the outputs of these (matrix products and attention: costly to
recompute) and recomputes every other operation of a block (norms, activations, rotary embedding,
element-wise products: cheap, and most of a block's activation bytes), as torchtitan's op policy."""


def parallelize(model: torch.nn.Module, d: Dist, bf16: bool, compile: bool, checkpointing: str,
                materialise: Materialise, sharding: str = "FullShard", fp8: bool = False) -> torch.nn.Module:
    """With ``fp8``, swap the blocks' linear layers for FP8 ones (models/fp8.py); checkpoint and compile
    each transformer block, then materialise the model module by module, sharding each block (FSDP2) once
    it is, and at last the root. Unsharded only where ``d`` has no process group (a model built outside a
    run, as tests and tools do)."""
    layers = blocks(model)
    if fp8:
        from .fp8 import convert

        convert(model, layers, sharded=d.sharded)
    for layer in layers:
        checkpoint_block(layer, checkpointing)
        if compile:
            layer.compile()
    shard = _sharder(bf16, device_mesh(d, sharding)) if d.sharded else None
    ids = {id(layer) for layer in layers}

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            visit(child)
        materialise(module)
        if shard is not None and id(module) in ids:
            shard(module)

    visit(model)
    if shard is not None:
        shard(model)
    return model


def device_mesh(d: Dist, sharding: str):
    """The workers as FSDP2 sees them: 1-D (every worker holds a shard) for FullShard, or for HybridShard
    2-D, nodes x workers per node ("replicate", "shard"); HybridShard on one node is FullShard."""
    from torch.distributed.device_mesh import init_device_mesh

    if sharding == "HybridShard" and d.nodes > 1:
        if d.world != d.nodes * d.local_world:
            raise ConfigError(f"training.sharding HybridShard needs the same number of workers on every node: "
                              f"{d.world} workers, {d.local_world} on this node")
        return init_device_mesh(d.device.type, (d.nodes, d.local_world), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(d.device.type, (d.world,), mesh_dim_names=("shard",))


def _sharder(bf16: bool, mesh) -> Callable[[torch.nn.Module], None]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    return functools.partial(fully_shard, mesh=mesh, mp_policy=mp)


def checkpoint_block(block: torch.nn.Module, mode: str) -> None:
    """none: keep every activation; full: keep the block's input only and recompute the rest in the
    backward pass; selective: keep what SELECTIVE_SAVE names too. The module's own forward is
    wrapped, so its hooks (FSDP2's gathering) stay outside the recomputed part and its parameter
    names do not change."""
    if mode == "none":
        return
    forward = block.forward
    context = {"context_fn": _selective_contexts} if mode == "selective" else {}

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation, sampling: nothing to keep, nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **context, **kwargs)

    block.forward = checkpointed


def _keep_costly(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_costly)


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the modules Hugging Face marks as not to be split."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    return found or list(model.model.layers)


def placed_on(device: torch.device) -> Materialise:
    """Moves a module's own parameters and buffers to ``device``; a parameter still on the meta device
    gets memory there (no values). A parameter shared by two modules (tied embeddings) stays one."""
    made: dict[int, torch.nn.Parameter] = {}

    def materialise(module: torch.nn.Module) -> None:
        for name, p in module.named_parameters(recurse=False):
            if p.is_meta or p.device != device:
                if id(p) not in made:
                    data = torch.empty_like(p, device=device) if p.is_meta else p.detach().to(device)
                    made[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = b.to(device)

    return materialise
