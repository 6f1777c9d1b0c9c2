"""Gates: absolute (metric, comparator, threshold) and relative (maxDrop against the baseline), with
McNemar's exact test for per-item metrics so that a relative gate does not fail on noise. Pure."""

from __future__ import annotations

from math import comb

from ..contract import GateOutcome
from .config import PER_ITEM, GateConfig, has_per_item, higher_is_better


def mcnemar_p(worse: int, better: int) -> float:
    """McNemar's exact test, one-sided: the probability of at least `worse` discordant pairs going the
    baseline's way out of worse + better, if neither model were better (binomial, p = 1/2).

    worse: items the baseline got right and the model wrong; better: the reverse. Items both got
    right or both wrong say nothing about which model is better and do not count."""
    n = worse + better
    if n == 0:
        return 1.0
    return min(1.0, sum(comb(n, k) for k in range(worse, n + 1)) / 2**n)


def drop_of(metric: str, value: float, baseline: float) -> float:
    """How much worse the model is than the baseline: a fall of an accuracy, a rise of a loss."""
    return baseline - value if higher_is_better(metric) else value - baseline


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def judge(gate: GateConfig, value: float, baseline: float | None = None,
          pairs: tuple[list[bool], list[bool]] | None = None) -> GateOutcome:
    """The outcome of one gate. pairs: the per-item outcomes (model, baseline) of a per-item metric."""
    if gate.max_drop is None:
        passed = gate.passes(value)
        verdict = "passed" if passed else "failed"
        return GateOutcome(metric=gate.metric, passed=passed, value=value, comparator=gate.comparator,
                           threshold=gate.threshold,
                           message=f"{gate.metric} = {_fmt(value)}, needs {gate.comparator} {_fmt(gate.threshold)}: {verdict}")
    assert baseline is not None
    name = gate.metric.split(".", 1)[1]
    drop = drop_of(name, value, baseline)
    p = None
    if has_per_item(name) and pairs is not None:
        # McNemar's exact test on right-or-wrong items is the sign test on the pairs that differ: the same
        # binomial on (worse, better), which also serves a per-item reward (items without a score left out).
        both = [(m, b) for m, b in zip(*pairs) if m is not None and b is not None]
        p = mcnemar_p(sum(m < b for m, b in both), sum(m > b for m, b in both))
    within = drop <= gate.max_drop
    passed = within or (p is not None and p >= gate.significance)
    words = (f"{gate.metric} = {_fmt(value)} against baseline {_fmt(baseline)}: drop {_fmt(drop)}, "
             f"maxDrop {_fmt(gate.max_drop)}")
    if p is not None:
        words += f", {'McNemar' if name in PER_ITEM else 'sign test'} p = {p:.3g}"
    if passed and not within:
        words += f" (not significant at {gate.significance:g}): passed"
    else:
        words += ": passed" if passed else ": failed"
    return GateOutcome(metric=gate.metric, passed=passed, value=value, baseline=baseline, max_drop=gate.max_drop,
                       drop=drop, p_value=p, message=words)
