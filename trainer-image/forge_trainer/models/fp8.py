"""FP8 training (training.precision fp8) with torchao's Float8Linear: the linear layers of the transformer
blocks compute their matrix products in FP8 (inputs and weights in e4m3, gradients in e5m2, each tensor
scaled by its own dynamically computed factor: torchao's tensorwise recipe) while everything else stays
in bf16 with fp32 master weights, as training.precision bf16.

Left in bf16: the embeddings and the output head (the logits are sensitive to the quantisation and the
head is one layer among many), the MoE routers (tiny, and the routing decisions are sensitive), and the
MoE experts, which run as one grouped GEMM (``torch._grouped_mm``) whose FP8 version (torchao's
prototype ``moe_training``) needs routed token groups padded to multiples of 16, which Hugging Face's
experts do not do.

Under FSDP2 the FP8 layers' weights are all-gathered in FP8 (half the bytes of bf16), and their scales are
computed for every layer at once, in one all-reduce, after each optimizer step (``rescale``).

The order is torchtitan's: convert the linear layers, then checkpoint and compile each block, then shard.
The layers keep their parameter names (``weight``, ``bias``), so checkpoints and exports are those of a
bf16 run: a run may resume in another precision, and the exported model is a plain Hugging Face model.
"""

from __future__ import annotations

import torch

from ..contract import ConfigError

MULTIPLE = 16
"""FP8 matrix products (``torch._scaled_mm``) need both dimensions of the weight to be multiples of this."""
MIN_CAPABILITY = (8, 9)
"""CUDA compute capability of the first GPUs with FP8 tensor cores (Ada; Hopper is 9.0, Blackwell 10.0)."""
ROUTERS = ("gate", "router", "shared_expert_gate")
"""Names of the linear layers of an MoE block that choose experts (Qwen2-MoE, Mixtral, ...): kept in bf16."""


def check_device(device: torch.device) -> None:
    """Refuse, before anything is built, a device where FP8 training cannot run: torchao missing, a GPU of
    compute capability below 8.9, or a device whose ``torch._scaled_mm`` refuses FP8 operands (PyTorch's
    CPU kernel takes the tensorwise scales this recipe uses)."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError("training.precision fp8 needs torchao, which is not installed in this image "
                          "(pip install torchao); use bf16") from None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < MIN_CAPABILITY:
            raise ConfigError(
                f"training.precision fp8 needs GPUs of compute capability 8.9 or later (Ada, Hopper, Blackwell): "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}; use bf16")
    try:
        a = torch.ones(MULTIPLE, MULTIPLE, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        raise ConfigError(f"training.precision fp8: this {device.type} device computes no FP8 matrix products "
                          f"({str(e).splitlines()[0]}); use bf16") from None


def fp8_linears(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> dict[str, torch.nn.Linear]:
    """The linear layers that compute in FP8, by name: those of the transformer ``blocks`` (attention
    projections, dense MLPs, shared experts), but not the routers of MoE blocks. The embeddings, the output
    head and the MoE experts (3-D parameters of a grouped GEMM, not linear layers) are not among them."""
    inside = {id(m) for b in blocks for m in b.modules()}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and id(m) in inside and name.rsplit(".", 1)[-1] not in ROUTERS}


def check_dims(linears: dict[str, torch.nn.Linear]) -> None:
    """Refuse a model whose FP8 layers have a dimension that is not a multiple of 16, naming the first."""
    for name, m in linears.items():
        if m.in_features % MULTIPLE or m.out_features % MULTIPLE:
            raise ConfigError(
                f"training.precision fp8 needs the transformer blocks' linear layers to have dimensions that are "
                f"multiples of {MULTIPLE}: {name} maps {m.in_features} to {m.out_features} features; use bf16, or "
                f"a model whose hidden, key/value (numKeyValueHeads x head size) and MLP sizes are multiples of {MULTIPLE}")


def convert(model: torch.nn.Module, blocks: list[torch.nn.Module], sharded: bool) -> list[str]:
    """Swap the blocks' linear layers (``fp8_linears``) for torchao's Float8Linear, in place (on the meta
    device too); ``sharded``: their weights are to be all-gathered in FP8 by FSDP2. Returns their names."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    linears = fp8_linears(model, blocks)
    check_dims(linears)
    chosen = {id(m) for m in linears.values()}
    # pad_inner_dim: the weight gradient's product runs over the micro-batch's tokens, which need not be a
    # multiple of 16 (a GRPO row is as long as its completion); torchao pads that inner dimension with zeros.
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=sharded, pad_inner_dim=True)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, _fqn: id(m) in chosen)
    return list(linears)


def rescale_after_steps(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """After every step of ``optimizer``: the FP8 scales of every sharded FP8 weight of ``model``, in one
    all-reduce (instead of one per layer as each is gathered). Nothing to do without FSDP2's FP8 all-gather."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    optimizer.register_step_post_hook(lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))


def is_fp8(model: torch.nn.Module) -> bool:
    """Whether any layer of ``model`` computes in FP8."""
    try:
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:
        return False
    return any(isinstance(m, Float8Linear) for m in model.modules())
