"""The ForgeEval planner: pure; the object and what was observed in, a Plan out.

Pending (waiting for the model's training, or for the evaluation pod) -> Running -> Succeeded (the
pod's termination message holds the results; GatesPassed says whether every gate passed) or Failed
(the evaluator's error). An evaluation runs once: its Job is built when there is none and never
changed; a finished ForgeEval keeps its status."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..api.base import StorageLocation, describe_location, format_error
from ..api.enums import TERMINAL_PHASES, ConditionType as T, Phase, Reason
from ..api.eval import ForgeEval, ModelSourceSpec
from ..k8s import conditions as C
from ..k8s.objects import EventType, Plan
from .children import build_children, pod_path
from .observe import ObservedEval, job_finished, terminated, training_output
from .status import EvalDraft, read_message, record_results
from .translate import TranslationError, eval_config, model_location

WAIT_SECONDS = 30.0  # how often a ForgeEval waiting for its training looks again (besides resyncs)


def plan_eval(obj: dict[str, Any], obs: ObservedEval, image: str) -> Plan:
    d = EvalDraft(obj, obs.now)
    try:
        fe = ForgeEval.model_validate({k: v for k, v in obj.items() if k != "status"})
    except ValidationError as err:
        d.condition(T.INVALID, True, Reason.INVALID_SPEC, format_error(err), EventType.WARNING)
        return d.plan
    d.status["conditions"] = C.remove(d.status.get("conditions"), T.INVALID)
    if d.status["phase"] in TERMINAL_PHASES:
        return d.plan
    if obs.job is None:
        models = _models(d, fe, obs)
        if models is None:
            return d.plan
        try:
            eval_yaml = eval_config(fe, *models, resolve=pod_path).to_yaml()
        except (TranslationError, ValidationError) as err:
            d.condition(T.INVALID, True, Reason.INVALID_SPEC, format_error(err), EventType.WARNING)
            return d.plan
        d.plan.apply = build_children(fe, eval_yaml, *models, image=image, network=obs.network)
        return d.phase(Phase.PENDING, Reason.EVALUATING, f"evaluating {describe_location(models[0])}")
    pod = next(iter(obs.pods), None)
    ended = terminated(pod) if pod is not None else None
    if ended is not None and ended.get("exitCode") == 0:
        message = read_message(ended.get("message"))
        if message is None or message.status != "completed":
            return d.phase(Phase.FAILED, Reason.EVALUATION_FAILED, "the evaluator ended without results in its "
                           f"termination message: {(ended.get('message') or '')[:200]!r}", EventType.WARNING)
        record_results(d, message)
        return d.phase(Phase.SUCCEEDED, Reason.EVALUATION_COMPLETED,
                       f"{len(message.suites or [])} suites evaluated; results in {message.results}", EventType.NORMAL)
    if ended is not None or job_finished(obs.job) == "Failed":
        message = read_message((ended or {}).get("message"))
        why = message.message if message and message.message else (ended or {}).get("message") or "the pod failed"
        code = (ended or {}).get("exitCode")
        return d.phase(Phase.FAILED, Reason.EVALUATION_FAILED, f"exit code {code}: {why}" if code is not None else why,
                       EventType.WARNING)
    if pod is not None and (pod.get("status") or {}).get("phase") == "Running":
        return d.phase(Phase.RUNNING, Reason.EVALUATING, f"pod {pod['metadata']['name']} is evaluating")
    return d.plan


def _models(d: EvalDraft, fe: ForgeEval, obs: ObservedEval) -> tuple[StorageLocation, StorageLocation | None] | None:
    """The model's and the baseline's locations; None (with the phase saying why) while one is not there."""
    out: list[StorageLocation | None] = []
    for field, source in (("spec.model", fe.spec.model), ("spec.baseline", fe.spec.baseline)):
        if source is None:
            out.append(None)
            continue
        output = _training_output(d, field, source, obs)
        if output is False:
            return None
        out.append(model_location(source, field, output or None))
    return out[0], out[1]


def _training_output(d: EvalDraft, field: str, source: ModelSourceSpec, obs: ObservedEval) -> StorageLocation | None | bool:
    """The export of the training ``source`` names (None for a checkpoint); False while there is none yet."""
    if source.training_ref is None:
        return None
    training = obs.trainings.get(source.training_ref)
    phase = ((training or {}).get("status") or {}).get("phase")
    if phase == Phase.SUCCEEDED and (output := training_output(training)) is not None:
        return output
    if phase == Phase.FAILED:
        d.phase(Phase.FAILED, Reason.MODEL_UNAVAILABLE,
                f"{field}.trainingRef: ForgeTraining {source.training_ref} Failed; there is no model to evaluate",
                EventType.WARNING)
        return False
    what = "does not exist" if training is None else f"is {phase or 'Pending'}"
    d.phase(Phase.PENDING, Reason.WAITING_FOR_MODEL,
            f"{field}.trainingRef: ForgeTraining {source.training_ref} {what}; evaluated once it has Succeeded",
            EventType.NORMAL)
    d.plan.requeue_after = WAIT_SECONDS
    return False
