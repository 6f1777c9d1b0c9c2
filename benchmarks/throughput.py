"""Training-loop throughput: tokens/s and MFU of Forge's step for a given model size.

Uses the trainer's own model builder, FSDP2 wrapping, optimizer and step on
random tokens (no data preparation), so the figure is the loop's. Runs on CPU
and on CUDA, in one process or under torchrun.

    # CPU (this repo's figure)
    .venv/bin/python benchmarks/throughput.py --preset cpu-6m
    # one H100
    python benchmarks/throughput.py --preset llama-1b               # compiled: the trainer's default on GPUs
    python benchmarks/throughput.py --preset llama-1b --no-compile  # eager
    python benchmarks/throughput.py --preset moe-small
    python benchmarks/throughput.py --preset llama-1b --precision fp8   # GPUs of capability >= 8.9
    # 8 GPUs
    torchrun --nproc-per-node 8 benchmarks/throughput.py --preset llama-1b
    # against Hugging Face transformers.Trainer, same model, rows, optimizer and precision, in one process
    .venv/bin/python benchmarks/throughput.py --preset cpu-6m --against hf --steps 10 --rounds 2

MFU = flops_per_token x tokens/s per device / peak (peak from the GPU name, or --peak-flops), where
flops_per_token = 6 x (parameters counted per token: non-embedding, active experts, output layer)
+ 12 x layers x hidden x seq_len (attention scores and values, forward and backward), as in
forge_trainer.models.stats.

--against hf trains the same model from the same initial weights on the same rows of a small synthetic
language (each token followed by one of four fixed successors, so the loss falls) in the same order,
with a constant learning rate, alternating runs of each variant: Forge eager, transformers.Trainer
eager, both again with torch.compile. It prints tokens/s of each, the ratios Forge / Trainer, and each
run's mean loss, which must agree (the comparison is fair only if both loops did the same work).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass

PRESETS = {
    # 6 layers x 256: the 6.5M-class model TRAINER_NOTES measured on 2 CPU cores.
    "cpu-6m": dict(family="dense", num_layers=6, hidden_size=256, intermediate_size=768, num_attention_heads=4,
                   vocab_size=4096, seq_len=256, micro_batch=16),
    # A 2 x 64 model with a tiny vocabulary: seconds per run on CPU, to check the script end to end.
    "cpu-tiny": dict(family="dense", num_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                     vocab_size=256, seq_len=64, micro_batch=4),
    # About 1.0B parameters: TinyLlama's shape with tied embeddings, 7.3 GFLOP per token at seq 2048.
    "llama-1b": dict(family="dense", num_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, seq_len=2048, micro_batch=8),
    # A small Qwen3-MoE: about 0.9B parameters, about 0.17B counted per token (1.3 GFLOP at seq 2048).
    "moe-small": dict(family="moe", num_layers=12, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                      num_key_value_heads=4, num_experts=32, num_experts_per_token=4, moe_intermediate_size=704,
                      vocab_size=32000, seq_len=2048, micro_batch=8),
}
SHAPE = ["num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
         "num_experts", "num_experts_per_token", "moe_intermediate_size", "vocab_size", "seq_len", "micro_batch"]
VARIANTS = ["forge", "hf", "forge-compile", "hf-compile"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-6m")
    for name in SHAPE:
        parser.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    parser.add_argument("--family", choices=["dense", "moe"])
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile each block, or not (--no-compile); default: as the trainer decides "
                             "(training.compile unset: on GPUs, not on CPUs)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32", "fp8"], default="auto",
                        help="fp8: the transformer blocks' linear layers in FP8 (training.precision fp8)")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of one device, for MFU")
    parser.add_argument("--against", choices=["hf"], help="also train the same model with transformers.Trainer")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"with --against hf: which runs, comma-separated, of {','.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=2, help="with --against hf: alternating rounds of every variant")
    return parser.parse_args(argv)


@dataclass
class Bench:
    """What every run shares: the trainer config, the model's config and its FLOP count, the process group."""

    args: argparse.Namespace
    config: object
    cfg: object
    stats: object
    d: object
    bf16: bool
    seq_len: int
    micro: int

    @property
    def rows_per_step(self) -> int:
        return self.micro * self.args.grad_accum

    @classmethod
    def create(cls, args: argparse.Namespace) -> "Bench":
        from forge_trainer.config import TrainerConfig
        from forge_trainer.models.build import hf_config
        from forge_trainer.models.stats import check_fits, model_stats
        from forge_trainer.runtime.dist import init_distributed

        shape = dict(PRESETS[args.preset])
        shape.update({k: v for k, v in vars(args).items() if v is not None and (k in SHAPE or k == "family")})
        seq_len, micro, vocab = shape.pop("seq_len"), shape.pop("micro_batch"), shape["vocab_size"]
        d = init_distributed()
        config = TrainerConfig.model_validate({
            "model": {"architecture": {**shape, "max_position_embeddings": seq_len}},
            "data": {"sources": [{"name": "random", "path": "/dev/null"}]},
            "training": {"seq_len": seq_len, "micro_batch_sequences": micro,
                         "global_batch_sequences": micro * args.grad_accum * d.world,
                         "precision": args.precision, "compile": args.compile, "warmup_steps": 0,
                         "schedule": "constant", "budget": {"max_steps": args.steps + args.warmup}},
        })
        t = config.training
        bf16 = t.precision in ("bf16", "fp8") or (t.precision == "auto" and d.device.type == "cuda")
        if t.precision == "fp8":
            from forge_trainer.models.fp8 import check_device

            check_device(d.device)
        cfg = hf_config(config, vocab, 0)
        stats = model_stats(cfg, seq_len)
        check_fits(cfg, stats, config, d.world, d.local_world, d.device, bf16)
        return cls(args, config, cfg, stats, d, bf16, seq_len, micro)

    def new_model(self, compile: bool | None = False, placed: bool = False):
        """A fresh model from training.seed (every run starts from the same weights), compiled per block
        or not (None: as the trainer decides for the device); ``placed``: sharded over the group and cast as
        Forge trains it, else plain for Trainer."""
        from forge_trainer.models.build import build_model

        t = self.config.training.model_copy(update={"compile": compile})
        config = self.config.model_copy(update={"training": t})
        return build_model(config, self.cfg, self.d, self.bf16) if placed else build_model(config, self.cfg)

    def sync(self) -> None:
        import torch

        if self.d.device.type == "cuda":
            torch.cuda.synchronize()


