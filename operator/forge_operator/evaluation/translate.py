"""ForgeEval -> EvalConfig: the one translation both the operator and `forge eval` use.

Pure. Where the model is (a checkpoint folder, or the export of the ForgeTraining named by
trainingRef, which the caller has looked up) and where a PVC path is on disk (in the pod, or a
--volume folder) are the caller's: passed in as PvcLocations and ``resolve``. It translates, it does
not default (the defaults are forge_trainer.defaults, shared).
"""

from __future__ import annotations

from typing import Callable

from forge_trainer.contract import DEFAULT_TERMINATION_MESSAGE_PATH
from forge_trainer.eval.config import EvalConfig, GateConfig, SuiteConfig

from ..api.base import PvcLocation
from ..api.eval import EvalGate, EvalSuite, ForgeEval, ModelSourceSpec
from ..api.rewards import config_map_path, reward_config

Resolve = Callable[[PvcLocation], str]
ConfigMapPath = Callable[[str], str]
RESULTS_FOLDER = "evaluations"
"""Results go next to the model: <model folder>/evaluations/<ForgeEval name>/ (results.json, report.md)."""


class TranslationError(ValueError):
    """The spec is valid, but cannot run as it is; the message names the field."""


def model_location(source: ModelSourceSpec, field: str, training_output: PvcLocation | None) -> PvcLocation:
    """The PVC folder of a model: its checkpoint, or the export of the training it names (looked up by the caller)."""
    if source.checkpoint is not None:
        if source.checkpoint.pvc is None:
            raise TranslationError(f"{field}.checkpoint.s3: S3 locations are not supported by the evaluator yet; "
                                   "copy the model to a PersistentVolumeClaim and use pvc")
        return source.checkpoint.pvc
    if training_output is None:
        raise TranslationError(f"{field}.trainingRef: ForgeTraining {source.training_ref} has no exported model")
    return training_output


def _suite(s: EvalSuite, i: int, resolve: Resolve, config_map: ConfigMapPath) -> SuiteConfig:
    if s.data.pvc is None:
        raise TranslationError(f"suites[{s.name}].data.s3: S3 locations are not supported by the evaluator yet; "
                               "copy the files to a PersistentVolumeClaim and use pvc")
    given = {k: v for k, v in dict(include=s.include, text_field=s.text_field, question_field=s.question_field,
                                   choices_field=s.choices_field, answer_field=s.answer_field, max_samples=s.max_samples,
                                   stop=s.stop, seq_len=s.seq_len, prompt_field=s.prompt_field,
                                   temperature=s.temperature).items() if v is not None}
    if s.rewards:
        given["rewards"] = [reward_config(r, f"spec.suites[{i}].rewards[{j}]", resolve, config_map, TranslationError)
                            for j, r in enumerate(s.rewards)]
        given["seed"] = s.seed
    return SuiteConfig(name=s.name, type=s.type, path=resolve(s.data.pvc), format=s.format,
                       max_new_tokens=s.max_new_tokens, chat=s.chat, **given)


def _gate(g: EvalGate) -> GateConfig:
    return GateConfig(metric=g.metric, comparator=g.comparator, threshold=g.threshold, max_drop=g.max_drop,
                      significance=g.significance)


def eval_config(fe: ForgeEval, model: PvcLocation, baseline: PvcLocation | None, resolve: Resolve,
                termination_message_path: str = DEFAULT_TERMINATION_MESSAGE_PATH,
                config_map: ConfigMapPath = config_map_path) -> EvalConfig:
    """``config_map``: the folder of a reward ConfigMap (default: where the evaluation pod mounts it). The
    evaluator runs under the trainer's egress lock (the suites' HTTP reward services allowed)."""
    s = fe.spec
    model_dir = resolve(model)
    return EvalConfig(
        name=fe.metadata.name or "eval", model_path=model_dir, baseline_path=resolve(baseline) if baseline else None,
        suites=[_suite(x, i, resolve, config_map) for i, x in enumerate(s.suites)], gates=[_gate(g) for g in s.gates or []], batch_size=s.batch_size,
        output_dir=f"{model_dir.rstrip('/')}/{RESULTS_FOLDER}/{fe.metadata.name or 'eval'}",
        device="cuda" if s.resources.gpus else "cpu", termination_message_path=termination_message_path,
    )
