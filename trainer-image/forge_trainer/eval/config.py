"""The evaluator's configuration (what the operator and `forge eval` give `python -m forge_trainer.eval`).

Imports neither torch nor transformers: the operator builds it from a ForgeEval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import defaults as D
from ..config import EgressConfig, RewardConfig, S3Config
from ..contract import DEFAULT_TERMINATION_MESSAGE_PATH

SuiteType = Literal["perplexity", "multiple-choice", "exact-match", "generation"]
# The metrics each suite type reports; a gate names one of them as "<suite>.<metric>".
SUITE_METRICS: dict[str, tuple[str, ...]] = {
    "perplexity": ("loss", "perplexity", "bits_per_byte"),
    "multiple-choice": ("acc", "acc_norm"),
    "exact-match": ("exact_match",),
    "generation": ("reward",),  # and reward_<name> for each of the suite's reward functions
}
REWARD_METRIC = "reward"
# Metrics where a larger value is better (a drop is a fall); for the others a drop is a rise.
HIGHER_IS_BETTER = frozenset({"acc", "acc_norm", "exact_match"})
# Metrics with a per-item outcome (right or wrong), so that a paired test (McNemar) applies.
PER_ITEM = frozenset({"acc", "acc_norm", "exact_match"})


def is_reward_metric(metric: str) -> bool:
    return metric == REWARD_METRIC or metric.startswith(REWARD_METRIC + "_")


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER or is_reward_metric(metric)


def has_per_item(metric: str) -> bool:
    """A per-item score exists, so that a paired test applies: McNemar's for right-or-wrong metrics, the
    sign test for a generation suite's per-item rewards."""
    return metric in PER_ITEM or is_reward_metric(metric)

