"""Scoring a loaded model on one suite. Each suite gives its metrics and, for per-item metrics, which
items it got right (for the paired test against a baseline). Batched, deterministic (no sampling)."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..contract import DataError
from .config import REWARD_METRIC, SuiteConfig
from .items import Prompt, columns_of, documents, generation_items, iter_batches, task_items
from .model import LoadedModel

Tick = Callable[[int], None]
"""Called with the number of items (windows) just scored, for a progress bar."""


@dataclass
class SuiteScore:
    samples: int
    metrics: dict[str, float]
    per_item: dict[str, list] = field(default_factory=dict)
    """metric -> right or wrong per item (multiple-choice, exact-match), or the reward per item (generation;
    None where a function does not apply)."""


# ---- perplexity ----------------------------------------------------------------------------------

def token_bytes(tokenizer) -> list[int]:
    """UTF-8 bytes of each token id (0 for special tokens): exact for byte-level BPE (each character of
    a token stands for one byte), the decoded length otherwise."""
    from ..data.tokenizer import _byte_decoder

    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    decoder = getattr(tokenizer.backend_tokenizer, "decoder", None) if hasattr(tokenizer, "backend_tokenizer") else None
    byte_level = type(decoder).__name__ == "ByteLevel"
    table = _byte_decoder()
    out = []
    for i, tok in enumerate(vocab):
        if i in special or tok is None:
            out.append(0)
        elif byte_level and all(c in table for c in tok):
            out.append(len(tok))
        else:
            out.append(len(tokenizer.decode([i]).encode("utf-8")))
    return out


def perplexity_windows(lm: LoadedModel, suite: SuiteConfig) -> torch.Tensor:
    """The documents, each followed by end-of-text, as one token stream tiled by windows of seq_len + 1
    tokens without overlap (the trainer's validation windows); a partial last window is left out."""
    docs = documents(suite)
    seq_len = suite.seq_len or min(lm.context, 2048)
    if seq_len > lm.context:
        raise DataError(f"suite {suite.name}: seqLen {seq_len} is above the model's context ({lm.context})")
    eos = [lm.eos_id] if lm.eos_id is not None else []
    stream: list[int] = []
    for ids in lm.tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + eos)
    n = (len(stream) - 1) // seq_len
    if n == 0:
        raise DataError(f"suite {suite.name}: {len(stream)} tokens, fewer than one window of seqLen {seq_len} + 1")
    return torch.tensor(stream[: n * seq_len + 1]).unfold(0, seq_len + 1, seq_len)


@torch.no_grad()
def score_perplexity(lm: LoadedModel, suite: SuiteConfig, batch_size: int, tick: Tick) -> SuiteScore:
    windows = perplexity_windows(lm, suite)
    nbytes = torch.tensor(token_bytes(lm.tokenizer), dtype=torch.float64)
    nats = tokens = byte_count = 0.0
    for rows in iter_batches(windows, batch_size):
        batch = rows.to(lm.device)
        logits = lm.model(input_ids=batch[:, :-1]).logits.float()
        nats += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").double().item()
        tokens += batch[:, 1:].numel()
        byte_count += nbytes[rows[:, 1:].clamp(max=len(nbytes) - 1)].sum().item()
        tick(len(rows))
    loss = nats / tokens
    bpb = nats / math.log(2) / byte_count if byte_count else float("nan")
    return SuiteScore(samples=len(windows), metrics={"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bpb})


# ---- multiple-choice -----------------------------------------------------------------------------

def prompt_of(lm: LoadedModel, suite: SuiteConfig, question: str) -> str:
    if not suite.chat:
        return question
    if not getattr(lm.tokenizer, "chat_template", None):
        raise DataError(f"suite {suite.name}: chat is set but the model's tokenizer has no chat template")
    return lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                            add_generation_prompt=True)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context move to the continuation, the
    whole string is encoded and the continuation is what follows the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(lm: LoadedModel, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """Sum of log-probabilities of each continuation given its context (right-padded batches); an empty
    context is preceded by end-of-text, as lm-evaluation-harness does."""
    out: list[float] = []
    pad = lm.tokenizer.pad_token_id
    for chunk in iter_batches(pairs, batch_size):
        rows = [((ctx or [lm.eos_id]) + cont)[-(lm.context + 1):] for ctx, cont in chunk]
        width = max(len(r) for r in rows) - 1
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r) - 1] = torch.tensor(r[:-1])
            mask[i, : len(r) - 1] = 1
        logp = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits.float().log_softmax(-1)
        for i, ((_, cont), r) in enumerate(zip(chunk, rows)):
            start = len(r) - 1 - len(cont)
            target = torch.tensor(cont, device=lm.device)
            out.append(logp[i, start: start + len(cont)].gather(-1, target[:, None]).sum().item())
    return out


def choose(lls: list[float], choices: tuple[str, ...]) -> tuple[int, int]:
    """(acc's pick, acc_norm's pick): the highest log-likelihood, and the highest per character of the
    choice (lm-evaluation-harness's acc_norm: the choice's length without the space before it)."""
    best = max(range(len(lls)), key=lambda i: lls[i])
    norm = max(range(len(lls)), key=lambda i: lls[i] / max(len(choices[i]), 1))
    return best, norm


