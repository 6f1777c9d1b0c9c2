"""A short CPU regression guard for the training loop: figures that do not depend on the machine,
compared with the baseline stored in benchmarks/baseline.json.

Two figures, each a ratio measured in this one process, so a faster or busier machine moves both sides:
- forge / hf: Forge's tokens/s over transformers.Trainer's on the same model, rows and optimizer
  (benchmarks/throughput.py --against hf, eager, best of alternating rounds);
- efficiency: Forge's model FLOPs per second over the FLOP/s of a plain fp32 matmul loop of the same
  width, measured just before (a CPU's stand-in for MFU).

    .venv/bin/python benchmarks/regression.py            # compare; exit code 1 when a figure falls
    .venv/bin/python benchmarks/regression.py --update   # store this run's figures as the baseline

A figure falls when it is below (1 - tolerance) x its baseline (tolerance 0.15 by default: runs on a
shared 2-core machine vary by about that much). Update the baseline when a change is meant to move a
figure, in the same commit, with the run's output in its message.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import throughput

BASELINE = Path(__file__).with_name("baseline.json")
SETUP = ["--preset", "cpu-6m", "--precision", "fp32", "--steps", "8", "--warmup", "2", "--micro-batch", "8"]


def matmul_flops(width: int, seconds: float = 1.0) -> float:
    """FLOP/s of back-to-back fp32 (width x width) @ (width x width) products for about ``seconds``."""
    import torch

    a, b = torch.randn(width, width), torch.randn(width, width)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * width**3 * n / (time.perf_counter() - start)


def measure(rounds: int) -> dict[str, float]:
    import hf_trainer

    b = throughput.Bench.create(throughput.parse_args(SETUP))
    a = b.args
    rows = throughput.language_rows((a.warmup + a.steps) * b.rows_per_step, b.seq_len + 1, b.cfg.vocab_size)
    tokens = a.steps * b.rows_per_step * b.seq_len
    forge, hf, peak = [], [], []
    for r in range(rounds):
        peak.append(matmul_flops(b.cfg.hidden_size))
        forge.append(tokens / throughput.forge_run(b, rows, compile=False)[0])
        hf.append(tokens / hf_trainer.run(b.new_model(), rows, micro=b.micro, accum=1, warmup=a.warmup,
                                          steps=a.steps, t=b.config.training, bf16=False, compile=False,
                                          device=b.d.device)[0])
        print(f"round {r + 1}: forge {forge[-1]:,.0f} tokens/s, hf {hf[-1]:,.0f} tokens/s, "
              f"matmul {peak[-1] / 1e9:,.1f} GFLOP/s", flush=True)
    return {"forge / hf": max(forge) / max(hf), "efficiency": b.stats.flops_per_token * max(forge) / max(peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="store this run's figures as the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.15)
    args = parser.parse_args()
    figures = measure(args.rounds)
    if args.update:
        BASELINE.write_text(json.dumps({k: round(v, 4) for k, v in figures.items()}, indent=2) + "\n")
        print(f"baseline stored in {BASELINE}: {figures}")
        return
    baseline = json.loads(BASELINE.read_text())
    fallen = []
    for name, value in figures.items():
        floor = baseline[name] * (1 - args.tolerance)
        verdict = "ok" if value >= floor else "FALLEN"
        print(f"{name:<12} {value:.4f}   baseline {baseline[name]:.4f}   floor {floor:.4f}   {verdict}")
        if value < floor:
            fallen.append(name)
    if fallen:
        raise SystemExit(f"regression: {', '.join(fallen)} below the baseline by more than {args.tolerance:.0%}")


if __name__ == "__main__":
    main()