PositiveInt = Annotated[int, Field(gt=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class SuiteConfig(_Model):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Unique in the list; metrics are reported as <name>.<metric>."""
    type: SuiteType
    path: str
    """A local folder or a single file."""
    format: Literal["text", "jsonl", "parquet"] = D.EVAL_FORMAT
    include: list[str] | None = None
    """Glob patterns under path; default by format."""
    text_field: str = "text"
    question_field: str = "question"
    choices_field: str = "choices"
    answer_field: str = "answer"
    max_samples: PositiveInt | None = None
    """At most this many items (documents for perplexity), in file order."""
    max_new_tokens: PositiveInt = D.EVAL_MAX_NEW_TOKENS
    """exact-match: tokens generated per answer."""
    stop: list[str] | None = None
    """exact-match: the answer ends before the first of these strings (and at end-of-text)."""
    seq_len: PositiveInt | None = None
    """perplexity: tokens per scored window; default the model's context (at most 2048)."""
    chat: bool = False
    """multiple-choice, exact-match and generation: wrap a plain-text question or prompt in the tokenizer's
    chat template as a user turn."""
    prompt_field: str = "prompt"
    """generation: the prompt (a string, or a list of {role, content} messages); the record's other fields
    reach the reward functions as columns."""
    rewards: list[RewardConfig] | None = None
    """generation: the reward functions that score the completions (as a GRPO method's rewards)."""
    temperature: Annotated[float, Field(gt=0)] | None = None
    """generation: sample at this temperature (seeded with `seed`); default greedy."""
    seed: int = 0
    """generation: the sampling seed."""

    @model_validator(mode="after")
    def _format(self) -> SuiteConfig:
        if self.type != "perplexity" and self.format == "text":
            raise ValueError(f"suite {self.name!r}: multiple-choice, exact-match and generation suites read jsonl or "
                             "parquet, not text")
        if (self.type == "generation") != bool(self.rewards):
            raise ValueError(f"suite {self.name!r}: a generation suite needs rewards; the other suite types take none")
        if self.type != "generation" and self.temperature is not None:
            raise ValueError(f"suite {self.name!r}: temperature is for generation suites")
        names = [r.name for r in self.rewards or []]
        if len(set(names)) != len(names):
            raise ValueError(f"suite {self.name!r}: reward names must be unique")
        return self

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics the suite reports."""
        return SUITE_METRICS[self.type] + tuple(f"{REWARD_METRIC}_{r.name}" for r in self.rewards or [])


class GateConfig(_Model):
    metric: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\.[a-z_][-a-z0-9_.]*$")
    """<suite>.<metric>."""
    comparator: Literal["<", "<=", ">", ">="] | None = None
    threshold: float | None = None
    max_drop: Annotated[float, Field(ge=0)] | None = None
    """Relative gate: how much worse than the baseline the metric may be (a fall of acc, a rise of loss)."""
    significance: Annotated[float, Field(gt=0, lt=1)] = D.EVAL_SIGNIFICANCE
    """Relative gate on a per-item metric: a drop beyond max_drop fails only if McNemar's test gives a
    p-value below this (the drop is not noise)."""

    @model_validator(mode="after")
    def _kind(self) -> GateConfig:
        absolute = self.comparator is not None and self.threshold is not None
        if absolute == (self.max_drop is not None) or (self.comparator is None) != (self.threshold is None):
            raise ValueError(f"gate {self.metric}: set comparator and threshold (absolute) or maxDrop (relative)")
        return self

    def passes(self, value: float) -> bool:
        t = self.threshold
        return {"<": value < t, "<=": value <= t, ">": value > t, ">=": value >= t}[self.comparator]


class EvalConfig(_Model):
    name: str = "eval"
    model_path: str
    """The model folder: a Forge export or any Hugging Face causal LM folder (config.json, weights, tokenizer),
    a training's checkpoint folder or one of its checkpoints; a folder or an s3://bucket/prefix URL."""
    baseline_path: str | None = None
    """Another model folder; every suite runs on it too and relative gates compare with it."""
    suites: list[SuiteConfig] = Field(min_length=1)
    gates: list[GateConfig] = []
    batch_size: PositiveInt = D.EVAL_BATCH_SIZE
    output_dir: str
    """results.json, report.md and its charts are written here (an s3:// prefix: written to scratch, then
    uploaded there, results.json last)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus: PositiveInt | None = None
    """On CUDA: how many of the visible GPUs to use (default: all). More than one: the model and the
    baseline are each split across them by layers; one: each sits whole on the GPU."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    termination_message_path: str = DEFAULT_TERMINATION_MESSAGE_PATH
    egress: EgressConfig = EgressConfig()
    """The trainer's egress lock while the evaluation runs (the suites' HTTP reward services and the S3
    endpoint of the s3:// locations are allowed)."""
    s3: S3Config = S3Config()
    """How to reach the store of the s3:// locations (model, baseline, suite paths, output_dir)."""
    scratch_dir: str | None = None
    """A local folder for the copies of s3:// locations and the results on their way up (required with them)."""
    fields: dict[str, str] = {}
    """s3:// location -> the field of the spec that names it, for messages."""

    @property
    def s3_locations(self) -> dict[str, str]:
        """The s3:// locations by the configuration's field."""
        found = {"model_path": self.model_path, "baseline_path": self.baseline_path, "output_dir": self.output_dir,
                 **{f"suites[{i}].path": s.path for i, s in enumerate(self.suites)}}
        return {k: v for k, v in found.items() if v is not None and v.startswith("s3://")}

    @model_validator(mode="after")
    def _names(self) -> EvalConfig:
        if self.gpus is not None and self.device == "cpu":
            raise ValueError("gpus: the evaluation runs on the CPU (device cpu); set device cuda or auto")
        if self.s3_locations and self.scratch_dir is None:
            raise ValueError("scratch_dir: s3:// locations are copied to a local folder: set scratch_dir")
        names = [s.name for s in self.suites]
        if len(set(names)) != len(names):
            raise ValueError("suite names must be unique")
        known = {f"{s.name}.{m}" for s in self.suites for m in s.metrics}
        for g in self.gates:
            if g.metric not in known:
                raise ValueError(f"gate {g.metric}: no suite reports this metric (reported: {', '.join(sorted(known))})")
            if g.max_drop is not None and self.baseline_path is None:
                raise ValueError(f"gate {g.metric}: maxDrop compares with a baseline; set the baseline")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_eval_config(path: str | Path) -> EvalConfig:
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return EvalConfig.model_validate(data)
