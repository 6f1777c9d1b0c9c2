"""The report beside results.json: report.md with tables of the metrics against the baseline and the
gates, and one bar chart per suite (PNG, matplotlib), readable without Forge."""

from __future__ import annotations

from pathlib import Path

from ..contract import GateOutcome, SuiteOutcome


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def write_report(out: Path, name: str, model: str, baseline: str | None, suites: list[SuiteOutcome],
                 gates: list[GateOutcome]) -> Path:
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
    lines += ["", "Perplexity suites: loss is the mean cross-entropy per predicted token (nats), perplexity = exp(loss), "
              "bits_per_byte = total nats / ln 2 / UTF-8 bytes of the predicted tokens. Multiple-choice: acc picks the "
              "choice with the highest summed log-probability, acc_norm the highest per character. Exact-match: "
              "greedy answer, cut at the first stop sequence, compared after SQuAD normalisation.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _chart(out: Path, s: SuiteOutcome) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
