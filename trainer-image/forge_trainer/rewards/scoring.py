"""Building the configured reward functions, calling them and checking what they return."""

from __future__ import annotations

import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import RewardConfig
from ..contract import ConfigError, RewardError

RewardCallable = Callable[..., Sequence]


@dataclass
class RewardFunction:
    name: str
    weight: float
    fn: RewardCallable
    kind: str


@dataclass
class Scores:
    total: list[float]
    """Per completion: the weighted sum over the functions (a function's None adds nothing)."""
    by_function: dict[str, list[float | None]]
    """Per function name, per completion: its score (None where it does not apply)."""


class Rewards:
    """The configured reward functions, called together."""

    def __init__(self, functions: list[RewardFunction]):
        self.functions = functions

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]

    def check_columns(self, columns: Sequence[str]) -> None:
        """Fail now (ConfigError), not at the first step, when a function cannot take the prompt records'
        columns as keyword arguments (nor prompts and completions)."""
        for f in self.functions:
            try:
                inspect.signature(f.fn).bind(prompts=[], completions=[], **{c: [] for c in columns})
            except TypeError as e:
                raise ConfigError(f"reward {f.name!r}: cannot be called as {f.name}(prompts, completions, "
                                  f"{', '.join(f'{c}=...' for c in columns)}): {e}") from None
            except ValueError:  # no signature to read (a builtin): left to the call
                pass

    def score(self, prompts: list, completions: list, columns: dict[str, list] | None = None) -> Scores:
        columns = columns or {}
        n = len(completions)
        by_function: dict[str, list[float | None]] = {}
        for f in self.functions:
            try:
                out = f.fn(prompts=prompts, completions=completions, **columns)
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(f"reward {f.name!r} raised {type(e).__name__}: {e} (batch of {n} completions, "
                                  f"the first: {_short(completions[0]) if n else 'none'})") from e
            by_function[f.name] = _checked(f.name, out, completions)
        total = [sum(f.weight * by_function[f.name][i] for f in self.functions if by_function[f.name][i] is not None)
                 for i in range(n)]
        return Scores(total=[float(t) for t in total], by_function=by_function)


def _checked(name: str, out, completions: list) -> list[float | None]:
    if hasattr(out, "tolist"):  # a numpy array or a tensor
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward {name!r} returned {type(out).__name__}, not a list of numbers")
    if len(out) != len(completions):
        raise RewardError(f"reward {name!r} returned {len(out)} scores for {len(completions)} completions")
    scores: list[float | None] = []
    for i, v in enumerate(out):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
            raise RewardError(f"reward {name!r}: item {i} is {v!r} ({type(v).__name__}), not a finite number "
                              f"(completion: {_short(completions[i])})")
        scores.append(None if v is None else float(v))
    return scores


def _short(completion, limit: int = 80) -> str:
    text = completion_text(completion)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def completion_text(completion) -> str:
    """A completion's text: the text itself, or the content of a chat completion's (last) message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)


# ---------------------------------------------------------------------------
# Building


def build_rewards(configs: list[RewardConfig]) -> Rewards:
    """The functions of the configuration (ConfigError on one that cannot be loaded)."""
    from .builtin import BUILTINS
    from .http import http_reward

    functions = []
    for c in configs:
        if c.function is not None:
            fn = load_function(c.name, c.function)
        elif c.http is not None:
            fn = http_reward(c.name, c.http)
        else:
            fn = BUILTINS[c.kind](getattr(c, c.kind))
        functions.append(RewardFunction(name=c.name, weight=c.weight, fn=fn, kind=c.kind))
    return Rewards(functions)


def load_function(name: str, ref: str) -> RewardCallable:
    """The callable ``path/to/module.py:function``, its file imported as a module of its own (its folder on
    sys.path while it imports, so it may import its neighbours)."""
    file, _, attr = ref.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"reward {name!r}: module {file} not found")
    spec = importlib.util.spec_from_file_location(f"forge_reward_{name.replace('.', '_').replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"reward {name!r}: module {file} does not import: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent.resolve()))
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"reward {name!r}: module {file} has no {attr!r}")
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: {ref} is a {type(fn).__name__}, not a function")
    _check_signature(name, ref, fn)
    return fn


def _check_signature(name: str, ref: str, fn) -> None:
    """TRL calls ``fn(prompts=..., completions=..., **columns)``: both must be accepted by keyword."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    missing = [k for k in ("prompts", "completions") if k not in names]
    if missing:
        raise ConfigError(f"reward {name!r}: {ref}{sig} does not take {' and '.join(missing)} as keyword arguments; "
                          "a reward function is f(prompts, completions, **columns) -> list[float]")
