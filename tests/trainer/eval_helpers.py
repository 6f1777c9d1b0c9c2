"""Shared by the evaluator's tests: two tiny trained models (30 steps and 3 steps) on the toy corpus,
a held-out source the trainer validated on, and task files about the same sentences."""

from __future__ import annotations

import json
import random
from pathlib import Path

from trainer_helpers import FRUITS, NAMES, tiny_config, write_corpus


def write_heldout(root: Path) -> Path:
    return write_corpus(root, files=3, lines=30, seed=7)


def train_pair(work: Path, corpus: Path, cache: Path):
    """(strong summary, weak summary): the same tiny config trained 30 and 3 steps, validated on the whole
    held-out source (every window: eval_batches x micro-batch covers it)."""
    import forge_trainer

    heldout = write_heldout(work / "heldout")
    out = []
    for name, steps in (("strong", 30), ("weak", 3)):
        cfg = tiny_config(work / name, corpus, cache, training__budget={"max_steps": steps}, training__eval_batches=64,
                          data={"sources": [{"name": "toy", "path": str(corpus)}, {"name": "heldout", "path": str(heldout)}],
                                "validation": {"source": "heldout"}})
        out.append(forge_trainer.run(cfg))
    return heldout, out[0], out[1]


def write_tasks(root: Path, n: int = 40, seed: int = 3) -> tuple[Path, Path]:
    """(multiple-choice folder, exact-match folder) of questions whose answers follow the corpus' pattern."""
    rng = random.Random(seed)
    mc, em = root / "mc", root / "em"
    mc.mkdir(parents=True, exist_ok=True)
    em.mkdir(parents=True, exist_ok=True)
    mc_lines, em_lines = [], []
    for _ in range(n):
        who, k, fruit = rng.choice(NAMES), rng.randint(2, 9), rng.choice(FRUITS)
        q = f"{who} has {k} {fruit}. {who} eats one. now {who} has"
        wrong = rng.choice([f for f in FRUITS if f != fruit])
        choices = [f"{k - 1} {fruit}.", f"{k - 1} {wrong}.", f"{who} {who} {who}"]
        right = rng.randrange(3)
        choices[0], choices[right] = choices[right], choices[0]
        mc_lines.append({"question": q, "choices": choices, "answer": right})
        em_lines.append({"question": q, "answer": f"{k - 1} {fruit}"})
    (mc / "tasks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mc_lines))
    (em / "tasks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in em_lines))
    return mc, em
