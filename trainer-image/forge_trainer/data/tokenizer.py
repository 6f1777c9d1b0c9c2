"""Tokenizers: train a byte-level BPE on the data, or load one; encode fast.

Training uses Hugging Face `tokenizers`. Encoding uses `tiktoken` with the same
merges when the tokenizer is a plain byte-level BPE (about 3x faster, identical
ids); anything else falls back to `tokenizers`' encode_batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..contract import ConfigError, DataError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
# The GPT-2 split pattern; `tokenizers`' ByteLevel pre-tokenizer uses the same one.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes -> printable unicode mapping used by ByteLevel."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, check: bool = True) -> Tokenizer:
    """Train a byte-level BPE; DataError when the text cannot support vocab_size tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if check:
        check_vocab(tok, vocab_size, min_frequency)
    return tok


def check_vocab(tok: Tokenizer, vocab_size: int, min_frequency: int) -> None:
    got = tok.get_vocab_size()
    if got < vocab_size:
        raise DataError(
            f"tokenizer.train.vocab_size {vocab_size} is larger than the training data supports "
            f"({got} tokens with min_frequency {min_frequency}); lower vocab_size or add data"
        )


class TextTokenizer:
    """A tokenizer plus its EOS id and a fast batch encoder."""

    def __init__(self, tok: Tokenizer, eos_token: str):
        self.tok = tok
        # Data is text: a literal "<|endoftext|>" in a file is not a document boundary.
        self.tok.encode_special_tokens = True
        self.eos_token = eos_token
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise ConfigError(f"tokenizer has no token {eos_token!r} to separate documents")
        self.eos_id = eos_id
        self.vocab_size = tok.get_vocab_size()
        self.json = tok.to_str()
        self.digest = encoding_digest(self.json)
        self._tiktoken = to_tiktoken(tok, name=f"forge-{self.digest[:12]}")
        self.source_dir: Path | None = None  # set when loaded from a Hugging Face directory
        self.chat_template: str | None = None  # the template sft rendered conversations with; saved with it
        self.stop_ids: list[int] = [eos_id]  # where the exported model's generation stops

    @property
    def encoder(self) -> str:
        return "tiktoken" if self._tiktoken is not None else "tokenizers"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary_batch(texts)
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_reference(self, texts: list[str]) -> list[list[int]]:
        """`tokenizers`' own encoding, the ground truth the fast path must equal."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def verify(self, texts: list[str]) -> bool:
        """Drop the tiktoken path (with a warning) if it disagrees with `tokenizers` on these texts."""
        if self._tiktoken is None:
            return True
        if self._tiktoken.encode_ordinary_batch(texts) == self.encode_reference(texts):
            return True
        log.warning("tiktoken encoding differs from tokenizers on the sample; using tokenizers")
        self._tiktoken = None
        return False

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write Hugging Face tokenizer files that AutoTokenizer loads offline."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if self.source_dir is not None:  # keep the base tokenizer's own settings (templates, specials)
            try:
                hf = AutoTokenizer.from_pretrained(str(self.source_dir), local_files_only=True)
                if self.chat_template is not None:
                    hf.chat_template = self.chat_template
                hf.save_pretrained(str(out_dir))
                return
            except Exception as e:
                log.warning("cannot re-save the tokenizer of %s with AutoTokenizer (%s); writing tokenizer.json only", self.source_dir, e)
        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(self.json), eos_token=self.eos_token)
        if hf.bos_token is None:
            hf.bos_token = self.eos_token
        if self.chat_template is not None:
            hf.chat_template = self.chat_template
        hf.save_pretrained(str(out_dir))

    @classmethod
    def from_json(cls, text: str, eos_token: str) -> TextTokenizer:
        return cls(Tokenizer.from_str(text), eos_token)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TextTokenizer:
        """Load a local Hugging Face tokenizer directory (never downloads)."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"tokenizer directory {path} does not exist")
        eos = None
        cfg = path / "tokenizer_config.json"
        if cfg.exists():
            eos = json.loads(cfg.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
        if (path / "tokenizer.json").exists():
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            try:
                hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except Exception as e:  # a broken tokenizer dir is a config problem, say which
                raise ConfigError(f"cannot load a tokenizer from {path}: {e}") from e
            tok = hf.backend_tokenizer
            eos = eos or hf.eos_token
        if eos is None:
            eos = EOS if tok.token_to_id(EOS) is not None else None
        if eos is None:
            raise ConfigError(f"tokenizer in {path} names no eos_token to separate documents")
        obj = cls(tok, eos)
        obj.source_dir = path
        return obj


def encoding_digest(tokenizer_json: str) -> str:
    """SHA-256 of what decides the token ids (model, normalizer, pre-tokenizer, added tokens),
    so a tokenizer re-saved by transformers (which adds a post-processor) keeps its digest."""
    spec = json.loads(tokenizer_json)
    key = {
        "model": spec.get("model"),
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "added_tokens": sorted((t["id"], t["content"]) for t in spec.get("added_tokens", [])),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def to_tiktoken(tok: Tokenizer, name: str):
    """The same BPE as a tiktoken Encoding, or None when it is not a plain byte-level BPE.

    tiktoken merges the lowest-ranked pair first, where the rank is the merged
    token's id. That equals `tokenizers`' merge order exactly when every merge
    creates a new token whose id follows the previous merge's, which is how
    `tokenizers` trains a BPE; anything else (normalizers, other pre-tokenizers,
    byte fallback, reused ids) keeps `tokenizers`.
    """
    import tiktoken

    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        return None
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return None
    dec = _byte_decoder()
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    ranks: dict[bytes, int] = {}
    try:
        for piece, idx in model["vocab"].items():
            if piece in specials:
                continue
            ranks[bytes(dec[ch] for ch in piece)] = idx
    except KeyError:
        return None
    if len(ranks) < 256 or any(bytes([b]) not in ranks for b in range(256)):
        return None
    vocab = model["vocab"]
    prev = -1
    for merge in model.get("merges", []):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        idx = vocab.get(a + b)
        if idx is None or idx <= prev or idx <= max(vocab[a], vocab[b]):
            return None
        prev = idx
    # Tokens that no merge produces (other than single bytes) would be unreachable
    # in `tokenizers` but reachable in tiktoken.
    if len(model.get("merges", [])) + 256 != len(ranks):
        return None
    try:
        return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    except Exception as e:  # tiktoken rejects some rank tables; the slow path still works
        log.warning("cannot convert the tokenizer to tiktoken (%s); using tokenizers", e)
        return None


def iter_limited(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    seen = 0
    for t in texts:
        yield t
        seen += len(t)
        if seen >= max_bytes:
            return