def forge_run(b: Bench, rows, compile: bool | None) -> tuple[float, float]:
    """Forge's step over ``rows`` (warmup + timed steps of this rank's rows); returns (seconds of the
    timed steps, mean loss over all steps)."""
    import torch

    from forge_trainer.methods.pretrain import Pretrain
    from forge_trainer.runtime.optim import build_optimizer
    from forge_trainer.train import train_step

    t = b.config.training
    model = b.new_model(compile, placed=True)
    optimizer = build_optimizer(model, t, b.d.device)
    if t.precision == "fp8":
        from forge_trainer.models.fp8 import rescale_after_steps

        rescale_after_steps(optimizer, model)
    autocast = torch.autocast(b.d.device.type, dtype=torch.bfloat16) if b.bf16 else contextlib.nullcontext()
    method = Pretrain(b.config)  # its loss only
    n, losses = b.rows_per_step, []
    for i in range(b.args.warmup + b.args.steps):
        if i == b.args.warmup:
            b.sync()
            start = time.perf_counter()
        loss, _, _ = train_step(model, optimizer, method, rows[i * n : (i + 1) * n], b.args.grad_accum, b.micro,
                                t.grad_clip, autocast, b.d)
        losses.append(loss.detach())
    mean_loss = torch.stack(losses).mean().item()
    b.sync()
    return time.perf_counter() - start, mean_loss


def random_rows(b: Bench):
    import numpy as np

    rng = np.random.default_rng(b.d.rank)
    steps = b.args.warmup + b.args.steps
    return rng.integers(0, b.cfg.vocab_size, size=(steps * b.rows_per_step, b.seq_len + 1), dtype=np.int64)


def language_rows(n: int, length: int, vocab: int, seed: int = 0):
    """``n`` rows of ``length`` tokens of a synthetic language a model can learn: each token is
    followed by one of four successors fixed per token, chosen at random."""
    import numpy as np

    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, 4))
    choice = rng.integers(0, 4, size=(n, length))
    rows = np.empty((n, length), dtype=np.int64)
    token = rng.integers(0, vocab, size=n)
    for j in range(length):
        rows[:, j] = token
        token = successors[token, choice[:, j]]
    return rows


