"""The quickstart: a small Llama trained from scratch on this Python's own standard
library (.py files, present on every machine) in a few minutes on 2 CPU cores.

    python -m forge_trainer.quickstart --workdir runs/quickstart

prints the validation perplexity and a sample completion at the end.
`quickstart_config()` is the TrainerConfig that `forge train` uses for it.
"""

from __future__ import annotations

import argparse
import logging
import math
import sysconfig
from pathlib import Path

from .config import TrainerConfig

SAMPLE_PROMPT = "def __init__(self"


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def quickstart_config(workdir: str | Path, max_steps: int = 300) -> TrainerConfig:
    """4 layers x 256 wide (about 4.2M parameters with a 4,096-token BPE), 256-token sequences,
    16 per step, 300 steps (1.2M tokens): about 4 minutes on 2 CPU cores."""
    w = Path(workdir)
    return TrainerConfig.model_validate({
        "run_name": "quickstart",
        "method": "pretrain",
        "model": {"architecture": {
            "family": "dense", "num_layers": 4, "hidden_size": 256, "intermediate_size": 768,
            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
            "tie_word_embeddings": True,
        }},
        "tokenizer": {"train": {"vocab_size": 4096}},
        "data": {
            "sources": [{
                "name": "python-stdlib", "path": stdlib_dir(), "format": "text", "include": ["**/*.py"],
                "exclude": ["site-packages/**", "test/**", "**/tests/**", "idlelib/idle_test/**"],
            }],
            "validation": {"fraction": 0.02},
        },
        "training": {
            "seq_len": 256, "global_batch_sequences": 16, "micro_batch_sequences": 8,
            "lr": 2e-3, "min_lr": 2e-4, "schedule": "cosine", "warmup_steps": 30, "weight_decay": 0.1,
            "precision": "auto", "budget": {"max_steps": max_steps},
            "eval_interval_steps": 100, "eval_batches": 8, "log_interval_steps": 10,
        },
        "checkpoint": {"dir": str(w / "checkpoints"), "interval_steps": 100, "interval_minutes": 10, "keep_last": 2},
        "output": {"dir": str(w / "model")},
        "cache_dir": str(w / "cache"),
        "metrics": {"port": 0, "progress_interval_seconds": 5},
        "termination_message_path": str(w / "termination-log"),
    })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forge_trainer.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from . import run, sample

    config = quickstart_config(args.workdir, args.steps)
    summary = run(config)
    print(f"validation loss {summary.val_loss:.3f}, perplexity {math.exp(summary.val_loss):.1f}")
    print(f"sample: {SAMPLE_PROMPT}{sample(config.output.dir, SAMPLE_PROMPT, max_new_tokens=48)}")


if __name__ == "__main__":
    main()
