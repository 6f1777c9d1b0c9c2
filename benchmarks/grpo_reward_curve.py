"""GRPO end to end on CPU: the mean reward of a tiny policy rises on a task with a verifier.

The task: two-digit additions ("12+7="), the answer in the record's `answer` column. The policy is a tiny
random-weight Llama (2 layers, 64 wide) with a byte-level BPE trained on the task's text, so at the start
it writes noise; the rewards (examples/grpo/arithmetic_reward.py) are the share of digits in the
completion (format) and 1.0 for the right number. The script trains with `forge_trainer.run` and prints
the mean reward of each stretch of steps, and the ratio of the last stretch to the first (the baseline,
measured in the same run).

    .venv/bin/python benchmarks/grpo_reward_curve.py [--steps 200] [--prompts 4] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_task(root: Path, n: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        lines.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    path = root / "data" / "additions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def make_policy(root: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from forge_trainer.data.tokenizer import EOS, train_bpe

    rng = random.Random(1)
    texts = [f"{a}+{b}={a + b} " for a in range(50) for b in range(50)] + [" ".join(str(rng.randint(0, 99)) for _ in range(50))]
    tok = train_bpe(texts, 300, check=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)
    out = root / "policy"
    hf.save_pretrained(str(out))
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=hf.eos_token_id, eos_token_id=hf.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--stretch", type=int, default=20, help="steps per printed row")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (each sampled 8 times)")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the trainer's step lines
    import forge_trainer
    from forge_trainer.config import TrainerConfig

    root = args.work or Path(tempfile.mkdtemp(prefix="forge-grpo-"))
    data, policy = make_task(root), make_policy(root)
    reward_file = REPO / "examples" / "grpo" / "arithmetic_reward.py"
    cfg = TrainerConfig.model_validate({
        "run_name": "grpo-arithmetic",
        "method": {"kind": "grpo", "group_size": 8, "max_new_tokens": 6, "temperature": 1.0, "beta": 0.0,
                   "rewards": [{"name": "digits", "function": f"{reward_file}:digits"},
                               {"name": "correct", "function": f"{reward_file}:correct"}]},
        "model": {"base_path": str(policy)}, "tokenizer": {"from_base": True},
        "data": {"sources": [{"name": "additions", "path": str(data), "format": "jsonl", "prompt_field": "prompt"}]},
        "training": {"seq_len": 32, "global_batch_sequences": 8 * args.prompts,
                     "micro_batch_sequences": 8 * args.prompts, "lr": 3e-3,
                     "schedule": "constant", "warmup_steps": 5, "budget": {"max_steps": args.steps},
                     "log_interval_steps": 1, "eval_interval_steps": None},
        "checkpoint": {"dir": str(root / "ckpt"), "interval_steps": None, "interval_minutes": None, "resume": "never"},
        "output": {"dir": str(root / "out")}, "cache_dir": str(root / "cache"),
        "metrics": {"port": 0}, "termination_message_path": str(root / "termination-log"),
    })
    t0 = time.monotonic()
    summary = forge_trainer.run(cfg)
    seconds = time.monotonic() - t0
    h = summary.history
    print(f"\nGRPO, tiny policy, {args.steps} steps x {cfg.training.global_batch_sequences} completions "
          f"({seconds:.0f} s)")
    print(f"{'steps':>9} {'reward':>7} {'digits':>7} {'correct':>8} {'length':>7} {'zero-std':>9}")
    rows = []
    for k in range(0, len(h), args.stretch):
        part = h[k:k + args.stretch]
        mean = lambda key: sum(x[key] for x in part) / len(part)  # noqa: E731
        rows.append(mean("reward_mean"))
        print(f"{part[0]['step']:>4}-{part[-1]['step']:<4} {rows[-1]:7.3f} {mean('reward_digits_mean'):7.3f} "
              f"{mean('reward_correct_mean'):8.3f} {mean('completion_length'):7.2f} {mean('zero_std_fraction'):9.2f}")
    print(f"mean reward, last stretch / first: {rows[-1] / max(rows[0], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
