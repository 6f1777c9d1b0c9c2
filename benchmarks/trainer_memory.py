"""The trainer's memory at scale, measured on CPU: each figure beside its baseline from the same run.

    .venv/bin/python benchmarks/trainer_memory.py            # about 2 minutes on 2 CPU cores

1. The loss: peak memory of forward + backward through the chunked log-probabilities
   (models/logprobs.py) against F.cross_entropy on an fp32 copy of the logits.
2. Construction: an 8B Llama config (Llama 3.1 8B's shape) built on the meta device and
   sharded (FSDP2) on two gloo workers: seconds and host memory, against what materialising it
   would take.
3. Gradient accumulation on two gloo workers, 4 micro-batches: the gradient bytes each worker holds
   between micro-batches (reduce-scattered every micro-batch: its shards), against the whole model's
   fp32 gradients that turning synchronisation off until the last micro-batch keeps on every worker.
4. Activation checkpointing: the bytes a forward pass keeps for the backward pass, none / selective /
   full, and the memory estimate's figure for each (models/stats.py).

Peak memory (parts 1 and 2) is the process's peak resident set (VmHWM, reset before each measurement
through /proc/self/clear_refs); tensors that large are mmap'd by the allocator and returned when freed, so
it follows them. Kept bytes (part 4) are counted by models.stats.held_bytes.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

MIB = 1 << 20

LLAMA_8B = dict(family="dense", num_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
SMALL = dict(family="dense", num_layers=4, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)


def reset_peak() -> int:
    """Resets the peak resident set to the current one; returns it in bytes."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_since(base: int) -> int:
    return _status("VmHWM") - base


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def config(arch: dict, **training):
    from forge_trainer.config import TrainerConfig

    return TrainerConfig.model_validate({
        "model": {"architecture": arch}, "data": {"sources": [{"name": "random", "path": "/dev/null"}]},
        "training": {"seq_len": 256, "micro_batch_sequences": 1, "global_batch_sequences": 4, "warmup_steps": 0,
                     "budget": {"max_steps": 1}, **training},
    })


def the_loss(tokens: int, vocab: int) -> None:
    import torch
    import torch.nn.functional as F

    from forge_trainer.models.logprobs import cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    peaks = {}
    for name, loss_of in [("F.cross_entropy(logits.float())", lambda x: F.cross_entropy(x.float(), targets, reduction="sum")),
                          ("chunked (models.logprobs)", lambda x: cross_entropy_sum(x, targets))]:
        logits = torch.randn(tokens, vocab, generator=g).to(torch.bfloat16).requires_grad_()
        base = reset_peak()
        loss_of(logits).backward()
        peaks[name] = peak_since(base)
        del logits
    logits_mib = tokens * vocab * 2 / MIB
    print(f"\n1. loss over {tokens:,} tokens x {vocab:,} vocabulary, bf16 logits ({logits_mib:,.0f} MiB), forward + backward:")
    for name, peak in peaks.items():
        print(f"   {name:34s} peak {peak / MIB:8,.0f} MiB above the logits")
    plain, chunked = peaks.values()
    print(f"   ratio plain / chunked: {plain / max(chunked, 1):.2f}x")


def construction() -> None:
    from forge_trainer.models.build import on_meta, hf_config
    from forge_trainer.models.stats import model_stats

    cfg = config(LLAMA_8B, seq_len=8192)
    hf = hf_config(cfg, LLAMA_8B["vocab_size"], 0)
    on_meta(config(SMALL), hf_config(config(SMALL), SMALL["vocab_size"], 0))  # imports the modelling code first
    base = reset_peak()
    t0 = time.perf_counter()
    model = on_meta(cfg, hf)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    print(f"\n2. {params / 1e9:.2f}B-parameter Llama (8B config) on the meta device, one process: "
          f"{seconds:.2f} s, peak +{peak_since(base) / MIB:,.0f} MiB host memory "
          f"(materialised in fp32 it is {params * 4 / (1 << 30):.1f} GiB; with AdamW, {16 * params / (1 << 30):.0f} GiB)")
    del model
    stats = model_stats(hf, 8192)
    assert stats.params == params
    with tempfile.TemporaryDirectory() as work:
        results = _on_two(Path(work), _shard_on_meta, cfg, hf)
    for rank, (seconds, peak, local) in enumerate(results):
        print(f"   rank {rank} of 2: built on meta and sharded (FSDP2 per block) in {seconds:.2f} s, "
              f"peak +{peak / MIB:,.0f} MiB; its shard: {local / 1e9:.2f}B parameters ({local * 16 / (1 << 30):.0f} GiB "
              "with gradients and AdamW once materialised)")


