"""The built-in verifiers, for policies common enough not to need code: each scores 1.0 or 0.0."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable

from ..config import ExactMatchReward, JsonSchemaReward, LengthReward, RegexReward
from ..contract import ConfigError
from .scoring import completion_text


def normalize(text: str) -> str:
    """Case-folded, whitespace runs made one space, surrounding whitespace and final punctuation removed."""
    return " ".join(text.split()).casefold().rstrip(string.punctuation + " ")


def exact_match(c: ExactMatchReward) -> Callable:
    extract = re.compile(c.extract, re.DOTALL) if c.extract else None
    same = (lambda a, b: normalize(a) == normalize(b)) if c.normalize else (lambda a, b: a == b)

    def score(prompts, completions, **columns):
        if c.column not in columns:
            raise KeyError(f"the prompt records have no column {c.column!r} (they have: {', '.join(columns) or 'none'})")
        out = []
        for completion, ref in zip(completions, columns[c.column]):
            text = completion_text(completion)
            if extract is not None:
                m = extract.search(text)
                if m is None:
                    out.append(0.0)
                    continue
                text = m.group(1)
            out.append(1.0 if ref is not None and same(text, str(ref)) else 0.0)
        return out

    return score


def regex(c: RegexReward) -> Callable:
    must = [re.compile(p) for p in c.must_match]
    must_not = [re.compile(p) for p in c.must_not_match]

    def score(prompts, completions, **columns):
        texts = [completion_text(x) for x in completions]
        return [1.0 if all(p.search(t) for p in must) and not any(p.search(t) for p in must_not) else 0.0
                for t in texts]

    return score


def json_schema(c: JsonSchemaReward) -> Callable:
    import jsonschema

    cls = jsonschema.validators.validator_for(c.json_schema)
    try:
        cls.check_schema(c.json_schema)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"json_schema reward: the schema is invalid: {e.message}") from None
    validator = cls(c.json_schema)

    def valid(text: str) -> bool:
        try:
            doc = json.loads(text)
        except ValueError:
            return False
        return validator.is_valid(doc)

    def score(prompts, completions, **columns):
        return [1.0 if valid(completion_text(x)) else 0.0 for x in completions]

    return score


def length(c: LengthReward) -> Callable:
    lo, hi = c.min_chars or 0, c.max_chars

    def score(prompts, completions, **columns):
        return [1.0 if lo <= len(t) and (hi is None or len(t) <= hi) else 0.0
                for t in map(completion_text, completions)]

    return score


BUILTINS = {"exact_match": exact_match, "regex": regex, "json_schema": json_schema, "length": length}