def own(b: Bench) -> None:
    """Forge's tokens/s and MFU, on random tokens, on every rank of the group."""
    import torch

    from forge_trainer.models.stats import peak_flops

    if b.d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from forge_trainer.models.build import compiles

    seconds, _ = forge_run(b, random_rows(b), b.args.compile)
    tokens_per_device = b.args.steps * b.rows_per_step * b.seq_len / seconds
    peak = peak_flops(b.d.device, b.args.peak_flops)
    mfu = b.stats.flops_per_token * tokens_per_device / peak if peak else None
    if b.d.is_main:
        print_setup(b, f"{compiles(b.config, b.d.device)}" + (" (the default)" if b.args.compile is None else ""))
        print(f"tokens/s per device: {tokens_per_device:,.0f}   total: {tokens_per_device * b.d.world:,.0f}")
        print(f"MFU: {f'{mfu:.1%}' if mfu is not None else 'n/a (no peak known for this device; pass --peak-flops)'}")
        if b.d.device.type == "cuda":
            print(f"peak memory: {torch.cuda.max_memory_allocated(b.d.device) / 2**30:.1f} GiB")


def print_setup(b: Bench, compile: bool | str) -> None:
    import torch

    s, a = b.stats, b.args
    name = torch.cuda.get_device_name(b.d.device) if b.d.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model: {b.cfg.model_type} {a.preset} {s.params / 1e6:,.1f}M params, {s.active_params / 1e6:,.1f}M counted in "
          f"FLOPs (non-embedding, active experts, output layer), {s.flops_per_token / 1e6:,.1f} MFLOP/token")
    precision = "fp8" if b.config.training.precision == "fp8" else "bf16" if b.bf16 else "fp32"
    print(f"setup: {b.d.world} x {name}, {precision}, compile={compile}, "
          f"seq {b.seq_len} x micro-batch {b.micro} x accum {a.grad_accum}, {a.warmup} warmup + {a.steps} timed steps")


def against_hf(b: Bench) -> None:
    """Alternating rounds of each variant; prints each run, the best tokens/s of each variant and the ratios."""
    import hf_trainer

    if b.d.world != 1:
        raise SystemExit("--against hf runs in one process (Trainer's own multi-GPU launch differs from Forge's)")
    variants = [v for v in b.args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    a = b.args
    rows = language_rows((a.warmup + a.steps) * b.rows_per_step, b.seq_len + 1, b.cfg.vocab_size)
    tokens = a.steps * b.rows_per_step * b.seq_len
    print_setup(b, "per variant")
    print("rows: a synthetic language (each token followed by one of 4 fixed successors), the same rows in the same "
          "order for every run; constant learning rate")
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for r in range(a.rounds):
        for v in variants:
            compile = v.endswith("-compile")
            if v.startswith("forge"):
                seconds, loss = forge_run(b, rows, compile)
            else:
                seconds, loss = hf_trainer.run(b.new_model(), rows, micro=b.micro, accum=a.grad_accum, warmup=a.warmup,
                                               steps=a.steps, t=b.config.training, bf16=b.bf16, compile=compile,
                                               device=b.d.device)
            results[v].append((tokens / seconds, loss))
            print(f"  round {r + 1} {v:<14} {tokens / seconds:>12,.0f} tokens/s   mean loss {loss:.4f}", flush=True)
    print_summary(results)


def print_summary(results: dict[str, list[tuple[float, float]]]) -> None:
    best = {v: max(tps for tps, _ in runs) for v, runs in results.items()}
    loss = {v: statistics.mean(lo for _, lo in runs) for v, runs in results.items()}
    print("\n| variant | best tokens/s | mean loss |\n|---|---|---|")
    for v in results:
        print(f"| {v} | {best[v]:,.0f} | {loss[v]:.4f} |")
    for ours, theirs in (("forge", "hf"), ("forge-compile", "hf-compile"), ("forge-compile", "hf")):
        if ours in best and theirs in best:
            print(f"{ours} / {theirs}: x{best[ours] / best[theirs]:.2f} tokens/s")
    losses = list(loss.values())
    spread = (max(losses) - min(losses)) / min(losses)
    print(f"mean losses agree within {spread:.2%}" + (" (the runs did the same work)" if spread < 0.01 else
                                                         " -- MORE THAN 1%: the comparison is not like for like"))


def main(argv=None) -> None:
    from forge_trainer.runtime.dist import shutdown

    args = parse_args(argv)
    if args.against == "hf" and args.precision == "fp8":
        raise SystemExit("throughput.py: --against hf compares bf16 or fp32 loops (transformers.Trainer has no "
                         "torchao FP8 path here); run --precision fp8 without --against")
    from forge_trainer.contract import ConfigError

    try:
        b = Bench.create(args)
    except ConfigError as e:
        raise SystemExit(f"throughput.py: {e}") from None
    try:
        against_hf(b) if b.args.against == "hf" else own(b)
    finally:
        shutdown(b.d)


if __name__ == "__main__":
    main()
