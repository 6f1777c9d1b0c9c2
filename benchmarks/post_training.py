"""Post-training throughput: SFT with and without packing on the same examples, and LoRA against full
fine-tuning, as tokens per second and ratios measured in the same process.

Uses the trainer's own pieces: records prepared by method sft (chat template, loss mask), its rows
(``data.records.pack`` / ``packed_row``), its loss (``Sft.loss``), the model builder (with
``training.lora`` for LoRA) and the optimizer. The base is a random-weight Llama made here with a BPE
trained on the generated data, so nothing is downloaded. The examples are chat records whose
answers vary in length (5 to --max-words words), as instruction data does.

    # CPU (the figures in docs/benchmarks.md)
    .venv/bin/python benchmarks/post_training.py
    # a bigger model on a GPU
    python benchmarks/post_training.py --hidden-size 2048 --num-layers 16 --seq-len 2048 --examples 2048 \\
        --micro-batch 8 --device cuda --max-words 600

Three ways of making the same examples into rows, each over every example once:
  packed      several whole examples per sequence of --seq-len (what the trainer does)
  padded      one example per sequence of --seq-len (no packing)
  by-batch    one example per row, padded to the longest of its micro-batch (no packing, dynamic padding)
Tokens/s counts the examples' real tokens (not padding); learned tokens/s the assistant tokens.
Then LoRA (r=--lora-r on every linear layer) against full fine-tuning, both on the packed rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import time
from pathlib import Path

WORDS = ("the contract says that each party keeps its own data and pays for its own costs unless the court "
         "decides otherwise within thirty days of the notice").split()


def write_records(path: Path, n: int, max_words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "you answer questions about contracts."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 2)):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) + "?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, max_words))) + "."
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        lines.append(json.dumps({"messages": msgs}))
    path.write_text("\n".join(lines) + "\n")


def make_base(folder: Path, records: Path, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from forge_trainer.data.tokenizer import EOS, train_bpe

    texts = [m["content"] for line in records.read_text().splitlines() for m in json.loads(line)["messages"]]
    tok = train_bpe(texts + ["<|user|>\n<|assistant|>\n<|system|>\n"], args.vocab_size, check=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)
    hf.save_pretrained(str(folder))
    heads = max(1, args.hidden_size // 64)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=args.hidden_size,
                      intermediate_size=args.hidden_size * 8 // 3 // 64 * 64 or 64, num_hidden_layers=args.num_layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=args.seq_len,
                      bos_token_id=hf.eos_token_id, eos_token_id=hf.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder))


def rows_of(data, kind: str, micro: int):
    """The micro-batches (tensors [rows, 3, length]) of every training example once, made into rows by ``kind``."""
    import numpy as np
    import torch

    from forge_trainer.data.records import pack, packed_row

    (ex, _), L = data.train[0], data.seq_len
    order = np.random.default_rng(0).permutation(ex.units)
    members = pack(ex.unit_lengths(), order, L) if kind == "packed" else [np.array([i]) for i in order]
    rows = [packed_row(ex, m, L, data.pad_id) for m in members]
    lengths = [int(ex.unit_lengths()[m].sum()) for m in members]
    batches = []
    for b in range(0, len(rows), micro):
        batch = np.stack(rows[b : b + micro])
        if kind == "by-batch":
            batch = batch[:, :, : max(lengths[b : b + micro])]
        batches.append(torch.from_numpy(batch))
    return batches, int(ex.unit_lengths().sum())


def measure(cfg, data, batches, device, autocast, repeats: int) -> tuple[float, float, int]:
    """(seconds per pass over ``batches``, learned tokens, trainable parameters): forward, backward and
    an optimizer step per micro-batch, after one untimed warm-up pass."""
    import torch

    from forge_trainer.methods.sft import Sft
    from forge_trainer.models.build import build_model, hf_config
    from forge_trainer.models.lora import trainable_parameters
    from forge_trainer.runtime.optim import build_optimizer

    method = Sft(cfg)
    method.data = data
    model = build_model(cfg, hf_config(cfg, 0, data.pad_id)).to(device)  # the base's own vocabulary
    optimizer = build_optimizer(model, cfg.training, device)
    learned = sum(int((b[:, 1] != -100).sum()) for b in batches)

    def one_pass() -> None:
        for batch in batches:
            with autocast:
                loss = method.loss(model, batch.to(device))
            loss.total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    one_pass()
    t0 = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    return (time.perf_counter() - t0) / repeats, learned, trainable_parameters(model)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-words", type=int, default=120, help="longest assistant answer, in words")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the examples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="fp32")
    args = parser.parse_args()

    import torch

    from forge_trainer.config import TrainerConfig
    from forge_trainer.methods.sft import prepare_record_data
    from forge_trainer.runtime.dist import Dist
    from forge_trainer.runtime.signals import SigtermFlag

    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        write_records(root / "data" / "chat.jsonl", args.examples, args.max_words)
        make_base(root / "base", root / "data" / "chat.jsonl", args)
        cfg = TrainerConfig.model_validate({
            "method": "sft", "model": {"base_path": str(root / "base")}, "tokenizer": {"from_base": True},
            "data": {"sources": [{"name": "chat", "path": str(root / "data"), "format": "jsonl",
                                  "messages_field": "messages"}], "validation": {"fraction": 0.0}},
            "training": {"seq_len": args.seq_len, "micro_batch_sequences": args.micro_batch,
                         "global_batch_sequences": args.micro_batch, "lr": 1e-4, "budget": {"max_steps": 1}},
            "cache_dir": str(root / "cache"), "metrics": {"port": 0},
        })
        data, _ = prepare_record_data(cfg, Dist(), SigtermFlag())
        tokens = int(data.train[0][0].unit_lengths().sum())
        print(f"{args.examples} chat examples, {tokens:,} tokens; Llama {args.num_layers} x {args.hidden_size}, "
              f"seq_len {args.seq_len}, micro-batch {args.micro_batch}, {device.type}, {args.precision}")

        results = {}
        for kind in ("packed", "padded", "by-batch"):
            batches, _ = rows_of(data, kind, args.micro_batch)
            seconds, learned, _ = measure(cfg, data, batches, device, autocast, args.repeats)
            computed = sum(b.shape[0] * b.shape[2] for b in batches)
            results[kind] = tokens / seconds
            print(f"  sft {kind:9s} {len(batches):4d} micro-batches, {computed:>9,} positions computed "
                  f"({tokens / computed:5.1%} real) | {tokens / seconds:>10,.0f} tokens/s | "
                  f"{learned / seconds:>9,.0f} learned tokens/s")
        print(f"  packing: x{results['packed'] / results['padded']:.2f} against one example per sequence, "
              f"x{results['packed'] / results['by-batch']:.2f} against padding to the longest of each micro-batch")

        batches, _ = rows_of(data, "packed", args.micro_batch)
        full_s, _, full_p = measure(cfg, data, batches, device, autocast, args.repeats)
        lora = {"r": args.lora_r, "alpha": 2.0 * args.lora_r, "dropout": 0.0}
        lora_cfg = TrainerConfig.model_validate({**cfg.model_dump(), "training": {**cfg.training.model_dump(),
                                                                                   "lora": lora}})
        lora_s, _, lora_p = measure(lora_cfg, data, batches, device, autocast, args.repeats)
        print(f"  full fine-tuning {full_p:>12,} trainable parameters | {tokens / full_s:>10,.0f} tokens/s")
        print(f"  LoRA r={args.lora_r:<3d}       {lora_p:>12,} trainable parameters | {tokens / lora_s:>10,.0f} tokens/s")
        print(f"  LoRA: x{full_s / lora_s:.2f} the tokens/s of full fine-tuning, "
              f"{lora_p / full_p:.2%} of its trainable parameters")


if __name__ == "__main__":
    main()
