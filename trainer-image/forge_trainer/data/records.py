"""Records of sft (prompt/completion pairs, chat conversations) and dpo (preference pairs), tokenized
once (rank 0) into cached arrays with a loss mask, then packed into sequences where no example sees another.

A preference record becomes two examples, prompt + chosen then prompt + rejected, stored one after the
other; they are packed as one unit (a pair is never split over sequences or micro-batches).

Layout of one prepared record set (under cache_dir/records/<data>-<tokenizer>-<template>/):

    manifest.json       digests, the chat template, per source its files and counts
    <source>.tokens     every example's token ids back to back (uint16 / uint32)
    <source>.mask       one byte per token: 1 where the token is learned (a completion or an
                        assistant turn, its end marker included), 0 elsewhere
    <source>.index.npy  int64 [examples, 4]: start offset, length, file index, line (or row)
                        (a preference source: examples 2i and 2i + 1 are pair i's chosen and rejected)

Written under a temporary name and renamed when complete, like the pretraining shards. The
sequence length is not part of the cache: an example longer than training.seq_len is refused when
the records are loaded, naming its file and line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataSourceConfig, TrainerConfig
from ..contract import ConfigError, DataError, StoppedBeforeTraining
from .meter import PrepareMeter, meter_for
from .prepare import read_manifest, token_dtype
from .sources import iter_records, read_bytes, source_label
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label of a token that is not learned (Hugging Face's and torch's ignore_index)

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""The chat template of a base tokenizer that has none: each turn is `<|role|>`, a newline, the text
and the end-of-text token; generation starts after `<|assistant|>` and a newline, and stops at the
end-of-text token. The markers are plain text, so no token is added to the vocabulary."""


