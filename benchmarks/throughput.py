"""Training-loop throughput: tokens/s and MFU of Forge's step for a given model size.

Uses the trainer's own model builder, FSDP2 wrapping, optimizer and step on
random tokens (no data preparation), so the figure is the loop's. Runs on CPU
and on CUDA, in one process or under torchrun.

    # CPU (this repo's figure)
    .venv/bin/python benchmarks/throughput.py --preset cpu-6m
    # one H100
    python benchmarks/throughput.py --preset llama-1b --compile
    python benchmarks/throughput.py --preset moe-small --compile
    # 8 GPUs
    torchrun --nproc-per-node 8 benchmarks/throughput.py --preset llama-1b --compile

MFU = flops_per_token x tokens/s per device / peak (peak from the GPU name, or --peak-flops).
"""

from __future__ import annotations

import argparse
import contextlib
import time

PRESETS = {
    # 6 layers x 256: the 6.5M-class model TRAINER_NOTES measured on 2 CPU cores.
    "cpu-6m": dict(family="dense", num_layers=6, hidden_size=256, intermediate_size=768, num_attention_heads=4,
                   vocab_size=4096, seq_len=256, micro_batch=16),
    # About 1.0B parameters: TinyLlama's shape with tied embeddings, 7.3 GFLOP per token at seq 2048.
    "llama-1b": dict(family="dense", num_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, seq_len=2048, micro_batch=8),
    # A small Qwen3-MoE: about 0.9B parameters, about 0.17B counted per token (1.3 GFLOP at seq 2048).
    "moe-small": dict(family="moe", num_layers=12, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                      num_key_value_heads=4, num_experts=32, num_experts_per_token=4, moe_intermediate_size=704,
                      vocab_size=32000, seq_len=2048, micro_batch=8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-6m")
    for name in ["num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "num_experts", "num_experts_per_token", "moe_intermediate_size", "vocab_size", "seq_len", "micro_batch"]:
        parser.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    parser.add_argument("--family", choices=["dense", "moe"])
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of one device, for MFU")
    args = parser.parse_args()
    shape = dict(PRESETS[args.preset])
    not_shape = {"preset", "grad_accum", "steps", "warmup", "compile", "precision", "peak_flops"}
    shape.update({k: v for k, v in vars(args).items() if v is not None and k not in not_shape})

    import numpy as np
    import torch

    from forge_trainer.config import TrainerConfig
    from forge_trainer.runtime.dist import init_distributed, shutdown
    from forge_trainer.methods.pretrain import Pretrain
    from forge_trainer.models.build import build_model, hf_config
    from forge_trainer.models.stats import check_fits, model_stats, peak_flops
    from forge_trainer.runtime.optim import build_optimizer
    from forge_trainer.train import train_step

    seq_len, micro, vocab = shape.pop("seq_len"), shape.pop("micro_batch"), shape["vocab_size"]
    d = init_distributed()
    world = d.world
    config = TrainerConfig.model_validate({
        "model": {"architecture": {**shape, "max_position_embeddings": seq_len}},
        "data": {"sources": [{"name": "random", "path": "/dev/null"}]},
        "training": {"seq_len": seq_len, "micro_batch_sequences": micro,
                     "global_batch_sequences": micro * args.grad_accum * world,
                     "precision": args.precision, "compile": args.compile, "warmup_steps": 0,
                     "budget": {"max_steps": args.steps + args.warmup}},
    })
    t = config.training
    bf16 = t.precision == "bf16" or (t.precision == "auto" and d.device.type == "cuda")
    cfg = hf_config(config, vocab, 0)
    stats = model_stats(cfg, seq_len)
    check_fits(cfg, stats, config, world, d.local_world, d.device, bf16)
    model = build_model(config, cfg, d, bf16)
    optimizer = build_optimizer(model, t, d.device)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    method = Pretrain(config)  # its loss only: the batches are random tokens
    rng = np.random.default_rng(d.rank)
    per_rank = micro * args.grad_accum

    def step():
        windows = rng.integers(0, vocab, size=(per_rank, seq_len + 1), dtype=np.int64)
        loss, _, _ = train_step(model, optimizer, method, windows, args.grad_accum, micro, t.grad_clip, autocast, d)
        return loss

    for _ in range(args.warmup):
        step().item()
    if d.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens_per_device = args.steps * per_rank * seq_len / dt
    peak = peak_flops(d.device, args.peak_flops)
    mfu = stats.flops_per_token * tokens_per_device / peak if peak else None
    if d.is_main:
        name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        print(f"model: {type(model).__name__.removeprefix('FSDP')} {args.preset} {stats.params / 1e6:,.1f}M params, "
              f"{stats.active_params / 1e6:,.1f}M counted in FLOPs (non-embedding, active experts, output layer), {stats.flops_per_token / 1e6:,.1f} MFLOP/token")
        print(f"setup: {world} x {name}, {'bf16' if bf16 else 'fp32'}, compile={args.compile}, "
              f"seq {seq_len} x micro-batch {micro} x accum {args.grad_accum}, {args.steps} timed steps")
        print(f"tokens/s per device: {tokens_per_device:,.0f}   total: {tokens_per_device * world:,.0f}")
        print(f"MFU: {f'{mfu:.1%}' if mfu is not None else 'n/a (no peak known for this device; pass --peak-flops)'}")
        if d.device.type == "cuda":
            print(f"peak memory: {torch.cuda.max_memory_allocated(d.device) / 2**30:.1f} GiB")
    shutdown(d)


if __name__ == "__main__":
    main()