def score_multiple_choice(lm: LoadedModel, suite: SuiteConfig, batch_size: int, tick: Tick) -> SuiteScore:
    items = task_items(suite)
    acc: list[bool] = []
    acc_norm: list[bool] = []
    for chunk in iter_batches(items, max(1, batch_size // 2)):
        pairs = [encode_pair(lm.tokenizer, prompt_of(lm, suite, it.question), " " + c) for it in chunk for c in it.choices]
        lls = loglikelihoods(lm, pairs, batch_size)
        at = 0
        for it in chunk:
            best, norm = choose(lls[at: at + len(it.choices)], it.choices)
            at += len(it.choices)
            acc.append(best == it.label)
            acc_norm.append(norm == it.label)
        tick(len(chunk))
    return SuiteScore(samples=len(items), metrics={"acc": sum(acc) / len(acc), "acc_norm": sum(acc_norm) / len(acc_norm)},
                      per_item={"acc": acc, "acc_norm": acc_norm})


# ---- exact-match ---------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop sequence (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


def is_exact_match(prediction: str, answers: tuple[str, ...]) -> bool:
    return any(normalize_answer(prediction) == normalize_answer(a) for a in answers)


@torch.no_grad()
def generate(lm: LoadedModel, prompts: list[str], max_new_tokens: int, temperature: float | None = None) -> list[str]:
    """Continuations of the prompts (left-padded batch, with the KV cache), without the prompts: greedy, or
    sampled at ``temperature`` from torch's generator (the caller seeds it)."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {"do_sample": False}
    out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, use_cache=True, **sampling)
    return tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)


def score_exact_match(lm: LoadedModel, suite: SuiteConfig, batch_size: int, tick: Tick,
                      predictions: list[str] | None = None) -> SuiteScore:
    items = task_items(suite)
    right: list[bool] = []
    for chunk in iter_batches(items, batch_size):
        texts = generate(lm, [prompt_of(lm, suite, it.question) for it in chunk], suite.max_new_tokens)
        for it, text in zip(chunk, texts):
            answer = cut_at_stop(text, suite.stop or [])
            right.append(is_exact_match(answer, it.answers))
            if predictions is not None:
                predictions.append(answer)
        tick(len(chunk))
    return SuiteScore(samples=len(items), metrics={"exact_match": sum(right) / len(right)}, per_item={"exact_match": right})


# ---- generation ----------------------------------------------------------------------------------

def _conversational(suite: SuiteConfig, it: Prompt) -> bool:
    return isinstance(it.prompt, list) or suite.chat


def generation_prompt(lm: LoadedModel, suite: SuiteConfig, it: Prompt) -> str:
    """The text the model continues: a plain prompt as it is, messages (or a plain prompt with chat set) in
    the tokenizer's chat template with the assistant's turn opened."""
    if isinstance(it.prompt, str):
        return prompt_of(lm, suite, it.prompt)
    if not getattr(lm.tokenizer, "chat_template", None):
        raise DataError(f"suite {suite.name}: a prompt is a list of messages but the model's tokenizer has no chat template")
    return lm.tokenizer.apply_chat_template(it.prompt, tokenize=False, add_generation_prompt=True)


def score_generation(lm: LoadedModel, suite: SuiteConfig, batch_size: int, tick: Tick,
                     completions: list[str] | None = None) -> SuiteScore:
    """Generate a completion per prompt and score it with the suite's reward functions, called as GRPO calls
    them (TRL's signature: chat prompts and completions as messages, the record's other fields as columns).
    Raises ConfigError (a function that cannot be loaded or called with these columns) or RewardError."""
    from ..rewards import build_rewards

    rewards = build_rewards(suite.rewards or [])
    items = generation_items(suite)
    rewards.check_columns(list(columns_of(items)))
    torch.manual_seed(suite.seed)
    total: list[float] = []
    by_function: dict[str, list[float | None]] = {n: [] for n in rewards.names}
    for chunk in iter_batches(items, batch_size):
        texts = [cut_at_stop(t, suite.stop or []) for t in
                 generate(lm, [generation_prompt(lm, suite, it) for it in chunk], suite.max_new_tokens, suite.temperature)]
        chat = [_conversational(suite, it) for it in chunk]
        prompts = [(it.prompt if isinstance(it.prompt, list) else [{"role": "user", "content": it.prompt}]) if c
                   else it.prompt for it, c in zip(chunk, chat)]
        outs = [[{"role": "assistant", "content": t}] if c else t for t, c in zip(texts, chat)]
        scores = rewards.score(prompts, outs, columns_of(chunk))
        total += scores.total
        for n in rewards.names:
            by_function[n] += scores.by_function[n]
        if completions is not None:
            completions += texts
        tick(len(chunk))
    metrics = {REWARD_METRIC: sum(total) / len(total)}
    per_item: dict[str, list] = {REWARD_METRIC: total}
    for n, values in by_function.items():
        applied = [v for v in values if v is not None]
        if not applied:
            raise DataError(f"suite {suite.name}: reward {n!r} returned None (does not apply) for every item")
        metrics[f"{REWARD_METRIC}_{n}"] = sum(applied) / len(applied)
        per_item[f"{REWARD_METRIC}_{n}"] = values
    return SuiteScore(samples=len(items), metrics=metrics, per_item=per_item)


SCORERS = {"perplexity": score_perplexity, "multiple-choice": score_multiple_choice, "exact-match": score_exact_match,
           "generation": score_generation}

