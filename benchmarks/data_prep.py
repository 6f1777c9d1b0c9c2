"""Data-preparation speed: Forge's pipeline against a batched `datasets.map` baseline.

Both tokenize the same files with the same byte-level BPE (trained once with
`tokenizers` on the data) in the same process, one after the other:

- forge: `data_digest` + `prepare_dataset` end to end: SHA-256 of every file, read,
  encode (tiktoken with the BPE's merges), write the uint16 shard and manifest.
- baseline: read the files into a `datasets.Dataset`, then `.map(tokenize,
  batched=True)` with the same tokenizer as a transformers fast tokenizer (no
  hashing, no shard writing: it favours the baseline).

    .venv/bin/python benchmarks/data_prep.py [--path DIR] [--vocab-size 8192]

Defaults to this Python's standard library .py files (site-packages excluded).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from forge_trainer.config import TrainerConfig
from forge_trainer.data.prepare import prepare_dataset
from forge_trainer.data.sources import data_digest
from forge_trainer.data.tokenizer import EOS, TextTokenizer, train_bpe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--include", default="**/*.py")
    parser.add_argument("--exclude", default="site-packages/**")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each side")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="forge-bench-"))
    try:
        config = TrainerConfig.model_validate({
            "model": {"architecture": {}},
            "data": {"sources": [{"name": "bench", "path": args.path, "include": [args.include], "exclude": [args.exclude]}]},
            "cache_dir": str(work / "cache"),
        })
        digest, listing = data_digest(config.data)
        files = [f for f, _ in listing["bench"]]
        texts = [f.path.read_bytes().decode("utf-8", "replace") for f in files]
        mb = sum(f.size for f in files) / 1e6
        t0 = time.perf_counter()
        tokenizer = TextTokenizer(train_bpe(texts, args.vocab_size), EOS)
        print(f"data: {len(files):,} files, {mb:.1f} MB from {args.path}")
        print(f"tokenizer: {tokenizer.vocab_size:,}-token byte-level BPE trained in {time.perf_counter() - t0:.1f}s; "
              f"cpus: {os.cpu_count()}")

        forge_s = []
        for _ in range(args.repeats):
            shutil.rmtree(work / "cache", ignore_errors=True)
            t0 = time.perf_counter()
            d, listing = data_digest(config.data)
            path = prepare_dataset(config, tokenizer, d, listing)
            forge_s.append(time.perf_counter() - t0)
        forge_tokens = sum(s["tokens"] for s in __import__("json").loads((path / "manifest.json").read_text())["sources"])

        import datasets
        from transformers import PreTrainedTokenizerFast

        datasets.disable_progress_bars()
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok, eos_token=EOS)
        base_s = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ds = datasets.Dataset.from_dict({"text": [f.path.read_bytes().decode("utf-8", "replace") for f in files]})
            ds = ds.map(lambda b: hf(b["text"], add_special_tokens=False), batched=True, batch_size=1000,
                        remove_columns=["text"], keep_in_memory=True)
            base_s.append(time.perf_counter() - t0)
        base_tokens = sum(len(x) for x in ds["input_ids"]) + len(ds)  # + one EOS per document, as forge counts

        f_rate, b_rate = mb / min(forge_s), mb / min(base_s)
        print(f"forge    ({tokenizer.encoder}): {min(forge_s):6.2f}s  {f_rate:6.2f} MB/s  {forge_tokens:,} tokens")
        print(f"baseline (datasets.map):  {min(base_s):6.2f}s  {b_rate:6.2f} MB/s  {base_tokens:,} tokens")
        print(f"ratio: {f_rate / b_rate:.2f}x")
        assert forge_tokens == base_tokens, "both sides must produce the same tokens"
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
