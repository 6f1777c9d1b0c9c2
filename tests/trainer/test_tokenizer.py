"""Tokenizer: a BPE trained on the data, encoded by tiktoken with ids identical to `tokenizers`."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from forge_trainer.contract import DataError
from forge_trainer.data.tokenizer import EOS, TextTokenizer, train_bpe

EDGE_CASES = [
    "",
    "hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\r\nand CRLF",
    "it's we're they've I'm you'll he'd",
    "Ünïcödé ŝtrïngs, 中文字符, русский текст, العربية",
    "emoji 🙂🚀 and combining e\u0301",
    "a literal <|endoftext|> inside the text is not a boundary",
    "numbers 1234567890 3.14159 -42 0x1F",
    "def f(x):\n    return x ** 2  # comment\n",
    "\u00a0non-breaking\u2003spaces\u200b",
]


@pytest.fixture(scope="module")
def stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # About 2 MB: a spread of modules plus the codecs, which hold every kind of character.
    files = sorted(p for p in root.glob("*.py"))[::2] + sorted(root.glob("encodings/*.py"))
    texts = [p.read_bytes().decode("utf-8", "replace") for p in files]
    return [t for t in texts if len(t) < 60_000]


@pytest.fixture(scope="module")
def tokenizer(stdlib_texts) -> TextTokenizer:
    return TextTokenizer(train_bpe(stdlib_texts[:150], vocab_size=2048), EOS)


def test_tiktoken_ids_equal_tokenizers_ids(tokenizer, stdlib_texts):
    assert tokenizer.encoder == "tiktoken"
    texts = stdlib_texts + EDGE_CASES
    assert tokenizer.encode_batch(texts) == tokenizer.encode_reference(texts)
    assert tokenizer.verify(EDGE_CASES) and tokenizer.encoder == "tiktoken"


def test_literal_eos_in_text_is_encoded_as_text(tokenizer):
    ids = tokenizer.encode_batch(["x <|endoftext|> y"])[0]
    assert tokenizer.eos_id not in ids
    assert tokenizer.tok.decode(ids) == "x <|endoftext|> y"


def test_trained_vocabulary_has_the_requested_size_and_round_trips(tokenizer, stdlib_texts):
    assert tokenizer.vocab_size == 2048
    for text in stdlib_texts[:50] + EDGE_CASES:
        assert tokenizer.tok.decode(tokenizer.encode_batch([text])[0]) == text


def test_vocabulary_larger_than_the_data_supports_is_a_data_error():
    with pytest.raises(DataError, match=r"vocab_size 5000 is larger than the training data supports \(\d+ tokens"):
        train_bpe(["the cat sat on the mat. " * 50], vocab_size=5000)


def test_tokenizers_that_are_not_byte_level_bpe_fall_back_to_tokenizers():
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["some words and more words"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", EOS], show_progress=False))
    t = TextTokenizer(tok, EOS)
    assert t.encoder == "tokenizers"
    texts = ["more words", "some and words"]
    assert t.encode_batch(texts) == t.encode_reference(texts)


def test_saved_tokenizer_loads_with_autotokenizer_and_matches(tokenizer, tmp_path, stdlib_texts):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert hf.eos_token == EOS
    text = stdlib_texts[3][:2000]
    assert hf(text, add_special_tokens=False).input_ids == tokenizer.encode_batch([text])[0]
    again = TextTokenizer.from_pretrained(tmp_path)
    assert again.digest == tokenizer.digest and again.eos_id == tokenizer.eos_id
