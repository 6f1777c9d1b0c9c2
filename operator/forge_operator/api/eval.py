"""ForgeEval: evaluate a model on the user's own held-out data and task files."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import defaults
from .base import (
    API_VERSION, ApiModel, Cel, Condition, DnsLabel, FreeForm, NetworkSpec, ObjectMeta, Quantity, ShortStr, StorageLocation, Timestamp,
)
from .enums import EVAL_PHASES
from .rewards import RewardSpec

from forge_trainer.eval.config import REWARD_METRIC, SUITE_METRICS, SuiteType

Comparator = Literal["<", "<=", ">", ">="]


GATE_KIND = "set comparator and threshold (an absolute gate) or maxDrop (a relative gate), not both"
BASELINE_NEEDED = "a gate with maxDrop compares with the baseline: set baseline"
NO_BASELINE_IN_TRAINING = ("a training's evaluation has no baseline to compare with: use comparator and threshold "
                           "(maxDrop is for a ForgeEval with spec.baseline)")


class EvalSuite(ApiModel):
    """One evaluation task over a file set.

    perplexity: documents (text files, or jsonl/parquet with textField), each followed by end-of-text,
    scored in windows of seqLen tokens as the trainer's validation is; reports loss, perplexity and
    bits_per_byte.
    multiple-choice: JSONL lines {question, choices: [...], answer: index or text}; scored by the sum of
    log-probs of each choice (acc) and per character of the choice (acc_norm), as lm-evaluation-harness does.
    exact-match: JSONL lines {question, answer: string or list}; greedy decoding cut at the first stop
    sequence, compared after SQuAD's normalisation (case, punctuation, articles, spaces).
    generation: JSONL lines {prompt: string or [{role, content}...], <any other fields>}; the model
    generates a completion (greedy, or sampled at temperature with seed; cut at the first stop
    sequence), scored by the suite's rewards exactly as a ForgeTraining's spec.rewards score GRPO's
    completions (the other fields are the functions' columns); reports reward (the weighted sum, mean
    over the items) and reward_<name> (each function's mean over the items it applies to).
    """

    name: DnsLabel
    """Name of the suite, unique in the list; metrics are reported as <name>.<metric>."""
    type: SuiteType
    """perplexity, multiple-choice, exact-match or generation."""
    data: StorageLocation
    """Where the evaluation files are."""
    format: Literal["text", "jsonl", "parquet"] = defaults.EVAL_FORMAT
    """File format (multiple-choice, exact-match and generation read jsonl or parquet)."""
    include: Annotated[list[ShortStr], Field(max_length=32)] | None = None
    """Glob patterns of files to read (default by format)."""
    text_field: ShortStr | None = None
    """perplexity on jsonl/parquet: the field holding the text (default: text)."""
    question_field: ShortStr | None = None
    """multiple-choice and exact-match: the prompt field (default: question)."""
    choices_field: ShortStr | None = None
    """multiple-choice: the list of choices (default: choices)."""
    answer_field: ShortStr | None = None
    """The correct choice index (multiple-choice) or answer string (exact-match) (default: answer)."""
    max_samples: Annotated[int, Field(ge=1, le=10**9)] | None = None
    """Evaluate at most this many samples (documents for perplexity)."""
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = defaults.EVAL_MAX_NEW_TOKENS
    """exact-match and generation: tokens generated per answer."""
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=8)] | None = None
    """exact-match and generation: the answer ends before the first of these strings (and always at end-of-text)."""
    seq_len: Annotated[int, Field(ge=16, le=131072)] | None = None
    """perplexity: tokens per scored window (default: the model's context, at most 2048); the trainer's
    training.sequenceLength gives the trainer's validation loss."""
    chat: bool = False
    """multiple-choice, exact-match and generation: put a plain-text question or prompt in the tokenizer's
    chat template as a user turn (a prompt given as messages always is)."""
    prompt_field: ShortStr | None = None
    """generation: the prompt field (default: prompt)."""
    rewards: Annotated[list[RewardSpec], Field(max_length=16)] | None = None
    """generation (required): the reward functions that score the completions, declared as a
    ForgeTraining's spec.rewards (metrics: reward and reward_<name>)."""
    temperature: Annotated[float, Field(gt=0, le=100)] | None = None
    """generation: sample at this temperature (default: greedy)."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    """generation: the sampling seed (the same seed, model and batch size give the same completions)."""

    cel_rules = (
        Cel("self.type == 'perplexity' || !has(self.format) || self.format != 'text'",
            "multiple-choice, exact-match and generation suites read jsonl or parquet, not text",
            lambda s: s.type == "perplexity" or s.format != "text", field_path=".format"),
        Cel("(self.type == 'generation') == (has(self.rewards) && size(self.rewards) > 0)",
            "a generation suite needs rewards; the other suite types take none",
            lambda s: (s.type == "generation") == bool(s.rewards), field_path=".rewards"),
        Cel("self.type == 'generation' || (!has(self.temperature) && !has(self.promptField))",
            "temperature and promptField are for generation suites",
            lambda s: s.type == "generation" or (s.temperature is None and s.prompt_field is None)),
        Cel("!has(self.rewards) || self.rewards.all(a, self.rewards.exists_one(b, b.name == a.name))",
            "reward names must be unique", lambda s: len({r.name for r in s.rewards or []}) == len(s.rewards or []),
            field_path=".rewards"),
    )


class EvalGate(ApiModel):
    """A threshold a model must meet: absolute (e.g. heldout.perplexity < 20) or relative to the baseline
    (maxDrop: e.g. mc.acc at most 0.02 below the baseline's).

    A relative gate on a per-item metric (acc, acc_norm, exact_match) fails only when the drop beyond
    maxDrop is significant: McNemar's exact test on the items the two models disagree on gives a
    p-value below `significance`; on a generation suite's reward metrics the same one-sided exact sign
    test on the items whose rewards differ (items a function does not apply to left out). A drop of a loss, perplexity or bits_per_byte (the same held-out text,
    measured exactly) fails as soon as it exceeds maxDrop.
    """

    metric: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\.[a-z_][-a-z0-9_]*$", max_length=128)]
    """<suite name>.<metric>: perplexity suites report loss, perplexity, bits_per_byte;
    multiple-choice acc, acc_norm; exact-match exact_match; generation reward and reward_<reward name>."""
    comparator: Comparator | None = None
    """Absolute gate: how the metric compares with the threshold to pass."""
    threshold: float | None = None
    """Absolute gate: the value to compare with."""
    max_drop: Annotated[float, Field(ge=0)] | None = None
    """Relative gate: how much worse than the baseline the metric may be (a fall of acc, acc_norm,
    exact_match and the rewards; a rise of loss, perplexity and bits_per_byte). Needs spec.baseline."""
    significance: Annotated[float, Field(gt=0, lt=1)] = defaults.EVAL_SIGNIFICANCE
    """Relative gate on a per-item metric: the p-value below which a drop beyond maxDrop is not noise."""

    cel_rules = (
        Cel("has(self.maxDrop) ? !has(self.comparator) && !has(self.threshold) "
            ": has(self.comparator) && has(self.threshold)",
            GATE_KIND,
            lambda g: (g.comparator is None and g.threshold is None) if g.max_drop is not None
            else (g.comparator is not None and g.threshold is not None)),
    )


def _names_a_metric_of(metric: str, suite: EvalSuite) -> bool:
    """As the CEL rule: one of the type's metrics, or reward_<anything> on a generation suite."""
    return metric in [f"{suite.name}.{m}" for m in SUITE_METRICS[suite.type]] or (
        suite.type == "generation" and metric.startswith(f"{suite.name}.{REWARD_METRIC}_"))


def _cel_metric_of_suite() -> str:
    """CEL: gate g names one of the metrics that suite s reports."""
    branches = []
    for type_, metrics in SUITE_METRICS.items():
        names = ", ".join("s.name + '." + m + "'" for m in metrics)
        # reward_<name>: the prefix only (a check per reward is over the API server's cost budget); the
        # evaluator refuses a name that is not one of the suite's rewards before it loads the model
        rewards = f" || g.metric.startsWith(s.name + '.{REWARD_METRIC}_')" if type_ == "generation" else ""
        branches.append(f"s.type == '{type_}' ? (g.metric in [{names}]{rewards})")
    return " : ".join(branches) + " : false"


# For every object with suites and gates: a ForgeEval's spec and a ForgeTraining's spec.evaluation.
SUITES_AND_GATES_RULES = (
    Cel("self.suites.all(a, self.suites.exists_one(b, b.name == a.name))", "suite names must be unique",
        lambda s: len({x.name for x in s.suites}) == len(s.suites), field_path=".suites"),
    Cel("!has(self.gates) || self.gates.all(g, self.suites.exists(s, " + _cel_metric_of_suite() + "))",
        "every gate metric must be <suite>.<metric> for one of the suites and a metric its type reports ("
        + "; ".join(f"{t}: {', '.join(m)}" for t, m in SUITE_METRICS.items()) + ", reward_<reward name>)",
        lambda s: all(any(_names_a_metric_of(g.metric, x) for x in s.suites) for g in s.gates or []),
        field_path=".gates"),
)


class ModelSourceSpec(ApiModel):
    """The model to evaluate. Set exactly one of trainingRef or checkpoint."""

    training_ref: DnsLabel | None = None
    """Name of a ForgeTraining in the same namespace: its exported model is evaluated once it has Succeeded."""
    checkpoint: StorageLocation | None = None
    """A Hugging Face-format model folder, a ForgeTraining's checkpoint folder (its spec.checkpoint: the
    newest complete checkpoint in it is evaluated) or one step-NNNNNNNN checkpoint of it."""

    cel_rules = (
        Cel("has(self.trainingRef) != has(self.checkpoint)", "set exactly one of trainingRef or checkpoint",
            lambda s: (s.training_ref is None) != (s.checkpoint is None)),
    )


class EvalResourcesSpec(ApiModel):
    """The evaluation pod."""

    gpus: Annotated[int, Field(ge=0, le=16)] = defaults.EVAL_GPUS
    """GPUs for the evaluation pod (0 for CPU). With more than one, the model (and the baseline) is split
    across them by layers, so that a model larger than one GPU can be evaluated; with one, it sits whole on
    the GPU."""
    gpu_resource_name: ShortStr = defaults.GPU_RESOURCE_NAME
    """Extended resource that counts GPUs."""
    cpu: Quantity | None = None
    """CPU request and limit."""
    memory: Quantity | None = None
    """Memory request and limit."""
    node_selector: dict[str, ShortStr] | None = None
    """Node labels the pod must run on."""
    tolerations: Annotated[list[FreeForm], Field(max_length=64)] | None = None
    """Pod tolerations (core/v1 Toleration)."""
    image: Annotated[str, Field(max_length=1024)] | None = None
    """Evaluation image (default: the trainer image)."""


class ForgeEvalSpec(ApiModel):
    """Desired state of a ForgeEval."""

    model: ModelSourceSpec
    """What to evaluate."""
    baseline: ModelSourceSpec | None = None
    """A model to compare with: every suite runs on it too, status shows both, and gates may use maxDrop."""
    suites: Annotated[list[EvalSuite], Field(min_length=1, max_length=32)]
    """Evaluation suites."""
    batch_size: Annotated[int, Field(ge=1, le=4096)] = defaults.EVAL_BATCH_SIZE
    """Sequences per forward pass."""
    gates: Annotated[list[EvalGate], Field(max_length=32)] | None = None
    """Thresholds; the GatesPassed condition says whether all were met."""
    resources: EvalResourcesSpec = EvalResourcesSpec()
    """The evaluation pod."""
    network: NetworkSpec = NetworkSpec()
    """What the evaluation pod may reach: with egress Restricted the evaluator refuses every connection but to
    the S3 endpoint of the model's, the baseline's and the suites' locations and the suites' HTTP reward
    services, and a NetworkPolicy allows only those and DNS."""

    cel_rules = SUITES_AND_GATES_RULES + (
        Cel("!has(self.gates) || has(self.baseline) || self.gates.all(g, !has(g.maxDrop))", BASELINE_NEEDED,
            lambda s: s.baseline is not None or all(g.max_drop is None for g in s.gates or []), field_path=".gates"),
    )


class SuiteResult(ApiModel):
    """Metrics of one suite."""

    suite: str
    """Suite name."""
    type: str | None = None
    """The suite's type."""
    metrics: dict[str, float]
    """metric -> value."""
    baseline: dict[str, float] | None = None
    """metric -> the baseline's value."""
    samples: int | None = None
    """Items evaluated (windows for perplexity)."""


class GateResult(ApiModel):
    """Outcome of one gate."""

    metric: str
    """The gated metric."""
    value: float | None = None
    """Its value."""
    passed: bool
    """Whether the gate passed."""
    comparator: str | None = None
    """Absolute gate: the comparator."""
    threshold: float | None = None
    """Absolute gate: the threshold."""
    baseline: float | None = None
    """Relative gate: the baseline's value."""
    max_drop: float | None = None
    """Relative gate: the drop allowed."""
    drop: float | None = None
    """Relative gate: how much worse than the baseline (negative: better)."""
    p_value: float | None = None
    """Relative gate on a per-item metric: McNemar's exact one-sided p-value (the sign test's for rewards)."""
    message: str | None = None
    """The outcome in words, with the metric, its value and the threshold."""


class ForgeEvalStatus(ApiModel):
    """Observed state of a ForgeEval."""

    phase: Literal[tuple(p.value for p in EVAL_PHASES)] | None = None  # type: ignore[valid-type]
    """Pending, Running, Succeeded or Failed."""
    conditions: Annotated[list[Condition], Field(max_length=32)] | None = None
    """Latest observations, including GatesPassed."""
    observed_generation: int | None = None
    """The .metadata.generation last acted on."""
    results: Annotated[list[SuiteResult], Field(max_length=32)] | None = None
    """Per-suite metrics."""
    gates: Annotated[list[GateResult], Field(max_length=32)] | None = None
    """Per-gate outcomes."""
    main_metric: str | None = None
    """The first gate's (or first suite's) metric and value, for kubectl get."""
    start_time: Timestamp | None = None
    """When evaluation started."""
    completion_time: Timestamp | None = None
    """When evaluation finished."""


class ForgeEval(ApiModel):
    """Evaluation of a model on held-out data and task files, with optional gates."""

    api_version: Literal["forge.dev/v1alpha1"] = API_VERSION
    kind: Literal["ForgeEval"] = "ForgeEval"
    metadata: ObjectMeta = ObjectMeta()
    spec: ForgeEvalSpec
    status: ForgeEvalStatus | None = None
