"""Manifests the API tests share: the examples, minimal valid bases, and one-mutation cases.

Every case starts from a fresh copy of a valid base manifest and changes one
thing. BAD_CASES must be rejected, naming ``field`` in the API server's
message together with ``phrase``; GOOD_CASES must be accepted, and most of
them leave out a field whose default a validation rule depends on, which is
where the API server (no defaulting) and pydantic (defaults filled in) can
disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from forge_operator.api import ForgeEval, ForgeTraining

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = ROOT / "examples"
MODELS = {"ForgeTraining": ForgeTraining, "ForgeEval": ForgeEval}


def example_paths() -> list[Path]:
    """The examples of Forge's own kinds; files of other kinds only (the claims and the data Job of
    examples/quickstart-data.yaml) are what an example needs, not examples of the API."""
    return sorted(p for p in EXAMPLES_DIR.glob("*.yaml")
                  if any(d and d.get("apiVersion", "").startswith("forge.dev/") for d in yaml.safe_load_all(p.read_text())))


def load_example(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path.name}: one manifest per example"
    return docs[0]


def validate(manifest: dict[str, Any]):
    """Validate with the pydantic model of the manifest's kind (raises pydantic.ValidationError)."""
    return MODELS[manifest["kind"]].model_validate(manifest)


# --------------------------------------------------------------------------- bases
def _pvc(claim: str, path: str | None = None) -> dict[str, Any]:
    return {"pvc": {"claimName": claim, **({"path": path} if path is not None else {})}}


def pretrain() -> dict[str, Any]:
    """The smallest valid pretraining: every field with a default left out."""
    return {
        "apiVersion": "forge.dev/v1alpha1", "kind": "ForgeTraining", "metadata": {"name": "base"},
        "spec": {
            "method": "pretrain",
            "model": {"architecture": {"numLayers": 2, "hiddenSize": 64, "numAttentionHeads": 4}},
            "tokenizer": {"train": {}},
            "data": {"sources": [{"name": "web", "location": _pvc("corpus")}]},
            "training": {"budget": {"maxSteps": 100}},
            "checkpoint": {"location": _pvc("checkpoints")},
            "output": {"location": _pvc("models", "run-1")},
        },
    }


def finetune(method: str = "sft") -> dict[str, Any]:
    """A minimal training from a base checkpoint, with data fields that suit ``method``."""
    m = pretrain()
    source = {"name": "pairs", "location": _pvc("pairs"), "format": "jsonl"}
    if method == "sft":
        source |= {"promptField": "prompt", "completionField": "response"}
    if method == "dpo":
        source |= {"promptField": "prompt", "chosenField": "chosen", "rejectedField": "rejected"}
    m["spec"] |= {"method": method, "model": {"base": _pvc("models", "base")}, "tokenizer": {"fromBase": True},
                  "data": {"sources": [source]}}
    return m


def sft() -> dict[str, Any]:
    return finetune("sft")


def dpo() -> dict[str, Any]:
    return finetune("dpo")


def grpo(method: str = "grpo") -> dict[str, Any]:
    """A minimal grpo (or online-dpo): prompt records and one built-in reward."""
    m = finetune(method)
    m["spec"]["data"]["sources"][0]["promptField"] = "prompt"
    m["spec"]["rewards"] = [{"name": "format", "regex": {"mustMatch": ["^<answer>"]}}]
    return m


def online_dpo() -> dict[str, Any]:
    return grpo("online-dpo")


def evaluation() -> dict[str, Any]:
    """A minimal ForgeEval: a multiple-choice suite (format left out: jsonl), a perplexity suite, a gate."""
    return {
        "apiVersion": "forge.dev/v1alpha1", "kind": "ForgeEval", "metadata": {"name": "base"},
        "spec": {
            "model": {"trainingRef": "my-training"},
            "suites": [
                {"name": "mc", "type": "multiple-choice", "data": _pvc("eval", "mc")},
                {"name": "heldout", "type": "perplexity", "data": _pvc("eval", "heldout"), "format": "text"},
            ],
            "gates": [{"metric": "heldout.perplexity", "comparator": "<", "threshold": 30}],
        },
    }


def with_evaluation() -> dict[str, Any]:
    """A pretraining that evaluates and gates its final model."""
    m = pretrain()
    m["spec"]["evaluation"] = {
        "suites": [{"name": "heldout", "type": "perplexity", "data": _pvc("eval"), "format": "text"}],
        "gates": [{"metric": "heldout.loss", "comparator": "<=", "threshold": 3.5}],
    }
    return m


# --------------------------------------------------------------------------- mutations
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _walk(obj: Any, path: str) -> tuple[Any, str | int]:
    keys: list[str | int] = [int(i) if i else k for k, i in _STEP.findall(path)]
    for key in keys[:-1]:
        obj = obj[key]
    return obj, keys[-1]


def put(path: str, value: Any) -> Callable[[dict], None]:
    """Set ``path`` (dotted, with [i] list indexes) to ``value``."""
    def mutate(m: dict) -> None:
        parent, key = _walk(m, path)
        parent[key] = value
    return mutate


def drop(path: str) -> Callable[[dict], None]:
    def mutate(m: dict) -> None:
        parent, key = _walk(m, path)
        del parent[key]
    return mutate