def _shard_on_meta(d, cfg, hf) -> tuple[float, int, int]:
    from forge_trainer.models.build import hf_config, on_meta
    from forge_trainer.models.parallel import parallelize

    on_meta(config(SMALL), hf_config(config(SMALL), SMALL["vocab_size"], 0))  # imports the modelling code first
    base = reset_peak()
    t0 = time.perf_counter()
    model = parallelize(on_meta(cfg, hf), d, True, False, "none", lambda module: None)  # stays on meta
    seconds = time.perf_counter() - t0
    local = sum(p.to_local().numel() for p in model.parameters())
    return seconds, peak_since(base), local


def accumulation() -> None:
    with tempfile.TemporaryDirectory() as work:
        results = _on_two(Path(work), _accumulate)
    print("\n3. gradient accumulation, 2 gloo workers, Llama 4 x 512 (vocab 32k), 4 micro-batches of 256 tokens:")
    for rank, r in enumerate(results):
        print(f"   rank {rank}: gradients held between micro-batches {r['held'] / MIB:,.1f} MiB (its shards); "
              f"the whole model's fp32 gradients, which synchronising only on the last micro-batch keeps on every "
              f"worker: {r['whole'] / MIB:,.1f} MiB ({r['whole'] / r['held']:.2f}x); loss equals one micro-batch of 4 "
              f"sequences to {abs(r['loss 4'] - r['loss 1']) / r['loss 1']:.1e}")


def _accumulate(d) -> dict:
    import torch

    from forge_trainer.methods.pretrain import Pretrain
    from forge_trainer.models.build import build_model, hf_config
    from forge_trainer.train import train_step

    out = {}
    rows = torch.randint(0, SMALL["vocab_size"], (4, 257), generator=torch.Generator().manual_seed(d.rank))
    for accum in (1, 4):
        cfg = config(SMALL)
        model = build_model(cfg, hf_config(cfg, SMALL["vocab_size"], 0), d)
        method = _HeldGradients(Pretrain(cfg))
        loss, _, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), method, rows, accum, 4 // accum,
                                None, torch.autocast("cpu", enabled=False), d)
        out[f"loss {accum}"] = loss.item()
        if accum == 4:
            out["held"] = max(method.held)
            out["whole"] = 4 * sum(p.numel() for p in model.parameters())
    return out


class _HeldGradients:
    """The method's loss; records the bytes of the gradients each worker holds before each micro-batch."""

    def __init__(self, method):
        self.method, self.held = method, [0]

    def loss(self, model, batch):
        self.held.append(sum(p.grad.to_local().numel() * 4 for p in model.parameters() if p.grad is not None))
        return self.method.loss(model, batch)


def checkpointing() -> None:
    import torch

    from forge_trainer.methods.pretrain import Pretrain
    from forge_trainer.models.build import build_model, hf_config
    from forge_trainer.models.stats import activation_bytes, held_bytes

    batch = torch.randint(0, SMALL["vocab_size"], (2, 513), generator=torch.Generator().manual_seed(0))
    print("\n4. activation checkpointing, Llama 4 x 512, 2 x 512 tokens, fp32: bytes kept for the backward pass")
    kept = {}
    for mode in ("none", "selective", "full"):
        cfg = config(SMALL, seq_len=512, activation_checkpointing=mode)
        hf = hf_config(cfg, SMALL["vocab_size"], 0)
        model = build_model(cfg, hf)
        _, kept[mode] = held_bytes(lambda: Pretrain(cfg).loss(model, batch), exclude=model.parameters())
        estimate = activation_bytes(hf, 2, 512, False, mode)
        print(f"   {mode:10s} kept {kept[mode] / MIB:7.1f} MiB ({kept[mode] / kept['none']:.2f} of none); "
              f"estimate {estimate / MIB:7.1f} MiB ({estimate / kept[mode]:.2f}x the measured)")


def _on_two(work: Path, fn, *args) -> list:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "trainer"))
    from gloo_helpers import on_ranks

    return on_ranks(work, fn, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss-tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256, help="the loss's vocabulary (Llama 3's by default)")
    parser.add_argument("--only", choices=["loss", "construction", "accumulation", "checkpointing"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    parts = {"loss": lambda: the_loss(args.loss_tokens, args.vocab), "construction": construction,
             "accumulation": accumulation, "checkpointing": checkpointing}
    for name, part in parts.items():
        if args.only in (None, name):
            part()


if __name__ == "__main__":
    main()
