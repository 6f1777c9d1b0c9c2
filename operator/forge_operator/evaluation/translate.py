"""ForgeEval -> EvalConfig: the one translation both the operator and `forge eval` use.

Pure. Where the model is (a checkpoint folder, or the export of the ForgeTraining named by
trainingRef, which the caller has looked up) and where a PVC path is on disk (in the pod, or a
--volume folder) are the caller's: passed in as StorageLocations and ``resolve``. An S3 location becomes
its s3:// URL, with the evaluation's one ``s3`` setting. It translates, it does not default (the
defaults are forge_trainer.defaults, shared).
"""

from __future__ import annotations

from typing import Callable

from forge_trainer.config import EgressConfig
from forge_trainer.contract import DEFAULT_TERMINATION_MESSAGE_PATH
from forge_trainer.eval.config import EvalConfig, GateConfig, SuiteConfig

from ..api.base import PvcLocation, S3Location, StorageLocation
from ..api.eval import EvalGate, EvalSuite, ForgeEval, ModelSourceSpec
from ..api.names import SCRATCH_MOUNT
from ..api.rewards import config_map_path, reward_config
from ..api.storage import one_s3_setting

Resolve = Callable[[PvcLocation], str]
ConfigMapPath = Callable[[str], str]
RESULTS_FOLDER = "evaluations"
"""Results go next to the model: <model folder>/evaluations/<ForgeEval name>/ (results.json, report.md)."""


class TranslationError(ValueError):
    """The spec is valid, but cannot run as it is; the message names the field."""


def model_location(source: ModelSourceSpec, field: str, training_output: StorageLocation | None) -> StorageLocation:
    """Where a model is: its checkpoint, or the export of the training it names (looked up by the caller)."""
    if source.checkpoint is not None:
        return source.checkpoint
    if training_output is None:
        raise TranslationError(f"{field}.trainingRef: ForgeTraining {source.training_ref} has no exported model")
    return training_output


def _model_field(source: ModelSourceSpec, field: str) -> str:
    """The field that names a model's location: its checkpoint, or the training's output."""
    if source.checkpoint is not None:
        return f"{field}.checkpoint"
    return f"ForgeTraining {source.training_ref}: spec.output.location"


def s3_locations(fe: ForgeEval, model: StorageLocation, baseline: StorageLocation | None) -> dict[str, S3Location]:
    """The evaluation's S3 locations by the field that names them: the model's, the baseline's, the suites'."""
    found: dict[str, StorageLocation | None] = {_model_field(fe.spec.model, "spec.model"): model}
    if fe.spec.baseline is not None:
        found[_model_field(fe.spec.baseline, "spec.baseline")] = baseline
    found |= {f"spec.suites[{i}].data": s.data for i, s in enumerate(fe.spec.suites)}
    return {field: loc.s3 for field, loc in found.items() if loc is not None and loc.s3 is not None}


def _where(location: StorageLocation, resolve: Resolve) -> str:
    """A folder (a PVC path, resolved) or an s3://bucket/prefix URL."""
    return resolve(location.pvc) if location.pvc is not None else location.s3.uri.rstrip("/")


def _suite(s: EvalSuite, i: int, resolve: Resolve, config_map: ConfigMapPath) -> SuiteConfig:
    given = {k: v for k, v in dict(include=s.include, text_field=s.text_field, question_field=s.question_field,
                                   choices_field=s.choices_field, answer_field=s.answer_field, max_samples=s.max_samples,
                                   stop=s.stop, seq_len=s.seq_len, prompt_field=s.prompt_field,
                                   temperature=s.temperature).items() if v is not None}
    if s.rewards:
        given["rewards"] = [reward_config(r, f"spec.suites[{i}].rewards[{j}]", resolve, config_map, TranslationError)
                            for j, r in enumerate(s.rewards)]
        given["seed"] = s.seed
    return SuiteConfig(name=s.name, type=s.type, path=_where(s.data, resolve), format=s.format,
                       max_new_tokens=s.max_new_tokens, chat=s.chat, **given)


def _gate(g: EvalGate) -> GateConfig:
    return GateConfig(metric=g.metric, comparator=g.comparator, threshold=g.threshold, max_drop=g.max_drop,
                      significance=g.significance)


def eval_config(fe: ForgeEval, model: StorageLocation, baseline: StorageLocation | None, resolve: Resolve,
                termination_message_path: str = DEFAULT_TERMINATION_MESSAGE_PATH,
                config_map: ConfigMapPath = config_map_path, scratch_dir: str = SCRATCH_MOUNT) -> EvalConfig:
    """``config_map``: the folder of a reward ConfigMap (default: where the evaluation pod mounts it);
    ``scratch_dir``: the local folder for copies of S3 locations (default: the pod's scratch). With
    network.egress Restricted the evaluator runs under the trainer's egress lock (the suites' HTTP reward
    services and the S3 endpoint allowed)."""
    s = fe.spec
    name = fe.metadata.name or "eval"
    located = s3_locations(fe, model, baseline)
    model_dir = _where(model, resolve)
    output_dir = f"{model_dir.rstrip('/')}/{RESULTS_FOLDER}/{name}"  # beside the model, on its claim or prefix
    fields = {loc.uri.rstrip("/"): field for field, loc in reversed(located.items())}
    if model.s3 is not None:
        fields[output_dir] = _model_field(s.model, "spec.model")
    return EvalConfig(
        name=name, model_path=model_dir, baseline_path=_where(baseline, resolve) if baseline else None,
        suites=[_suite(x, i, resolve, config_map) for i, x in enumerate(s.suites)], gates=[_gate(g) for g in s.gates or []],
        batch_size=s.batch_size, output_dir=output_dir,
        device="cuda" if s.resources.gpus else "cpu", gpus=s.resources.gpus or None,
        termination_message_path=termination_message_path,
        egress=EgressConfig(lock=s.network.egress == "Restricted"),
        **({"s3": one_s3_setting(located, "an evaluation", TranslationError), "scratch_dir": scratch_dir,
            "fields": fields} if located else {}),
    )