def chain(*steps: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(m: dict) -> None:
        for step in steps:
            step(m)
    return mutate


def _keep(m: dict) -> None:
    pass


@dataclass(frozen=True)
class Case:
    id: str
    """Also the object's name, so a case that is wrongly accepted can be found."""
    base: Callable[[], dict[str, Any]]
    mutate: Callable[[dict], None] = _keep
    field: str = ""
    """Field path the API server's error names (metadata.name, spec.x.y, spec.list[0].z)."""
    phrase: str = ""
    """Key phrase of that error."""

    def manifest(self) -> dict[str, Any]:
        m = self.base()
        m["metadata"]["name"] = self.id
        self.mutate(m)
        return m


ARCH = "spec.model.architecture"
SRC0 = "spec.data.sources[0]"
MOE = {"numExperts": 8, "numExpertsPerToken": 2}
EXPERTS = f"{ARCH}.experts"
S3 = "spec.data.sources[0].location.s3"

BAD_CASES: tuple[Case, ...] = (
    # --- schema: enums, ranges, patterns, required and unknown fields
    Case("method-not-an-enum", pretrain, put("spec.method", "rlhf"), "spec.method", "Unsupported value"),
    Case("family-not-an-enum", pretrain, put(f"{ARCH}.family", "sparse"), f"{ARCH}.family", "Unsupported value"),
    Case("schedule-not-an-enum", pretrain, put("spec.training.schedule", "linear"),
         "spec.training.schedule", "Unsupported value"),
    Case("data-format-not-an-enum", pretrain, put(f"{SRC0}.format", "csv"), f"{SRC0}.format", "Unsupported value"),
    Case("activation-checkpointing-not-an-enum", pretrain, put("spec.training.activationCheckpointing", "layer"),
         "spec.training.activationCheckpointing", "Unsupported value"),
    Case("learning-rate-above-1", pretrain, put("spec.training.learningRate", 2),
         "spec.training.learningRate", "less than or equal to 1"),
    Case("learning-rate-zero", pretrain, put("spec.training.learningRate", 0),
         "spec.training.learningRate", "greater than 0"),
    Case("pod-template-label-of-the-operator", pretrain,
         put("spec.podTemplate", {"metadata": {"labels": {"forge.dev/attempt": "7"}}}),
         "spec.podTemplate.metadata.labels", "are the operator's"),
    Case("pod-template-managed-by-annotation", pretrain,
         put("spec.podTemplate", {"metadata": {"annotations": {"app.kubernetes.io/managed-by": "me"}}}),
         "spec.podTemplate.metadata.annotations", "are the operator's"),
    Case("pod-template-extended-cpu", pretrain, put("spec.podTemplate", {"extendedResources": {"cpu": "4"}}),
         "spec.podTemplate.extendedResources", "resources.cpu"),
    Case("pod-template-extended-gpu", pretrain,
         put("spec.podTemplate", {"extendedResources": {"nvidia.com/gpu": 8}}),
         "spec.podTemplate.extendedResources", "resources.gpusPerNode"),
    Case("pod-template-extended-not-a-quantity", pretrain,
         put("spec.podTemplate", {"extendedResources": {"rdma/hca": "many"}}),
         "spec.podTemplate.extendedResources.rdma/hca", "should match"),
    Case("pod-template-env-of-torchrun", pretrain,
         put("spec.podTemplate", {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "MASTER_ADDR", "value": "x"}]}),
         "spec.podTemplate.env", "are set by the operator, torchrun or the Job controller"),
    Case("resources-env-of-the-operator", pretrain, put("spec.resources", {"env": [{"name": "FORGE_RESTART_COUNT"}]}),
         "spec.resources.env", "names starting with FORGE_"),
    Case("pod-template-and-resources-node-selector", pretrain, chain(
        put("spec.podTemplate", {"nodeSelector": {"pool": "a"}}), put("spec.resources", {"nodeSelector": {"pool": "b"}})),
         "spec.podTemplate.nodeSelector", "set podTemplate.nodeSelector or resources.nodeSelector, not both"),
    Case("pod-template-and-resources-env", pretrain, chain(
        put("spec.podTemplate", {"env": [{"name": "A"}]}), put("spec.resources", {"env": [{"name": "B"}]})),
         "spec.podTemplate.env", "not both"),
    Case("residency-empty", pretrain, put("spec.residency", {}), "spec.residency", "regions, zones or both"),
    Case("residency-no-regions", pretrain, put("spec.residency", {"regions": []}),
         "spec.residency.regions", "at least 1"),
    Case("residency-region-not-a-label-value", pretrain, put("spec.residency", {"regions": ["eu west"]}),
         "spec.residency.regions[0]", "should match"),
    Case("num-nodes-negative", pretrain, put("spec.resources", {"numNodes": -1}),
         "spec.resources.numNodes", "greater than or equal to 1"),
    Case("gpus-per-node-17", pretrain, put("spec.resources", {"gpusPerNode": 17}),
         "spec.resources.gpusPerNode", "less than or equal to 16"),
    Case("memory-not-a-quantity", pretrain, put("spec.resources", {"memory": "lots"}),
         "spec.resources.memory", "should match"),
    Case("num-nodes-as-string", pretrain, put("spec.resources", {"numNodes": "4"}),
         "spec.resources.numNodes", "integer"),
    Case("grace-period-below-30", pretrain, put("spec.resources", {"terminationGracePeriodSeconds": 5}),
         "spec.resources.terminationGracePeriodSeconds", "greater than or equal to 30"),
    Case("validation-fraction-half", pretrain, put("spec.data.validation", {"fraction": 0.5}),
         "spec.data.validation.fraction", "less than 0.5"),
    Case("vocab-size-too-small", pretrain, put("spec.tokenizer.train", {"vocabSize": 100}),
         "spec.tokenizer.train.vocabSize", "greater than or equal to 260"),
    Case("exit-code-300", pretrain, put("spec.failurePolicy", {"nonRetryableExitCodes": [1, 300]}),
         "spec.failurePolicy.nonRetryableExitCodes[1]", "less than or equal to 255"),
    Case("no-sources", pretrain, put("spec.data.sources", []), "spec.data.sources", "at least 1 items"),
    Case("file-mode-above-0777", pretrain, put("spec.output.fileMode", 0o1777),
         "spec.output.fileMode", "less than or equal to 511"),
    Case("retain-after-success-not-an-enum", pretrain, put("spec.checkpoint.retainAfterSuccess", "First"),
         "spec.checkpoint.retainAfterSuccess", "Unsupported value"),
    Case("signing-key-secret-without-a-name", pretrain, put("spec.provenance", {"signingKeySecret": {"key": "k.pem"}}),
         "spec.provenance.signingKeySecret.name", "Required value"),
    Case("signing-key-with-a-slash", pretrain,
         put("spec.provenance", {"signingKeySecret": {"name": "keys", "key": "a/b.pem"}}),
         "spec.provenance.signingKeySecret.key", "should match"),
    Case("missing-method", pretrain, drop("spec.method"), "spec.method", "Required value"),
    Case("missing-budget", pretrain, drop("spec.training.budget"), "spec.training.budget", "Required value"),
    Case("missing-checkpoint", pretrain, drop("spec.checkpoint"), "spec.checkpoint", "Required value"),
    Case("missing-hidden-size", pretrain, drop(f"{ARCH}.hiddenSize"), f"{ARCH}.hiddenSize", "Required value"),
    Case("unknown-training-field", pretrain, put("spec.training.epochs", 3),
         "spec.training.epochs", "unknown field"),
    Case("unknown-spec-field", pretrain, put("spec.replicas", 4), "spec.replicas", "unknown field"),
    Case("source-name-not-a-label", pretrain, put(f"{SRC0}.name", "Web_Text"), f"{SRC0}.name", "should match"),
    Case("bad-claim-name", pretrain, put("spec.output.location.pvc.claimName", "Models!"),
         "spec.output.location.pvc.claimName", "should match"),
    Case("name-with-a-dot", pretrain, put("metadata.name", "llama-3.1-8b"), "metadata.name",
         "start with a letter"),
    Case("name-starting-with-a-digit", pretrain, put("metadata.name", "7b-pretrain"), "metadata.name",
         "start with a letter"),
    Case("output-above-the-checkpoints", pretrain,
         chain(put("spec.checkpoint.location", {"pvc": {"claimName": "models", "path": "run-1/checkpoints/"}}),
               put("spec.output.location", {"pvc": {"claimName": "models", "path": "run-1"}})),
         "spec.output.location.pvc.path", "checkpoints would go with it"),
    Case("path-with-a-dot-segment", pretrain, put("spec.output.location.pvc.path", "./run-1"),
         "spec.output.location.pvc.path", "without '..', '.' or empty segments"),
    Case("path-with-an-empty-segment", pretrain, put("spec.checkpoint.location", {"pvc": {"claimName": "c",
                                                                                         "path": "a//b"}}),
         "spec.checkpoint.location.pvc.path", "without '..', '.' or empty segments"),
    Case("output-is-the-checkpoint-folder", pretrain,
         put("spec.checkpoint.location", {"pvc": {"claimName": "models", "path": "run-1"}}),
         "spec.output.location.pvc.path", "checkpoints would go with it"),
    Case("stall-timeout-of-30-seconds", pretrain, put("spec.failurePolicy", {"stallTimeoutSeconds": 30}),
         "spec.failurePolicy.stallTimeoutSeconds", "0 (never) or at least 60"),
    Case("output-at-volume-root", pretrain, put("spec.output.location.pvc.path", "/"),
         "spec.output.location.pvc.path", "not the volume root"),
    Case("output-without-path", pretrain, drop("spec.output.location.pvc.path"),
         "spec.output.location.pvc.path", "not the volume root"),
    Case("vocabulary-of-bytes-only", pretrain, put("spec.tokenizer.train", {"vocabSize": 259}),
         "spec.tokenizer.train.vocabSize", "greater than or equal to 260"),
    Case("bad-queue-name", pretrain, put("spec.scheduling", {"queueName": "Team A"}),
         "spec.scheduling.queueName", "should match"),
    Case("bad-s3-uri", pretrain, put(f"{SRC0}.location", {"s3": {"uri": "https://bucket/prefix"}}),
         f"{S3}.uri", "should match"),
    Case("bad-s3-endpoint", pretrain, put(f"{SRC0}.location", {"s3": {"uri": "s3://bucket", "endpoint": "minio:9000"}}),
         f"{S3}.endpoint", "should match"),
    Case("bad-secret-name", pretrain,
         put(f"{SRC0}.location", {"s3": {"uri": "s3://bucket", "secretRef": {"name": "MinIO"}}}),
         f"{S3}.secretRef.name", "should match"),
    Case("deadline-not-a-time", pretrain, put("spec.training.budget.deadline", "next friday"),
         "spec.training.budget.deadline", "date-time"),
    Case("name-longer-than-40", pretrain, put("metadata.name", "a-training-name-that-is-41-characters-xyz"),
         "metadata.name", "at most 40 characters"),
    # --- model
    Case("architecture-and-base", pretrain, put("spec.model.base", _pvc("models", "base")),
         "spec.model", "set exactly one of architecture or base"),
    Case("neither-architecture-nor-base", pretrain, put("spec.model", {}),
         "spec.model", "set exactly one of architecture or base"),
    Case("moe-without-experts", pretrain, put(f"{ARCH}.family", "moe"), EXPERTS, "experts is required"),
    Case("dense-with-experts", pretrain, chain(put(f"{ARCH}.family", "dense"), put(EXPERTS, MOE)),
         EXPERTS, "forbidden when family is dense"),
    Case("experts-with-default-family", pretrain, put(EXPERTS, MOE), EXPERTS, "forbidden when family is dense"),
    Case("fewer-experts-than-top-k", pretrain,
         chain(put(f"{ARCH}.family", "moe"), put(EXPERTS, {"numExperts": 4, "numExpertsPerToken": 8})),
         f"{EXPERTS}.numExpertsPerToken", "numExperts must be >= numExpertsPerToken"),
    Case("one-expert", pretrain,
         chain(put(f"{ARCH}.family", "moe"), put(EXPERTS, {"numExperts": 1, "numExpertsPerToken": 1})),
         f"{EXPERTS}.numExperts", "greater than or equal to 2"),
    Case("hidden-not-divisible-by-heads", pretrain, put(f"{ARCH}.hiddenSize", 66),
         f"{ARCH}.hiddenSize", "divisible by numAttentionHeads"),
    Case("heads-not-divisible-by-kv-heads", pretrain, put(f"{ARCH}.numKeyValueHeads", 3),
         f"{ARCH}.numKeyValueHeads", "divisible by numKeyValueHeads"),
    # --- method against model and data
    Case("pretrain-with-base", pretrain,
         chain(drop("spec.model.architecture"), put("spec.model.base", _pvc("models", "base"))),
         "spec.model", "method pretrain needs model.architecture"),
    Case("continued-pretrain-without-base", pretrain, put("spec.method", "continued-pretrain"),
         "spec.model", "need model.base"),
    Case("sft-without-base", sft, put("spec.model", {"architecture": {"numLayers": 2, "hiddenSize": 64,
                                                                       "numAttentionHeads": 4}}),
         "spec.model", "need model.base"),
    Case("dpo-without-preference-fields", sft, put("spec.method", "dpo"),
         "spec.data.sources", "method dpo needs preference data"),
    Case("dpo-on-text-data", dpo, put(f"{SRC0}.format", "text"),
         "spec.data.sources", "method dpo needs preference data"),
    Case("sft-without-completion-field", sft, drop(f"{SRC0}.completionField"),
         "spec.data.sources", "method sft needs instruction data"),
    Case("sft-on-default-text-format", sft, drop(f"{SRC0}.format"),
         "spec.data.sources", "method sft needs instruction data"),
    Case("sft-chat-and-prompt-fields", sft, put(f"{SRC0}.messagesField", "messages"),
         "spec.data.sources", "promptField and completionField, or messagesField alone"),
    Case("sft-chat-with-prompt-field", sft, chain(drop(f"{SRC0}.completionField"), put(f"{SRC0}.messagesField", "m")),
         "spec.data.sources", "method sft needs instruction data"),
    Case("sft-chat-on-text-format", sft,
         chain(drop(f"{SRC0}.promptField"), drop(f"{SRC0}.completionField"), put(f"{SRC0}.messagesField", "m"),
               put(f"{SRC0}.format", "text")),
         "spec.data.sources", "method sft needs instruction data"),
    Case("sft-with-a-trained-tokenizer", sft, put("spec.tokenizer", {"train": {}}),
         "spec.tokenizer", "methods sft, dpo, grpo and online-dpo fine-tune model.base with its own tokenizer"),
    Case("dpo-with-a-trained-tokenizer", dpo, put("spec.tokenizer", {"train": {}}),
         "spec.tokenizer", "methods sft, dpo, grpo and online-dpo fine-tune model.base with its own tokenizer"),
    Case("dpo-with-a-messages-field", dpo, put(f"{SRC0}.messagesField", "messages"),
         "spec.data.sources", "no completionField or messagesField"),
    Case("sft-with-a-chosen-field", sft, put(f"{SRC0}.chosenField", "chosen"),
         "spec.data.sources", "no chosenField or rejectedField"),
    Case("dpo-loss-type-on-sft", sft, put("spec.training.dpoLossType", "ipo"),
         "spec.training.dpoLossType", "only for methods dpo and online-dpo"),
    Case("dpo-loss-type-unknown", dpo, put("spec.training.dpoLossType", "hinge"),
         "spec.training.dpoLossType", "sigmoid"),
    Case("sft-validation-source-of-documents", sft,
         put("spec.data.validation", {"source": {"name": "held", "location": _pvc("held")}}),
         "spec.data.validation.source", "the validation source jsonl or parquet with promptField and completionField"),
    Case("dpo-validation-source-without-rejected", dpo,
         put("spec.data.validation", {"source": {"name": "held", "location": _pvc("held"), "format": "jsonl",
                                                 "promptField": "p", "chosenField": "c"}}),
         "spec.data.validation.source", "promptField, chosenField and rejectedField"),
    Case("dpo-beta-on-sft", sft, put("spec.training.dpoBeta", 0.1),
         "spec.training.dpoBeta", "only for methods dpo and online-dpo"),
    Case("dpo-beta-zero", dpo, put("spec.training.dpoBeta", 0), "spec.training.dpoBeta", "greater than 0"),
    Case("sharding-not-an-enum", pretrain, put("spec.training.sharding", "FULL_SHARD"),
         "spec.training.sharding", "Unsupported value"),
    Case("hybrid-shard-on-one-node", pretrain, put("spec.training.sharding", "HybridShard"),
         "spec.training.sharding", "needs resources.numNodes of 2 or more"),
    Case("hybrid-shard-on-one-node-said", pretrain, chain(put("spec.training.sharding", "HybridShard"),
                                                          put("spec.resources", {"numNodes": 1})),
         "spec.training.sharding", "on one node use FullShard"),
    Case("document-masking-on-sft", sft, put("spec.training.documentMasking", True),
         "spec.training.documentMasking", "only for methods pretrain and continued-pretrain"),
    Case("document-masking-on-grpo", grpo, put("spec.training.documentMasking", True),
         "spec.training.documentMasking", "never attend across examples"),
    Case("precision-not-an-enum", pretrain, put("spec.training.precision", "fp4"),
         "spec.training.precision", "Unsupported value"),
    Case("fp8-hidden-size-not-a-multiple-of-16", pretrain,
         chain(put("spec.training.precision", "fp8"), put(f"{ARCH}.hiddenSize", 72)),
         "spec.training.precision", "training.precision fp8 needs the widths of the transformer blocks' linear layers"),
    Case("fp8-key-value-width-not-a-multiple-of-16", pretrain,
         chain(put("spec.training.precision", "fp8"), put(f"{ARCH}.numAttentionHeads", 8),
               put(f"{ARCH}.numKeyValueHeads", 1)),
         "spec.training.precision", "key/value width (key/value heads x hidden size / attention heads)"),
    Case("fp8-dense-mlp-width-not-a-multiple-of-16", pretrain,
         chain(put("spec.training.precision", "fp8"), put(f"{ARCH}.intermediateSize", 200)),
         "spec.training.precision", "for dense models, the MLP's width"),
    Case("fp8-with-lora", sft, chain(put("spec.training.precision", "fp8"), put("spec.training.lora", {"r": 8})),
         "spec.training.precision", "training.precision fp8 does not combine with training.lora"),
    Case("lora-on-pretrain", pretrain, put("spec.training.lora", {"r": 8}),
         "spec.training.lora", "training.lora is only for methods sft and dpo"),
    Case("lora-on-continued-pretrain", finetune, lambda m: m["spec"].update(
        method="continued-pretrain", data={"sources": [{"name": "web", "location": _pvc("corpus")}]},
        training={"budget": {"maxSteps": 100}, "lora": {}}), "spec.training.lora", "only for methods sft and dpo"),
    Case("lora-rank-zero", sft, put("spec.training.lora", {"r": 0}),
         "spec.training.lora.r", "greater than or equal to 1"),
    Case("lora-dropout-one", dpo, put("spec.training.lora", {"dropout": 1}),
         "spec.training.lora.dropout", "less than 1"),
    Case("lora-unknown-export", sft, put("spec.training.lora", {"export": "gguf"}),
         "spec.training.lora.export", "merged"),
    Case("lora-no-target-modules", sft, put("spec.training.lora", {"targetModules": []}),
         "spec.training.lora.targetModules", "at least 1"),
    # --- grpo, online-dpo and their rewards
    Case("grpo-without-rewards", grpo, drop("spec.rewards"), "spec.rewards", "methods grpo and online-dpo need rewards"),
    Case("grpo-with-no-rewards", grpo, put("spec.rewards", []), "spec.rewards", "methods grpo and online-dpo need rewards"),
    Case("rewards-on-sft", sft, put("spec.rewards", [{"name": "r", "length": {"maxChars": 9}}]),
         "spec.rewards", "the other methods take none"),
    Case("grpo-with-a-completion-field", grpo, put(f"{SRC0}.completionField", "response"),
         "spec.data.sources", "method grpo needs prompt records"),
    Case("online-dpo-on-text", online_dpo, put(f"{SRC0}.format", "text"),
         "spec.data.sources", "method online-dpo needs prompt records"),
    Case("reward-of-two-kinds", grpo, put("spec.rewards[0].length", {"maxChars": 9}),
         "spec.rewards[0]", "set exactly one of python, exactMatch, regex, jsonSchema, length or http"),
    Case("reward-of-no-kind", grpo, put("spec.rewards[0]", {"name": "r"}),
         "spec.rewards[0]", "set exactly one of python, exactMatch, regex, jsonSchema, length or http"),
    Case("reward-names-twice", grpo, lambda m: m["spec"]["rewards"].append({"name": "format", "length": {"maxChars": 9}}),
         "spec.rewards", "reward names must be unique"),
    Case("python-reward-in-two-places", grpo,
         put("spec.rewards[0]", {"name": "r", "python": {"configMap": {"name": "cm", "key": "r.py"},
                                                         "pvc": {"claimName": "d", "path": "r.py"}, "function": "f"}}),
         "spec.rewards[0].python", "set exactly one of configMap or pvc"),
    Case("python-reward-not-a-py-key", grpo,
         put("spec.rewards[0]", {"name": "r", "python": {"configMap": {"name": "cm", "key": "r.txt"}, "function": "f"}}),
         "spec.rewards[0].python.configMap.key", "should match"),
    Case("http-reward-without-scheme", grpo, put("spec.rewards[0]", {"name": "r", "http": {"url": "scorer:80"}}),
         "spec.rewards[0].http.url", "should match"),
    Case("grpo-settings-on-online-dpo", online_dpo, put("spec.training.grpo", {"beta": 0.1}),
         "spec.training.grpo", "training.grpo is only for method grpo"),
    Case("sampling-on-dpo", dpo, put("spec.training.sampling", {"groupSize": 4}),
         "spec.training.sampling", "only for methods grpo and online-dpo"),
    Case("group-of-one", grpo, put("spec.training.sampling", {"groupSize": 1}),
         "spec.training.sampling.groupSize", "greater than or equal to 2"),
    # --- tokenizer
    Case("from-base-without-base", pretrain, put("spec.tokenizer", {"fromBase": True}),
         "spec.tokenizer", "tokenizer.fromBase needs model.base"),
    Case("two-tokenizer-choices", pretrain, put("spec.tokenizer.source", _pvc("tokenizers", "bpe")),
         "spec.tokenizer", "set exactly one of train, fromBase or source"),
    Case("no-tokenizer-choice", sft, put("spec.tokenizer", {"fromBase": False}),
         "spec.tokenizer", "set exactly one of train, fromBase or source"),
    # --- data and storage
    Case("duplicate-source-names", pretrain,
         put("spec.data.sources", [{"name": "web", "location": _pvc("a")}, {"name": "web", "location": _pvc("b")}]),
         "spec.data.sources", "source names must be unique"),
    Case("validation-fraction-and-source", pretrain,
         put("spec.data.validation", {"fraction": 0.01, "source": {"name": "val", "location": _pvc("val")}}),
         "spec.data.validation", "set exactly one of fraction or source"),
    Case("validation-neither", pretrain, put("spec.data.validation", {}),
         "spec.data.validation", "set exactly one of fraction or source"),
    Case("pvc-path-with-dotdot", pretrain, put(f"{SRC0}.location.pvc.path", "web/../../etc"),
         f"{SRC0}.location.pvc.path", "without '..'"),
    Case("absolute-pvc-path", pretrain, put("spec.checkpoint.location.pvc.path", "/ckpt"),
         "spec.checkpoint.location.pvc.path", "relative to the volume root"),
    Case("storage-pvc-and-s3", pretrain, put(f"{SRC0}.location.s3", {"uri": "s3://bucket/web"}),
         f"{SRC0}.location", "set exactly one of pvc or s3"),
    Case("storage-neither", sft, put("spec.model.base", {}), "spec.model.base", "set exactly one of pvc or s3"),
    Case("output-at-bucket-root", pretrain, put("spec.output.location", {"s3": {"uri": "s3://models/"}}),
         "spec.output.location.s3.uri", "not the bucket's root"),
    Case("output-prefix-above-the-checkpoints", pretrain,
         chain(put("spec.checkpoint.location", {"s3": {"uri": "s3://runs/a/ckpt"}}),
               put("spec.output.location", {"s3": {"uri": "s3://runs/a/"}})),
         "spec.output.location.s3.uri", "checkpoints would go with them"),
    Case("s3-endpoint-with-a-path", pretrain,
         put(f"{SRC0}.location", {"s3": {"uri": "s3://bucket", "endpoint": "http://store:9000/s3"}}),
         f"{S3}.endpoint", "should match"),
    # --- training
    Case("sequence-longer-than-context", pretrain,
         chain(put(f"{ARCH}.contextLength", 2048), put("spec.training.sequenceLength", 4096)),
         "spec.training.sequenceLength", "must not exceed model.architecture.contextLength"),
    Case("sequence-longer-than-default-context", pretrain, put("spec.training.sequenceLength", 8192),
         "spec.training.sequenceLength", "must not exceed model.architecture.contextLength"),
    Case("default-sequence-longer-than-context", pretrain, put(f"{ARCH}.contextLength", 1024),
         "spec.training.sequenceLength", "must not exceed model.architecture.contextLength"),
    Case("global-batch-both", pretrain, put("spec.training.globalBatch", {"sequences": 8, "tokens": 8192}),
         "spec.training.globalBatch", "set exactly one of sequences or tokens"),
    Case("global-batch-neither", pretrain, put("spec.training.globalBatch", {}),
         "spec.training.globalBatch", "set exactly one of sequences or tokens"),
    Case("budget-without-steps-or-tokens", pretrain, put("spec.training.budget", {"maxGpuHours": 100}),
         "spec.training.budget", "set maxSteps or maxTokens"),
    Case("min-lr-above-lr", pretrain,
         chain(put("spec.training.learningRate", 1e-4), put("spec.training.minLearningRate", 2e-4)),
         "spec.training.minLearningRate", "minLearningRate must be <= learningRate"),
    Case("min-lr-above-default-lr", pretrain, put("spec.training.minLearningRate", 5e-4),
         "spec.training.minLearningRate", "minLearningRate must be <= learningRate"),
    # --- evaluation inside a training
    Case("training-gate-unknown-suite", with_evaluation,
         put("spec.evaluation.gates[0].metric", "mmlu.acc"),
         "spec.evaluation.gates", "for one of the suites and a metric its type reports"),
    Case("training-duplicate-suites", with_evaluation,
         lambda m: m["spec"]["evaluation"]["suites"].append(dict(m["spec"]["evaluation"]["suites"][0])),
         "spec.evaluation.suites", "suite names must be unique"),
    # --- ForgeEval
    Case("eval-gate-unknown-suite", evaluation, put("spec.gates[0].metric", "mmlu.acc"),
         "spec.gates", "for one of the suites and a metric its type reports"),
    Case("eval-gate-metric-of-another-suite-type", evaluation, put("spec.gates[0].metric", "heldout.acc"),
         "spec.gates", "perplexity: loss, perplexity, bits_per_byte"),
    Case("eval-gate-metric-without-suite", evaluation, put("spec.gates[0].metric", "perplexity"),
         "spec.gates[0].metric", "should match"),
    Case("eval-gate-bad-comparator", evaluation, put("spec.gates[0].comparator", "=="),
         "spec.gates[0].comparator", "Unsupported value"),
    Case("eval-duplicate-suites", evaluation, put("spec.suites[0].name", "heldout"),
         "spec.suites", "suite names must be unique"),
    Case("eval-training-ref-and-checkpoint", evaluation, put("spec.model.checkpoint", _pvc("models", "m")),
         "spec.model", "set exactly one of trainingRef or checkpoint"),
    Case("eval-no-model", evaluation, put("spec.model", {}),
         "spec.model", "set exactly one of trainingRef or checkpoint"),
    Case("eval-multiple-choice-on-text", evaluation, put("spec.suites[0].format", "text"),
         "spec.suites[0].format", "read jsonl or parquet, not text"),
    Case("eval-suite-type-not-an-enum", evaluation, put("spec.suites[1].type", "bleu"),
         "spec.suites[1].type", "Unsupported value"),
    Case("eval-no-suites", evaluation, chain(put("spec.suites", []), drop("spec.gates")),
         "spec.suites", "at least 1 items"),
    Case("eval-gpus-17", evaluation, put("spec.resources", {"gpus": 17}),
         "spec.resources.gpus", "less than or equal to 16"),
    Case("eval-gate-threshold-and-max-drop", evaluation,
         chain(put("spec.baseline", {"trainingRef": "old"}), put("spec.gates[0].maxDrop", 0.5)),
         "spec.gates[0]", "set comparator and threshold (an absolute gate) or maxDrop (a relative gate), not both"),
    Case("eval-gate-comparator-only", evaluation, drop("spec.gates[0].threshold"),
         "spec.gates[0]", "set comparator and threshold (an absolute gate) or maxDrop (a relative gate), not both"),
    Case("eval-max-drop-without-baseline", evaluation, put("spec.gates", [{"metric": "mc.acc", "maxDrop": 0.02}]),
         "spec.gates", "a gate with maxDrop compares with the baseline: set baseline"),
    Case("eval-significance-1", evaluation,
         chain(put("spec.baseline", {"trainingRef": "old"}), put("spec.gates", [{"metric": "mc.acc", "maxDrop": 0.02,
                                                                                "significance": 1}])),
         "spec.gates[0].significance", "less than 1"),
    Case("training-gate-max-drop", with_evaluation, put("spec.evaluation.gates", [{"metric": "heldout.loss", "maxDrop": 0.1}]),
         "spec.evaluation.gates", "a training's evaluation has no baseline to compare with"),
    Case("eval-unknown-field", evaluation, put("spec.suites[0].shots", 5), "spec.suites[0].shots", "unknown field"),
    Case("eval-egress-not-an-enum", evaluation, put("spec.network", {"egress": "Open"}), "spec.network.egress",
         "Unsupported value"),
)

