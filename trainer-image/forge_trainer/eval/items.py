"""Reading a suite's files: documents (perplexity) and task items (multiple-choice, exact-match)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..config import DataSourceConfig
from ..contract import DataError
from ..data.sources import discover, iter_documents, iter_records, read_bytes
from .config import SuiteConfig


@dataclass(frozen=True)
class Item:
    question: str
    answers: tuple[str, ...] = ()
    """exact-match: accepted answers."""
    choices: tuple[str, ...] = ()
    """multiple-choice: the choices; `label` is the right one's index."""
    label: int = -1


def _source(suite: SuiteConfig) -> DataSourceConfig:
    return DataSourceConfig(name=suite.name, path=suite.path, format=suite.format, include=suite.include,
                            text_field=suite.text_field)


def _where(suite: SuiteConfig) -> str:
    return f"suite {suite.name} ({suite.path})"


def documents(suite: SuiteConfig) -> list[str]:
    """The documents of a perplexity suite, in the trainer's file order (so windows match its validation)."""
    src, where = _source(suite), _where(suite)
    out: list[str] = []
    for f in _files(src, where):
        for doc in iter_documents(src, f, read_bytes(f, where), where):
            out.append(doc)
            if suite.max_samples and len(out) >= suite.max_samples:
                return out
    if not out:
        raise DataError(f"{where}: the files hold no text")
    return out


def _files(src: DataSourceConfig, where: str):
    try:
        return discover(src, 0)
    except DataError as e:
        raise DataError(f"{where}: {str(e).split(': ', 2)[-1]}") from e


def task_items(suite: SuiteConfig) -> list[Item]:
    """The items of a multiple-choice or exact-match suite; a bad record is an error naming its line."""
    src, where = _source(suite), _where(suite)
    out: list[Item] = []
    for f in _files(src, where):
        for at, record in iter_records(src, f, read_bytes(f, where), where):
            out.append(_item(suite, record, f"{where}: {f.rel} {at}"))
            if suite.max_samples and len(out) >= suite.max_samples:
                return out
    if not out:
        raise DataError(f"{where}: the files hold no items")
    return out


def _item(suite: SuiteConfig, record: dict, at: str) -> Item:
    q = record.get(suite.question_field)
    if not isinstance(q, str):
        raise DataError(f"{at}: no string field {suite.question_field!r} (questionField)")
    answer = record.get(suite.answer_field)
    if suite.type == "exact-match":
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{at}: field {suite.answer_field!r} (answerField) must be a string or a list of strings")
        return Item(question=q, answers=tuple(answers))
    choices = record.get(suite.choices_field)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{at}: field {suite.choices_field!r} (choicesField) must be a list of at least 2 strings")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise DataError(f"{at}: field {suite.answer_field!r} (answerField) must be the index of the right choice "
                        f"(0..{len(choices) - 1}) or its text")
    return Item(question=q, choices=tuple(choices), label=answer)


@dataclass(frozen=True)
class Prompt:
    """A generation suite's item: the prompt (text, or a list of {role, content} messages) and the record's
    other fields (the reward functions' columns)."""

    prompt: str | list[dict]
    columns: dict


def generation_items(suite: SuiteConfig) -> list[Prompt]:
    """The prompts of a generation suite; a record without a usable prompt is an error naming its line."""
    src, where = _source(suite), _where(suite)
    out: list[Prompt] = []
    for f in _files(src, where):
        for at, record in iter_records(src, f, read_bytes(f, where), where):
            p = record.get(suite.prompt_field)
            chat = isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     and isinstance(m.get("content"), str) for m in p)
            if not (isinstance(p, str) or chat):
                raise DataError(f"{where}: {f.rel} {at}: field {suite.prompt_field!r} (promptField) must be a string or "
                                "a list of {role, content} messages")
            out.append(Prompt(prompt=p, columns={k: v for k, v in record.items() if k != suite.prompt_field}))
            if suite.max_samples and len(out) >= suite.max_samples:
                return out
    if not out:
        raise DataError(f"{where}: the files hold no items")
    return out


def columns_of(items: list[Prompt]) -> dict[str, list]:
    """The records' other fields as the reward functions take them: one list per field (None where a record
    lacks it)."""
    names = list(dict.fromkeys(k for it in items for k in it.columns))
    return {k: [it.columns.get(k) for it in items] for k in names}


def iter_batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
