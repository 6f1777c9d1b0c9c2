"""A training's evaluation (``spec.evaluation``): once the training has Succeeded, its ForgeEval (a child of
the same name, built from the API's models: the kinds never import each other), whose outcome is mirrored
into ``status.evaluation``; a failed gate fails the training with reason EvaluationGateFailed (the exported
model stays where it is, and status.modelRef with it)."""

from __future__ import annotations

from typing import Any

from ..api.base import API_VERSION, describe_location
from ..api.enums import ConditionType as T, Phase, Reason
from ..api.eval import EvalResourcesSpec, ForgeEvalSpec, ModelSourceSpec
from ..api.training import ForgeTraining
from ..k8s import conditions as C
from ..k8s.objects import Plan, object_meta, owned_by
from .children import labels, owner_reference
from .draft import Draft

EVAL_KIND = "ForgeEval"


def build_evaluation(ft: ForgeTraining) -> dict[str, Any]:
    """The training's ForgeEval: its suites and gates, of its exported model, on one GPU of the kind it
    trained on (none for a CPU training), with its image, node selector, tolerations and network.egress (the
    evaluation reaches the S3 endpoint of the export and of its suites, and the suites' reward services)."""
    ev, r = ft.spec.evaluation, ft.spec.resources
    spec = ForgeEvalSpec(model=ModelSourceSpec(training_ref=ft.metadata.name), suites=ev.suites, gates=ev.gates,
                         resources=EvalResourcesSpec(gpus=min(1, r.gpus_per_node), gpu_resource_name=r.gpu_resource_name,
                                                     node_selector=ft.spec.pod_setting("node_selector"),
                                                     tolerations=ft.spec.pod_setting("tolerations"),
                                                     image=r.image),
                         network=ft.spec.network)
    meta = object_meta(ft.metadata.name, ft.metadata.namespace, labels(ft), owner_reference(ft))
    return {"apiVersion": API_VERSION, "kind": EVAL_KIND, "metadata": meta, "spec": spec.to_dict()}


def evaluate_model(d: Draft, ft: ForgeTraining, obj: dict[str, Any], evaluation: dict[str, Any] | None) -> Plan:
    """For a training with spec.evaluation that Succeeded (or failed a gate): its ForgeEval, and its outcome."""
    gate_failed = (C.find(d.conditions, T.FAILED) or {}).get("reason") == Reason.EVALUATION_GATE_FAILED
    if ft.spec.evaluation is None or not (d.status.get("phase") == Phase.SUCCEEDED or gate_failed):
        return d.plan
    d.plan.apply.append(build_evaluation(ft))
    st = (evaluation.get("status") or {}) if evaluation is not None and owned_by(evaluation, obj) else {}
    gates = C.find(st.get("conditions"), T.GATES_PASSED)
    metrics = {f"{r['suite']}.{k}": v for r in st.get("results") or [] for k, v in (r.get("metrics") or {}).items()}
    summary: dict[str, Any] = {"name": ft.metadata.name, "phase": st.get("phase") or str(Phase.PENDING)}
    if gates is not None:
        summary["gatesPassed"] = gates.get("status") == "True"
    if metrics:
        summary["metrics"] = metrics
    d.status["evaluation"] = summary
    if gates is not None and gates.get("status") == "False" and not gate_failed:
        d.finish(Phase.FAILED, Reason.EVALUATION_GATE_FAILED,
                 f"ForgeEval {ft.metadata.name}: {gates.get('message')}; the exported model stays at "
                 f"{describe_location(ft.spec.output.location)}", warning=True)
    return d.plan
