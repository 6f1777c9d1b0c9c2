"""`forge eval FILE.yaml`: run a ForgeEval's suites on this machine, no cluster needed.

The file is validated with the same models as the API server and translated by the same function
the operator uses; PersistentVolumeClaims become local folders (``--volume CLAIM=DIR``, default
``./volumes/<claim>``), and so do the ConfigMaps of reward functions (by name); S3 locations are read
with the credentials of the environment, through ``./volumes/.forge-scratch``. A ``model.trainingRef`` names a ForgeTraining in the same file: its
``spec.output`` is the model. Prints a table of the metrics (against the baseline) and the gates;
exit code 0 when every gate passed, 1 when one failed, the trainer's codes for bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from forge_trainer.contract import EvalTerminationMessage, ExitCode

from ..api.base import PvcLocation, StorageLocation, format_error
from ..api.eval import ForgeEval
from ..api.training import ForgeTraining
from ..evaluation.translate import TranslationError, eval_config, model_location
from .local import LOCAL_SCRATCH, parse_volumes

GATE_FAILED = 1


def load_eval(path: str) -> tuple[ForgeEval, dict[str, ForgeTraining]]:
    """The ForgeEval in ``path`` and the ForgeTrainings beside it (by name)."""
    evals, trainings = [], {}
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if isinstance(doc, dict) and doc.get("kind") == "ForgeEval":
            doc.setdefault("metadata", {}).setdefault("name", Path(path).stem)
            evals.append(ForgeEval.model_validate(doc))
        elif isinstance(doc, dict) and doc.get("kind") == "ForgeTraining":
            ft = ForgeTraining.model_validate(doc)
            trainings[ft.metadata.name] = ft
    if not evals:
        raise ValueError(f"{path}: no ForgeEval in the file")
    return evals[0], trainings


def _training_output(ref: str | None, trainings: dict[str, ForgeTraining], field: str) -> StorageLocation | None:
    if ref is None:
        return None
    if ref not in trainings:
        raise TranslationError(f"{field}.trainingRef: no ForgeTraining {ref} in the file (forge eval reads the model "
                               f"from its spec.output; or set {field}.checkpoint)")
    return trainings[ref].spec.output.location


def local_eval_config(path: str, volumes: list[str]):
    mounts = parse_volumes(volumes)
    fe, trainings = load_eval(path)

    def resolve(loc: PvcLocation) -> str:
        root = mounts.get(loc.claim_name, Path("volumes", loc.claim_name).resolve())
        return str(root / loc.path.strip("/")) if loc.path.strip("/") else str(root)

    s = fe.spec
    model = model_location(s.model, "spec.model", _training_output(s.model.training_ref, trainings, "spec.model"))
    baseline = (model_location(s.baseline, "spec.baseline", _training_output(s.baseline.training_ref, trainings, "spec.baseline"))
                if s.baseline else None)
    config = eval_config(fe, model, baseline, resolve,
                         config_map=lambda name: str(mounts.get(name, Path("volumes", name).resolve())),
                         scratch_dir=str(LOCAL_SCRATCH.resolve()))
    return fe, config.model_copy(update={"device": "auto"})


class SuiteBar:
    """A tqdm bar per suite and model: items scored."""

    def __init__(self) -> None:
        self.bar = None
        self.key: tuple[str, str] | None = None

    def __call__(self, suite: str, who: str, done: int) -> None:
        from tqdm import tqdm

        if self.key != (suite, who):
            self.close()
            self.key = (suite, who)
            self.bar = tqdm(desc=f"{suite} ({who})", unit="item", dynamic_ncols=True, file=sys.stderr, leave=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_table(message: EvalTerminationMessage) -> str:
    rows = [("suite", "metric", "model", "baseline", "difference")]
    for s in message.suites or []:
        for metric, value in s.metrics.items():
            b = (s.baseline or {}).get(metric)
            rows.append((s.suite, metric, f"{value:.4f}", "" if b is None else f"{b:.4f}",
                         "" if b is None else f"{value - b:+.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    for g in message.gates or []:
        lines.append(f"gate {'PASSED' if g.passed else 'FAILED'}: {g.message}")
    return "\n".join(lines)


def eval_local(path: str, volumes: list[str]) -> int:
    try:
        fe, config = local_eval_config(path, volumes)
    except (ValidationError, TranslationError, ValueError, OSError) as err:
        print(f"forge: {path}: {format_error(err)}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR

    from forge_trainer.contract import TrainerError
    from forge_trainer.eval.run import evaluate

    print(f"forge: evaluating {config.model_path}" + (f" against {config.baseline_path}" if config.baseline_path else ""),
          file=sys.stderr)
    bar = SuiteBar()
    try:
        message = evaluate(config, on_progress=bar)
    except TrainerError as err:
        bar.close()
        print(f"forge: {err}", file=sys.stderr)
        return err.exit_code
    bar.close()
    print(format_table(message))
    print(f"results: {message.results} (report.md beside it)")
    return GATE_FAILED if message.gates_passed is False else ExitCode.OK
