"""The report beside results.json: report.md with tables of the metrics against the baseline and the
gates, one bar chart per suite and, for a model a Forge training made, its loss curve (PNG, matplotlib),
readable without Forge."""

from __future__ import annotations

import json
from pathlib import Path

from ..contract import GateOutcome, SuiteOutcome


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def write_report(out: Path, name: str, model: str, baseline: str | None, suites: list[SuiteOutcome],
                 gates: list[GateOutcome], curve: list[dict] | None = None) -> Path:
    """``curve``: the model's training log history ({step, loss} and {step, val_loss}), when it has one."""
    lines = [f"# Evaluation {name}", "", f"- model: `{model}`"]
    if baseline:
        lines.append(f"- baseline: `{baseline}`")
    if gates:
        passed = all(g.passed for g in gates)
        lines.append(f"- gates: **{'all passed' if passed else 'FAILED'}** ({sum(g.passed for g in gates)} of {len(gates)})")
    lines += ["", "## Metrics", "", "| suite | metric | model | baseline | difference | items |", "|---|---|---:|---:|---:|---:|"]
    for s in suites:
        for metric, value in s.metrics.items():
            b = (s.baseline or {}).get(metric)
            diff = f"{value - b:+.4f}" if b is not None else ""
            lines.append(f"| {s.suite} | {metric} | {_num(value)} | {_num(b)} | {diff} | {s.samples} |")
    if gates:
        lines += ["", "## Gates", "", "| gate | outcome | detail |", "|---|---|---|"]
        lines += [f"| {g.metric} | {'passed' if g.passed else 'failed'} | {g.message} |" for g in gates]
    charts = [_chart(out, s) for s in suites]
    lines += ["", "## Charts", ""] + [f"![{s.suite}]({c})" for s, c in zip(suites, charts)]
    if curve:
        lines += ["", "## Training", "", _curve_words(curve), "", f"![training loss]({_curve_chart(out, curve)})"]
    lines += ["", "Perplexity suites: loss is the mean cross-entropy per predicted token (nats), perplexity = exp(loss), "
              "bits_per_byte = total nats / ln 2 / UTF-8 bytes of the predicted tokens. Multiple-choice: acc picks the "
              "choice with the highest summed log-probability, acc_norm the highest per character. Exact-match: "
              "greedy answer, cut at the first stop sequence, compared after SQuAD normalisation.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def training_curve(model_path: str) -> list[dict] | None:
    """The log history of the training that made the model: an export's training_log.jsonl, or the
    trainer state of a checkpoint; None for a model from elsewhere."""
    from ..runtime.checkpoint import STATE_FILE
    from ..runtime.export import TRAINING_LOG
    from .model import training_checkpoint

    p = Path(model_path)
    if (p / TRAINING_LOG).is_file():
        return [json.loads(line) for line in (p / TRAINING_LOG).read_text().splitlines() if line.strip()]
    ckpt = training_checkpoint(p)
    return json.loads((ckpt / STATE_FILE).read_text()).get("log_history") if ckpt is not None else None


def _series(curve: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in curve if h.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _curve_words(curve: list[dict]) -> str:
    words = [f"The model's training: {max(h['step'] for h in curve)} steps"]
    for key, label in (("loss", "training loss"), ("val_loss", "validation loss")):
        steps, values = _series(curve, key)
        if values:
            words.append(f"{label} {values[0]:.4f} at step {steps[0]}, {values[-1]:.4f} at step {steps[-1]}")
    return "; ".join(words) + "."


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve_chart(out: Path, curve: list[dict]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for key, label, style in (("loss", "training loss", "-"), ("val_loss", "validation loss", "o-")):
        steps, values = _series(curve, key)
        if values:
            ax.plot(steps, values, style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("training")
    ax.legend()
    fig.tight_layout()
    name = "training_loss.png"  # not a suite's chart: suite names have no underscore
    fig.savefig(out / name)
    plt.close(fig)
    return name


def _chart(out: Path, s: SuiteOutcome) -> str:
    plt = _pyplot()
    names = list(s.metrics)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.2), dpi=100)
    x = range(len(names))
    width = 0.38 if s.baseline else 0.6
    ax.bar([i - (width / 2 if s.baseline else 0) for i in x], [s.metrics[n] for n in names], width, label="model")
    if s.baseline:
        ax.bar([i + width / 2 for i in x], [s.baseline.get(n, 0.0) for n in names], width, label="baseline")
        ax.legend()
    ax.set_xticks(list(x), names)
    ax.set_title(f"{s.suite} ({s.type}, {s.samples} items)")
    fig.tight_layout()
    name = f"{s.suite}.png"
    fig.savefig(out / name)
    plt.close(fig)
    return name