GOOD_CASES: tuple[Case, ...] = (
    Case("minimal-pretrain", pretrain),
    Case("signed-group-readable-last-checkpoint", pretrain,
         chain(put("spec.provenance", {"signingKeySecret": {"name": "model-signing"}}), put("spec.output.fileMode", 0o640),
               put("spec.checkpoint.retainAfterSuccess", "None"))),
    Case("minimal-continued-pretrain", finetune, put("spec.method", "continued-pretrain")),
    Case("minimal-sft", sft),
    Case("hybrid-shard-on-two-nodes", pretrain, chain(put("spec.training.sharding", "HybridShard"),
                                                      put("spec.resources", {"numNodes": 2, "gpusPerNode": 8}))),
    Case("full-shard-said-on-one-node", pretrain, put("spec.training.sharding", "FullShard")),
    Case("masking-in-continued-pretraining", finetune, chain(
        put("spec.method", "continued-pretrain"), put("spec.training.documentMasking", True))),
    Case("document-masking-off-said-on-dpo", dpo, put("spec.training.documentMasking", False)),
    Case("minimal-dpo", dpo),
    Case("fp8-pretrain", pretrain, put("spec.training.precision", "fp8")),
    Case("fp8-grouped-query-attention-said-dense", pretrain, chain(
        put("spec.training.precision", "fp8"), put(f"{ARCH}.family", "dense"), put(f"{ARCH}.numKeyValueHeads", 1),
        put(f"{ARCH}.intermediateSize", 192))),
    # the experts and the router stay in bf16: their widths and the unused dense MLP width do not count
    Case("fp8-moe-with-odd-expert-widths", pretrain, chain(
        put("spec.training.precision", "fp8"), put(f"{ARCH}.family", "moe"), put(f"{ARCH}.intermediateSize", 200),
        put(f"{ARCH}.experts", {"numExperts": 6, "numExpertsPerToken": 2, "expertIntermediateSize": 24}))),
    Case("fp8-sft-on-a-base-model", sft, put("spec.training.precision", "fp8")),  # its widths: checked at start
    Case("data-checkpoints-and-output-on-s3", pretrain, chain(
        put(f"{SRC0}.location", {"s3": {"uri": "s3://corpora/web/", "endpoint": "http://store.storage.svc:9000",
                                        "region": "eu-west-1", "pathStyle": True, "secretRef": {"name": "keys"}}}),
        put("spec.checkpoint.location", {"s3": {"uri": "s3://runs/a/ckpt", "endpoint": "http://store.storage.svc:9000",
                                                "region": "eu-west-1", "pathStyle": True, "secretRef": {"name": "keys"}}}),
        put("spec.output.location", {"s3": {"uri": "s3://runs/a/model", "endpoint": "http://store.storage.svc:9000",
                                            "region": "eu-west-1", "pathStyle": True, "secretRef": {"name": "keys"}}}))),
    Case("dpo-ipo-on-parquet", dpo, chain(put("spec.training.dpoLossType", "ipo"), put("spec.training.dpoBeta", 0.5),
                                          put(f"{SRC0}.format", "parquet"))),
    Case("minimal-grpo", grpo),
    Case("minimal-online-dpo", online_dpo),
    Case("pod-template-every-pod-setting", pretrain, put("spec.podTemplate", {
        "nodeSelector": {"pool": "a"}, "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {}}, "volumes": [{"name": "scratch", "emptyDir": {}}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "60"}],
        "imagePullSecrets": ["registry"]})),
    Case("residency-regions-and-zones", pretrain,
         put("spec.residency", {"regions": ["eu-west-1"], "zones": ["eu-west-1a", "eu-west-1b"]})),
    Case("residency-zones-alone", pretrain, put("spec.residency", {"zones": ["fr-par-2"]})),
    Case("grpo-every-reward-kind", grpo, chain(
        put("spec.rewards", [
            {"name": "py", "python": {"configMap": {"name": "rw", "key": "rewards.py"}, "function": "f"}, "weight": 2},
            {"name": "py-pvc", "python": {"pvc": {"claimName": "data", "path": "rw/r.py"}, "function": "g"}},
            {"name": "exact", "exactMatch": {"column": "answer", "extract": "<a>(.*)</a>"}},
            {"name": "json", "jsonSchema": {"schema": {"type": "object", "required": ["x"]}}},
            {"name": "len", "length": {"minChars": 1, "maxChars": 200}},
            {"name": "svc", "http": {"url": "http://scorer.team.svc:8080/score", "timeoutSeconds": 5, "retries": 1}},
        ]),
        put("spec.training.sampling", {"groupSize": 4, "maxNewTokens": 64, "temperature": 0.7, "topP": 0.9}),
        put("spec.training.grpo", {"beta": 0, "epsilon": 0.1, "scaleRewards": False, "updatesPerGeneration": 2}))),
    Case("online-dpo-with-dpo-settings", online_dpo, chain(put("spec.training.dpoBeta", 0.2),
                                                           put("spec.training.dpoLossType", "ipo"))),
    Case("minimal-eval", evaluation),
    Case("minimal-eval-of-checkpoint", evaluation, put("spec.model", {"checkpoint": _pvc("models", "m")})),
    Case("gated-training", with_evaluation),
    Case("gated-training-exported-to-s3", with_evaluation, put("spec.output.location", {"s3": {"uri": "s3://models/a"}})),
    Case("eval-on-s3-unrestricted", evaluation, chain(
         put("spec.model", {"checkpoint": {"s3": {"uri": "s3://models/m", "endpoint": "http://store:9000",
                                                  "secretRef": {"name": "keys"}}}}),
         put("spec.network", {"egress": "Unrestricted"}))),
    Case("eval-against-a-baseline", evaluation,
         chain(put("spec.baseline", {"checkpoint": _pvc("models", "old")}),
               put("spec.gates", [{"metric": "mc.acc", "maxDrop": 0.02}, {"metric": "heldout.loss", "maxDrop": 0.1,
                                                                           "significance": 0.01}]),
               put("spec.suites[1].seqLen", 512))),
    Case("eval-exact-match-with-stops-and-chat", evaluation, chain(
         put("spec.suites", [{"name": "qa", "type": "exact-match", "data": _pvc("eval", "qa"), "stop": ["\n", "."],
                              "chat": True}]),
         put("spec.gates", [{"metric": "qa.exact_match", "comparator": ">=", "threshold": 0.5}]))),
    Case("sft-on-chat-records", sft,
         chain(drop(f"{SRC0}.promptField"), drop(f"{SRC0}.completionField"), put(f"{SRC0}.messagesField", "messages"))),
    Case("sft-chat-on-parquet", sft,
         chain(drop(f"{SRC0}.promptField"), drop(f"{SRC0}.completionField"), put(f"{SRC0}.messagesField", "messages"),
               put(f"{SRC0}.format", "parquet"))),
    Case("sft-with-validation-records", sft,
         put("spec.data.validation", {"source": {"name": "held", "location": _pvc("held"), "format": "jsonl",
                                                 "promptField": "q", "completionField": "a"}})),
    Case("sequence-equals-default-context", pretrain, put("spec.training.sequenceLength", 4096)),
    Case("default-sequence-within-context", pretrain, put(f"{ARCH}.contextLength", 2048)),
    Case("min-lr-equals-default-lr", pretrain, put("spec.training.minLearningRate", 3e-4)),
    Case("moe-with-experts", pretrain, chain(put(f"{ARCH}.family", "moe"), put(EXPERTS, MOE))),
    Case("explicit-dense", pretrain, put(f"{ARCH}.family", "dense")),
    Case("from-base-false-with-train", pretrain, put("spec.tokenizer", {"train": {}, "fromBase": False})),
    Case("tokenizer-from-source", pretrain, put("spec.tokenizer", {"source": _pvc("tokenizers", "bpe")})),
    Case("s3-without-secret", pretrain, put(f"{SRC0}.location", {"s3": {"uri": "s3://bucket/web"}})),
    Case("int-and-string-quantities", pretrain, put("spec.resources", {"cpu": 32, "memory": "256Gi"})),
    Case("pod-template", pretrain, put("spec.podTemplate", {
        "metadata": {"labels": {"team": "nlp"}, "annotations": {"k8s.v1.cni.cncf.io/networks": "rdma-net"}},
        "securityContext": {"runAsUser": 20000, "supplementalGroups": [3000]},
        "containerSecurityContext": {"capabilities": {"add": ["IPC_LOCK"], "drop": ["ALL"]}},
        "extendedResources": {"rdma/hca_shared_devices_a": 1}})),
    Case("cpu-only", pretrain, put("spec.resources", {"gpusPerNode": 0})),
    Case("name-of-40-characters", pretrain, put("metadata.name", "a-training-name-of-exactly-40-characters")),
)


def all_cases() -> tuple[Case, ...]:
    cases = BAD_CASES + GOOD_CASES
    ids = [c.id for c in cases]
    assert len(set(ids)) == len(ids), "case ids must be unique"
    return cases