# --------------------------------------------------------------------------- turning a record into tokens
class ChatRenderer:
    """Renders conversations with the tokenizer's chat template (the base's own, else the default)."""

    def __init__(self, tokenizer: TextTokenizer, source_dir: str | Path | None = None):
        """``source_dir``: the Hugging Face folder whose settings (template, special tokens) to use;
        default: the one the tokenizer was loaded from."""
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        hf = None
        source_dir = source_dir or tokenizer.source_dir
        if source_dir is not None:
            try:
                hf = AutoTokenizer.from_pretrained(str(source_dir), local_files_only=True)
            except Exception as e:  # the tokenizer.json still encodes; only its settings are lost
                log.warning("cannot load the tokenizer settings of %s (%s); using the default chat template",
                            source_dir, e)
        if hf is None:
            hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.json), eos_token=tokenizer.eos_token)
        if not isinstance(hf.chat_template, str):  # none, or a dict of named templates we cannot choose from
            hf.chat_template = DEFAULT_CHAT_TEMPLATE
        self.hf = hf
        self.template: str = hf.chat_template
        # The rendered template holds special tokens (turn markers, BOS) that must encode as themselves.
        self.specials = Tokenizer.from_str(tokenizer.json)
        self.specials.encode_special_tokens = False

    def end_of_turn(self) -> int | None:
        """The special token that ends an assistant turn in this template (ChatML's <|im_end|>, or the
        end-of-text token of the default), where generation should stop; None when the template ends
        a turn with plain text."""
        probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "PROBE"}]
        turn = [t for t, learned in self.segments(probe) if learned][0]
        after = turn[turn.index("PROBE") + len("PROBE"):]
        specials = {t["id"] for t in json.loads(self.specials.to_str()).get("added_tokens", []) if t.get("special")}
        ids = self.specials.encode(after, add_special_tokens=False).ids if after else []
        return ids[0] if ids and ids[0] in specials else None

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, learned) pieces: each assistant turn (as the template
        renders it after the generation prompt, its end marker included) is learned, the rest is not."""
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, turn = self.render(messages[:i], True), self.render(messages[: i + 1], False)
            if not (prompt.startswith(done) and turn.startswith(prompt)):
                raise ConfigError(
                    "the tokenizer's chat template does not render a conversation turn by turn (the text up to an "
                    "assistant turn is not a prefix of the text with it), so the assistant tokens cannot be told "
                    "apart; use a tokenizer whose template does (tokenizer.path)")
            out += [(prompt[len(done):], False), (turn[len(prompt):], True)]
            done = turn
        whole = self.render(messages, False)
        if whole.startswith(done) and len(whole) > len(done):
            out.append((whole[len(done):], False))
        return [(text, learned) for text, learned in out if text]


def _text(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise DataError(f"{where}: no string field {field!r}")
    return value


def _conversation(record: dict, field: str, where: str) -> list[dict]:
    """The record's messages, checked: roles system/user/assistant, text content, an assistant turn."""
    messages = record.get(field)
    if not isinstance(messages, list):
        raise DataError(f"{where}: no list field {field!r} (a conversation: [{{role, content}}, ...])")
    out = []
    for j, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES:
            raise DataError(f"{where}: {field}[{j}].role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{j}].content is not a string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    return out


class ExampleEncoder:
    """One record -> its examples, each (token ids, learned mask), for one source: one example for sft,
    two (chosen, then rejected) for a preference pair."""

    def __init__(self, tokenizer: TextTokenizer, renderer: ChatRenderer):
        self.tokenizer = tokenizer
        self.renderer = renderer

    def encode(self, src: DataSourceConfig, record: dict, where: str) -> tuple[list[int], list[int]]:
        if src.record_kind == "chat":
            return self._chat(self.renderer.segments(_conversation(record, src.messages_field, where)))
        # prompt/completion: the text as written (no template, no special tokens in it), then EOS
        return self._plain(_text(record, src.prompt_field, where), _text(record, src.completion_field, where))

    def encode_pair(self, src: DataSourceConfig, record: dict, where: str) -> list[tuple[list[int], list[int]]]:
        """A preference record: the prompt is text (used as written, like sft's prompt/completion) or a
        conversation (rendered with the chat template up to the generation prompt), and chosen and
        rejected are the next assistant reply; only that reply (with its end marker) is learned."""
        chosen, rejected = _text(record, src.chosen_field, where), _text(record, src.rejected_field, where)
        if chosen == rejected:
            raise DataError(f"{where}: {src.chosen_field!r} and {src.rejected_field!r} are the same answer "
                            "(nothing to prefer)")
        prompt = record.get(src.prompt_field)
        if isinstance(prompt, str):
            out = [self._plain(prompt, chosen), self._plain(prompt, rejected)]
            if out[0][1][0]:  # no prompt token: the first token of an answer would follow nothing
                raise DataError(f"{where}: {src.prompt_field!r} is empty: an answer needs a prompt to follow")
            return out
        if not isinstance(prompt, list):
            raise DataError(f"{where}: no string or list field {src.prompt_field!r} (a prompt: text, or a "
                            "conversation [{role, content}, ...])")
        out = []
        for answer in (chosen, rejected):
            messages = _conversation(record | {src.prompt_field: [*prompt, {"role": "assistant", "content": answer}]},
                                     src.prompt_field, where)
            pieces = self.renderer.segments(messages)
            last = max(i for i, (_, learned) in enumerate(pieces) if learned)  # earlier assistant turns are context
            out.append(self._chat([(t, learned and i == last) for i, (t, learned) in enumerate(pieces)]))
        return out

    def _chat(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        encoded = self.renderer.specials.encode_batch([t for t, _ in pieces], add_special_tokens=False)
        ids, mask = [], []
        for (_, learned), e in zip(pieces, encoded):
            ids += e.ids
            mask += [int(learned)] * len(e.ids)
        return ids, mask

    def _plain(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        p, c = self.tokenizer.encode_batch([prompt, completion])
        c = [*c, self.tokenizer.eos_id]
        return p + c, [0] * len(p) + [1] * len(c)


# --------------------------------------------------------------------------- preparing and caching
def records_dir(config: TrainerConfig, digest: str, tokenizer: TextTokenizer, template: str) -> Path:
    t = hashlib.sha256(template.encode()).hexdigest()[:12]
    return Path(config.cache_dir) / "records" / f"{digest[:16]}-{tokenizer.digest[:16]}-{t}"


def load_records_manifest(path: Path) -> dict | None:
    """The manifest of a finished record set, or None when missing or inconsistent."""
    return read_manifest(path, MANIFEST_VERSION, lambda s, itemsize: {f"{s['name']}.tokens": s["tokens"] * itemsize,
                                                                     f"{s['name']}.mask": s["tokens"]})


def prepare_records(config: TrainerConfig, tokenizer: TextTokenizer, digest: str, listing, stop=None) -> Path:
    """Tokenize every source's records once (reused when the cached set exists); sets the tokenizer's
    chat template to the one the conversations were rendered with."""
    # The folder named in the config, not the tokenizer's: on a node that prepares its own copy the
    # tokenizer came from rank 0 as JSON, and the template must be the same as rank 0's.
    tcfg = config.tokenizer
    source_dir = tcfg.path or (config.model.base_path if tcfg.from_base else None)
    renderer = ChatRenderer(tokenizer, source_dir)
    template = renderer.template
    tokenizer.chat_template = template
    out = records_dir(config, digest, tokenizer, template)
    if load_records_manifest(out) is not None:
        log.info("using prepared records %s", out)
        return out
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        encoder = ExampleEncoder(tokenizer, renderer)
        meter = meter_for("preparing records", listing, config.data.sources)
        try:
            sources = [_prepare_source(i, src, listing[src.name], encoder, dtype, tmp, stop, meter)
                       for i, src in enumerate(config.data.sources)]
        finally:
            meter.close()
        manifest = {
            "version": MANIFEST_VERSION, "data_digest": digest, "tokenizer_digest": tokenizer.digest,
            "eos_id": tokenizer.eos_id, "end_of_turn_id": renderer.end_of_turn(), "dtype": dtype.name,
            "chat_template": template, "sources": sources,
            "seconds": round(time.monotonic() - t0, 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, out)
        except OSError:  # another node finished the same set first
            if load_records_manifest(out) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s examples (%s tokens, %s learned) in %.1fs -> %s",
             f"{sum(s['examples'] for s in sources):,}", f"{sum(s['tokens'] for s in sources):,}",
             f"{sum(s['learned_tokens'] for s in sources):,}", time.monotonic() - t0, out)
    return out


def _prepare_source(index: int, src: DataSourceConfig, files, encoder: ExampleEncoder, dtype, out: Path, stop,
                    meter: PrepareMeter) -> dict:
    label = source_label(index, src)
    records, index_rows = [], []
    offset = learned = 0
    with open(out / f"{src.name}.tokens", "wb") as tokens, open(out / f"{src.name}.mask", "wb") as masks:
        for fi, (f, digest) in enumerate(files):
            if stop is not None and stop():
                raise StoppedBeforeTraining("SIGTERM while the data was being prepared; nothing to save")
            raw = read_bytes(f, label)
            if hashlib.sha256(raw).hexdigest() != digest:
                raise DataError(f"{label}: {f.rel} changed while it was being prepared")
            rec = {"path": f.rel, "sha256": digest, "bytes": len(raw), "examples": 0, "tokens": 0}
            for at, record in iter_records(src, f, raw, label):
                where = f"{label}: {f.rel} {at}"
                examples = encoder.encode_pair(src, record, where) if src.record_kind == "preference" \
                    else [encoder.encode(src, record, where)]
                for ids, mask in examples:
                    tokens.write(np.asarray(ids, dtype=dtype).tobytes())
                    masks.write(np.asarray(mask, dtype=np.uint8).tobytes())
                    index_rows.append((offset, len(ids), fi, int(at.split()[-1])))
                    offset += len(ids)
                    learned += sum(mask)
                    rec["tokens"] += len(ids)
                rec["examples"] += 1
            records.append(rec)
            meter.add(files=1, size=len(raw), tokens=rec["tokens"])
    if not index_rows:
        raise DataError(f"{label}: the matching files hold no records")
    np.save(out / f"{src.name}.index.npy", np.asarray(index_rows, dtype=np.int64).reshape(-1, 4))
    # examples: what is packed whole (an sft example, a preference pair); the index lists every tokenized example (two per pair)
    return {"name": src.name, "format": src.format, "records": src.record_kind, "path": str(src.path),
            "files": records, "examples": sum(r["examples"] for r in records), "tokens": offset,
            "learned_tokens": learned}


# --------------------------------------------------------------------------- packed sequences
@dataclass
class _Examples:
    """One source's prepared examples (memory-mapped)."""

    tokens: np.ndarray
    mask: np.ndarray
    index: np.ndarray  # [examples, 4]: offset, length, file, line
    group: int = 1
    """Examples per unit packed whole: 1 (sft), 2 (a preference pair: chosen, rejected)."""
    base: int = 0
    """The number of this source's first unit among all sources' (a pair's key in packed rows)."""

    @property
    def units(self) -> int:
        return len(self.index) // self.group

    def unit_lengths(self) -> np.ndarray:
        return self.index[:, 1].reshape(-1, self.group).sum(axis=1)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        off, n = int(self.index[i, 0]), int(self.index[i, 1])
        return np.asarray(self.tokens[off : off + n], dtype=np.int64), np.asarray(self.mask[off : off + n])


def pack(lengths: np.ndarray, order: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Examples (in ``order``) into sequences of at most seq_len tokens, each example whole: a new
    sequence starts when the next example does not fit. Returns the examples of each sequence."""
    rows, row, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if row and used + n > seq_len:
            rows.append(np.asarray(row, dtype=np.int64))
            row, used = [], 0
        row.append(int(i))
        used += n
    if row:
        rows.append(np.asarray(row, dtype=np.int64))
    return rows


def packed_row(examples: _Examples, members: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """int64 [3, seq_len]: input ids, labels (the next token where it is learned, else -100) and
    position ids that restart at 0 for each example, which is how the model's attention tells the
    examples apart (a block-diagonal causal mask); the padding at the end is one more such block,
    never learned. ``members`` are units (examples, or preference pairs); for pairs a fourth row
    holds, at each learned label, the answer it belongs to: 2 x the pair's key + 0 (chosen) or 1
    (rejected), and -1 elsewhere."""
    g = examples.group
    out = np.empty((3 if g == 1 else 4, seq_len), dtype=np.int64)
    out[0], out[1:3] = pad_id, IGNORE
    if g == 2:
        out[3] = -1
    at = 0
    for u in members:
        for side in range(g):
            ids, mask = examples.example(int(u) * g + side)
            n = len(ids)
            out[0, at : at + n] = ids
            out[1, at : at + n - 1] = np.where(mask[1:] == 1, ids[1:], IGNORE)
            out[2, at : at + n] = np.arange(n)
            if g == 2:
                out[3, at : at + n - 1] = np.where(mask[1:] == 1, 2 * (examples.base + int(u)) + side, -1)
            at += n
    out[2, at:] = np.arange(seq_len - at)
    return out


class RecordData:
    """The prepared records of every source, packed into training and validation sequences.

    With validation.fraction the last fraction of each source's examples is held out (files are in a
    fixed pseudo-random order); with validation.source that whole source is. Training examples are
    packed once, after a seeded shuffle; the loader then walks the sequences in a new order each epoch
    (``data.packed.TrainLoader``). Validation examples are packed in order."""

    def __init__(self, path: Path, config: TrainerConfig):
        self.path = Path(path)
        manifest = load_records_manifest(self.path)
        if manifest is None:
            raise DataError(f"prepared records in {self.path} are missing or incomplete")
        self.manifest = manifest
        self.seq_len = L = config.training.seq_len
        self.pad_id = manifest["eos_id"]
        val = config.data.validation
        weights = {s.name: s.weight for s in config.data.sources}
        self.names, self.weights = [], []
        self.train: list[tuple[_Examples, list[np.ndarray]]] = []
        self.val: list[tuple[_Examples, list[np.ndarray]]] = []
        self.units = 0  # of all sources: preference pairs are keyed 0 .. units - 1
        for k, s in enumerate(manifest["sources"]):
            ex = self._load(k, s, config)
            ex.base, self.units = self.units, self.units + ex.units
            n = ex.units
            n_train = 0 if val.source == s["name"] else n - int(round(n * (val.fraction or 0.0)))
            if n_train < n:
                self.val.append((ex, pack(ex.unit_lengths(), np.arange(n_train, n), L)))
            if val.source != s["name"]:
                if n_train == 0:
                    raise DataError(f"data source {s['name']!r} has no training example left after the validation split")
                order = np.random.default_rng([config.training.seed, k]).permutation(n_train)
                self.train.append((ex, pack(ex.unit_lengths(), order, L)))
                self.names.append(s["name"])
                self.weights.append(weights[s["name"]])
        if (val.source or val.fraction) and not self.val:
            raise DataError("the validation split holds no example; raise data.validation.fraction or add data")
        total = sum(self.weights)
        self.weights = [w / total for w in self.weights]

    def _load(self, k: int, s: dict, config: TrainerConfig) -> _Examples:
        dtype = np.dtype(self.manifest["dtype"])
        ex = _Examples(tokens=np.memmap(self.path / f"{s['name']}.tokens", dtype=dtype, mode="r"),
                       mask=np.memmap(self.path / f"{s['name']}.mask", dtype=np.uint8, mode="r"),
                       index=np.load(self.path / f"{s['name']}.index.npy"),
                       group=2 if s["records"] == "preference" else 1)
        lengths = ex.unit_lengths()
        too_long = np.flatnonzero(lengths > self.seq_len)
        if len(too_long):
            first = ex.index[too_long[0] * ex.group]
            where = self._where(s, config, first)
            what = "example" if ex.group == 1 else "pair (prompt + chosen and prompt + rejected, trained as one sequence)"
            raise DataError(
                f"{where}: the {what} has {lengths[too_long[0]]} tokens, more than training.seq_len {self.seq_len} "
                f"({len(too_long)} of the source's {ex.units} {what.split()[0]}s are); examples are never cut: "
                "shorten or remove them, or raise training.seq_len")
        return ex

    def _where(self, s: dict, config: TrainerConfig, row: np.ndarray) -> str:
        i = next(j for j, c in enumerate(config.data.sources) if c.name == s["name"])
        unit = "line" if s["format"] == "jsonl" else "row"
        return f"{source_label(i, config.data.sources[i])}: {s['files'][int(row[2])]['path']} {unit} {int(row[3])}"

    # what data.packed.TrainLoader reads
    def train_rows(self, s: int) -> int:
        return len(self.train[s][1])

    def train_row(self, s: int, i: int) -> np.ndarray:
        ex, rows = self.train[s]
        return packed_row(ex, rows[i], self.seq_len, self.pad_id)

    @property
    def val_windows(self) -> int:
        return sum(len(rows) for _, rows in self.val)

    def val_window(self, i: int) -> np.ndarray:
        for ex, rows in self.val:
            if i < len(rows):
                return packed_row(ex, rows[i], self.seq_len, self.pad_id)
            i -= len(rows)
        raise IndexError(i)
