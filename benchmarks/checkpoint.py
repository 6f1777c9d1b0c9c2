"""Checkpoints and export at scale, measured on CPU: each figure beside its baseline from the same run.

    .venv/bin/python benchmarks/checkpoint.py            # about a minute on 2 idle CPU cores

1. The time a checkpoint keeps the training waiting (its critical path), on two gloo workers with an
   FSDP2-sharded Llama and its AdamW state: written in front (``Checkpointer.save(final=True)``: a
   run's last checkpoint, and every checkpoint on S3) against written in the background
   (``Checkpointer.save``: the state is copied to host memory, then written by a thread while the loop
   goes on; runtime/checkpoint.py). Each mode saves ``--saves`` times; the figures are the slower
   worker's median, the first background save (which allocates the host copy) apart.
2. The export's plain model on rank 0 (runtime/export.py): built on the meta device and given the
   gathered weights, against a model materialised with its random initialisation and the weights
   copied into it: seconds and peak host memory, and the weights compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from trainer_memory import MIB, SMALL, _on_two, config, peak_since, reset_peak


def critical_path(saves: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        results = _on_two(Path(work), _save_both_ways, Path(work), saves)
    state_mib = max(r["state_bytes"] for r in results) / MIB
    print(f"\n1. checkpoint of Llama {SMALL['num_layers']} x {SMALL['hidden_size']} (vocab {SMALL['vocab_size'] // 1000}k, "
          f"{results[0]['params'] / 1e6:.0f}M parameters) with AdamW, 2 gloo workers, {state_mib:,.0f} MiB of state each, "
          f"{saves} saves per mode; seconds the training waits (slower worker, median):")
    sync = statistics.median(max(r["sync"][i] for r in results) for i in range(saves))
    first = max(r["background"][0] for r in results)
    later = statistics.median(max(r["background"][i] for r in results) for i in range(1, saves))
    written = statistics.median(max(r["written"][i] for r in results) for i in range(saves))
    print(f"   written in front (sync)         {sync:7.3f} s")
    print(f"   written in the background       {later:7.3f} s   (the first save, which allocates the host copy: {first:.3f} s)")
    print(f"   ratio sync / background: {sync / later:.1f}x; the background write itself took {written:.3f} s "
          f"until committed; host memory held for it: {state_mib:,.0f} MiB per worker")


def _save_both_ways(d, work: Path, saves: int) -> dict:
    import torch

    from forge_trainer.models.build import build_model, hf_config
    from forge_trainer.runtime.checkpoint import Checkpointer, TrainState
    from forge_trainer.runtime.optim import build_optimizer

    cfgs = {mode: config(SMALL).model_copy(update={"checkpoint": config(SMALL).checkpoint.model_copy(
        update={"dir": str(work / mode), "keep_last": 2})}) for mode in ("sync", "background")}
    cfg = cfgs["sync"]
    model = build_model(cfg, hf_config(cfg, SMALL["vocab_size"], 0), d)
    optimizer = build_optimizer(model, cfg.training, d.device)
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(d.rank))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()  # the optimizer's state exists: it is saved too
    out = {"sync": [], "background": [], "written": [],
           "params": sum(p.numel() for p in model.parameters()),  # DTensors: the whole model's
           "state_bytes": sum(t.numel() * t.element_size() for t in _tensors(model, optimizer))}
    front, behind = Checkpointer(cfgs["sync"], d), Checkpointer(cfgs["background"], d)
    for step in range(1, saves + 1):
        d.barrier()
        t0 = time.perf_counter()
        front.save(model, optimizer, TrainState(step=step), final=True)
        out["sync"].append(time.perf_counter() - t0)
    for step in range(1, saves + 1):
        d.barrier()
        t0 = time.perf_counter()
        behind.save(model, optimizer, TrainState(step=step))
        out["background"].append(time.perf_counter() - t0)
        behind.wait()  # here the loop would go on training until the next save
        out["written"].append(time.perf_counter() - t0)
    return out


def _tensors(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    yield from (getattr(t, "_local_tensor", t) for t in model_sd.values())
    for per_param in optim_sd["state"].values():
        yield from (getattr(t, "_local_tensor", t) for t in per_param.values() if hasattr(t, "numel"))


def export_model() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from forge_trainer.models.build import hf_config
    from forge_trainer.runtime.export import meta_model

    hf = hf_config(config(SMALL), SMALL["vocab_size"], 0)
    torch.manual_seed(0)
    gathered = {k: v.clone() for k, v in AutoModelForCausalLM.from_config(hf, dtype=torch.float32).state_dict().items()}
    figures = {}
    for name in ("materialised (random init)", "on meta, weights assigned"):
        base = reset_peak()
        t0 = time.perf_counter()
        if name.startswith("materialised"):
            plain = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa", dtype=torch.float32)
            plain.load_state_dict(gathered)
        else:
            plain = meta_model(hf)
            plain.load_state_dict(gathered, assign=True)
        figures[name] = (time.perf_counter() - t0, peak_since(base))
        same = all(torch.equal(plain.state_dict()[k], v) for k, v in gathered.items())
        del plain
        figures[name] += (same,)
    gathered_mib = sum(v.numel() * v.element_size() for v in gathered.values()) / MIB
    print(f"\n2. the export's plain model on rank 0, Llama {SMALL['num_layers']} x {SMALL['hidden_size']}, "
          f"gathered weights {gathered_mib:,.0f} MiB (fp32):")
    for name, (seconds, peak, same) in figures.items():
        print(f"   {name:28s} {seconds:6.2f} s, peak +{peak / MIB:6,.0f} MiB host memory beside the gathered weights; "
              f"weights equal the gathered ones: {same}")
    (slow, slow_peak, _), (fast, fast_peak, _) = figures.values()
    print(f"   ratio materialised / meta: {slow / fast:.1f}x the time, {slow_peak / max(fast_peak, MIB):.1f}x the memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=3, help="checkpoints per mode (at least 2)")
    parser.add_argument("--only", choices=["critical-path", "export"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    parts = {"critical-path": lambda: critical_path(max(args.saves, 2)), "export": export_model}
    for name, part in parts.items():
        if args.only in (None, name):
            part()


if __name__ == "__main__":
    main()
