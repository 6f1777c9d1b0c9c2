"""Helpers of the sft tests: tiny Llama and Qwen3 base folders made here (a BPE trained on the toy
task, random weights, `save_pretrained`), and a toy instruction task in both record formats."""

from __future__ import annotations

import json
import random
from pathlib import Path

from trainer_helpers import tiny_config

from forge_trainer.config import TrainerConfig

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
FRUITS = ["apples", "pears", "plums", "figs", "limes", "dates", "kiwis", "grapes"]
LIKES = dict(zip(NAMES, FRUITS[3:] + FRUITS[:3]))  # the fact to learn: who likes what
SYSTEM = "you answer questions about fruit."
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def question(name: str, style: int) -> str:
    return ["what does {n} like?", "which fruit does {n} like?", "tell me what {n} likes."][style % 3].format(n=name)


def answer(name: str) -> str:
    return f"{name} likes {LIKES[name]}."


def conversation(rng: random.Random, turns: int, system: bool = True) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for _ in range(turns):
        n = rng.choice(NAMES)
        msgs += [{"role": "user", "content": question(n, rng.randrange(3))}, {"role": "assistant", "content": answer(n)}]
    return msgs


def write_records(path: Path, kind: str, n: int, seed: int = 0) -> Path:
    """n records of the toy task: prompt/completion (``pairs``) or multi-turn chat (``chat``)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(n):
        if kind == "pairs":
            name = rng.choice(NAMES)
            lines.append({"prompt": question(name, rng.randrange(3)) + "\n", "completion": answer(name)})
        else:
            lines.append({"messages": conversation(rng, rng.randint(1, 3), system=rng.random() < 0.5)})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _toy_text() -> list[str]:
    rng = random.Random(1)
    texts = [SYSTEM, "<|user|>\n<|assistant|>\n<|system|>\n"]
    for _ in range(400):
        n = rng.choice(NAMES)
        texts.append(f"{question(n, rng.randrange(3))} {answer(n)} {n} has {rng.randint(1, 9)} {rng.choice(FRUITS)}.")
    return texts


FAMILIES = ("llama", "mistral", "qwen3", "qwen3_moe", "mixtral")
"""The Hugging Face families a base may be of (make_base builds each)."""


def make_base(root: Path, family: str) -> Path:
    """A tiny random-weight base model folder of ``family`` (one of FAMILIES): ``llama`` and ``mistral``
    with a tokenizer without a chat template; the others with a ChatML template and <|im_start|> /
    <|im_end|> as special tokens, as Qwen's and many chat models' tokenizers have."""
    import torch
    from transformers import (
        AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig, PreTrainedTokenizerFast, Qwen3Config,
        Qwen3MoeConfig,
    )

    from forge_trainer.data.tokenizer import EOS, train_bpe

    out = root / f"tiny-{family}"
    tok = train_bpe(_toy_text(), 400, check=False)
    chatml = family not in ("llama", "mistral")
    if chatml:
        tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)
    if chatml:
        hf.chat_template = CHATML
    hf.save_pretrained(str(out))
    shape = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 bos_token_id=hf.eos_token_id, eos_token_id=hf.eos_token_id, tie_word_embeddings=False)
    experts = dict(num_local_experts=4, num_experts_per_tok=2)
    cfg = {
        "llama": lambda: LlamaConfig(**shape),
        "mistral": lambda: MistralConfig(sliding_window=None, **shape),
        "qwen3": lambda: Qwen3Config(head_dim=16, **shape),
        "qwen3_moe": lambda: Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                            decoder_sparse_step=1, **shape),
        "mixtral": lambda: MixtralConfig(sliding_window=None, **experts, **shape),
    }[family]()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    return out


def sft_config(work: Path, base: Path, records: Path, cache: Path | None = None, kind: str = "chat",
               **overrides) -> TrainerConfig:
    """The tiny trainer config of tests/trainer, as sft of ``base`` on the records in ``records``."""
    fields = {"messages_field": "messages"} if kind == "chat" else {"prompt_field": "prompt",
                                                                    "completion_field": "completion"}
    defaults = {
        "method": "sft", "model": {"base_path": str(base)}, "tokenizer": {"from_base": True},
        "data": {"sources": [{"name": "toy", "path": str(records), "format": "jsonl", **fields}],
                 "validation": {"fraction": 0.1}},
        "training__seq_len": 128, "training__global_batch_sequences": 8, "training__micro_batch_sequences": 4,
        "training__lr": 3e-3, "training__warmup_steps": 2, "training__budget": {"max_steps": 12},
        "training__eval_interval_steps": 6,
    }
    return tiny_config(work, records, cache, **{**defaults, **overrides})


# --------------------------------------------------------------------------- dpo
DONT_KNOW = "i do not know."


def preference(rng: random.Random, chat: bool = False) -> dict:
    """A pair of the toy preference task: the right fact is preferred to a wrong one or to not knowing.
    ``chat``: the prompt is a conversation (sometimes after an earlier exchange) instead of text."""
    name = rng.choice(NAMES)
    wrong = rng.choice([f for f in FRUITS if f != LIKES[name]])
    rejected = DONT_KNOW if rng.random() < 0.5 else f"{name} likes {wrong}."
    q = question(name, rng.randrange(3))
    prompt = conversation(rng, rng.randint(0, 1), system=rng.random() < 0.5) + [{"role": "user", "content": q}] \
        if chat else q + "\n"
    return {"prompt": prompt, "chosen": answer(name), "rejected": rejected}


def write_preferences(path: Path, n: int, seed: int = 0, chat: bool = False) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(preference(rng, chat)) + "\n" for _ in range(n)))
    return path


def dpo_config(work: Path, base: Path, records: Path, cache: Path | None = None, **overrides) -> TrainerConfig:
    """sft_config's tiny run, as dpo on preference records (prompt, chosen, rejected)."""
    defaults = {
        "method": {"kind": "dpo", "beta": 0.1},
        "data": {"sources": [{"name": "prefs", "path": str(records), "format": "jsonl", "prompt_field": "prompt",
                              "chosen_field": "chosen", "rejected_field": "rejected"}],
                 "validation": {"fraction": 0.1}},
        "training__lr": 1e-3,
    }
    return sft_config(work, base, records, cache, **{**defaults, **overrides})
