"""One evaluation: load the model (and the baseline), score every suite on both, judge the gates,
write results.json and the report, and return the summary the termination message carries."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..contract import EVAL_RESULTS_FILE, EvalTerminationMessage, GateOutcome, SuiteOutcome
from ..runtime.egress import egress_locked, policy_for
from .config import EvalConfig, SuiteConfig
from .gates import judge
from .locations import localized, publish_results, s3_endpoints
from .model import LoadedModel, load_model
from .report import training_curve, write_report
from .suites import SCORERS, SuiteScore

log = logging.getLogger(__name__)
TERMINATION_LIMIT = 4096  # bytes the kubelet keeps of a termination message

OnProgress = Callable[[str, str, int], None]
"""(suite, "model" or "baseline", items scored so far) after each batch."""


def _score(lm: LoadedModel, suite: SuiteConfig, who: str, batch_size: int, on_progress: OnProgress | None) -> SuiteScore:
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(suite.name, who, done)

    torch.manual_seed(0)
    score = SCORERS[suite.type](lm, suite, batch_size, tick)
    log.info("%s on %s: %s", suite.name, who, ", ".join(f"{k} {v:.4f}" for k, v in score.metrics.items()))
    return score


def egress_policy(config: EvalConfig):
    """The trainer's egress lock for an evaluation: loopback, egress.allow, the S3 endpoint of the s3://
    locations and the suites' HTTP reward services (None: no lock). Not the API server: the evaluator
    does not report to it."""
    if not config.egress.lock:
        return None
    urls = [r.http.url for s in config.suites for r in s.rewards or [] if r.http is not None]
    return policy_for([*config.egress.allow, *s3_endpoints(config)], urls, subject="the evaluation", api_server=False)


def evaluate(config: EvalConfig, on_progress: OnProgress | None = None) -> EvalTerminationMessage:
    """Raises ConfigError (a model or baseline that cannot be loaded, a reward function that cannot be
    loaded), DataError (a suite's files), RewardError (a reward function that fails) or StorageError (an
    s3:// location), under the egress lock."""
    with egress_locked(egress_policy(config)):
        local = localized(config)
        message = _evaluate(local, on_progress, shown=config)
        message.results = publish_results(local, config)
        return message


def _evaluate(config: EvalConfig, on_progress: OnProgress | None, shown: EvalConfig) -> EvalTerminationMessage:
    """``config`` with local folders; ``shown``: as configured, for the results' record of the models."""
    model = load_model(config.model_path, "model", config.device, config.dtype, config.gpus)
    baseline = load_model(config.baseline_path, "baseline", config.device, config.dtype, config.gpus) if config.baseline_path else None
    scores: dict[str, tuple[SuiteScore, SuiteScore | None]] = {}
    for suite in config.suites:
        mine = _score(model, suite, "model", config.batch_size, on_progress)
        theirs = _score(baseline, suite, "baseline", config.batch_size, on_progress) if baseline else None
        scores[suite.name] = (mine, theirs)
    suites = [SuiteOutcome(suite=s.name, type=s.type, samples=scores[s.name][0].samples, metrics=scores[s.name][0].metrics,
                           baseline=scores[s.name][1].metrics if scores[s.name][1] else None) for s in config.suites]
    gates = [_judge(g, scores) for g in config.gates]
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / EVAL_RESULTS_FILE
    message = EvalTerminationMessage(status="completed", exit_code=0, suites=suites, gates=gates,
                                     gates_passed=all(g.passed for g in gates) if gates else None, results=str(results))
    full = message.to_wire() | {"name": config.name, "model": shown.model_path, "baseline": shown.baseline_path,
                                "perItem": {n: {"model": m.per_item, "baseline": b.per_item if b else None}
                                            for n, (m, b) in scores.items() if m.per_item}}
    results.write_text(json.dumps(full, indent=1) + "\n")
    write_report(out, config.name, shown.model_path, shown.baseline_path, suites, gates,
                 training_curve(config.model_path))
    return message


def _judge(gate, scores: dict[str, tuple[SuiteScore, SuiteScore | None]]) -> GateOutcome:
    suite, metric = gate.metric.split(".", 1)
    mine, theirs = scores[suite]
    pairs = (mine.per_item[metric], theirs.per_item[metric]) if theirs and metric in mine.per_item else None
    return judge(gate, mine.metrics[metric], theirs.metrics[metric] if theirs else None, pairs)


def compact(message: EvalTerminationMessage, limit: int = TERMINATION_LIMIT) -> EvalTerminationMessage:
    """The message cut to fit the kubelet's limit: first the gates' words, then the baselines' metrics, then
    the suites (results.json keeps everything)."""
    m = message.model_copy(deep=True)
    steps = [lambda: [setattr(g, "message", None) for g in m.gates or []],
             lambda: [setattr(s, "baseline", None) for s in m.suites or []],
             lambda: setattr(m, "suites", None)]
    for step in steps:
        if len(m.to_json().encode()) <= limit:
            break
        step()
    return m
