"""Reward functions (spec.rewards of a ForgeTraining, rewards of a ForgeEval generation suite) and their
translation spec.rewards[] -> the trainer's RewardConfig: the one translation of a reward, used by a ForgeTraining's
grpo and online-dpo and by a ForgeEval's generation suites (a KPI is written once).

Pure. Where a PVC path is on disk (``resolve``) and where a reward ConfigMap is mounted (``config_map``)
are the caller's."""

from __future__ import annotations

from typing import Annotated, Callable

from pydantic import Field

from forge_trainer.config import ExactMatchReward, HttpReward, JsonSchemaReward, LengthReward, RegexReward, RewardConfig

from . import defaults
from .base import ApiModel, Cel, DnsLabel, FreeForm, PvcLocation, ShortStr
from .names import REWARDS_MOUNT_ROOT

MAX_CHARS = 10**15


class ConfigMapKey(ApiModel):
    """A key of a ConfigMap in the resource's namespace, mounted read-only into the workers."""

    name: DnsLabel
    """Name of the ConfigMap."""
    key: Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+\.py$", max_length=253)]
    """The key holding the Python file, e.g. rewards.py."""


class PythonRewardSpec(ApiModel):
    """A Python function f(prompts, completions, **columns) -> list[float] (TRL's reward signature), from a file
    in a ConfigMap or on a PersistentVolumeClaim. Set exactly one of configMap or pvc."""

    config_map: ConfigMapKey | None = None
    """The file is this key of a ConfigMap (the ConfigMap's other keys are beside it, importable)."""
    pvc: PvcLocation | None = None
    """The file is at this path on a PersistentVolumeClaim (e.g. the data volume)."""
    function: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=253)]
    """The function's name in the file."""

    cel_rules = (
        Cel("has(self.configMap) != has(self.pvc)", "set exactly one of configMap or pvc",
            lambda s: (s.config_map is None) != (s.pvc is None)),
    )


class ExactMatchRewardSpec(ApiModel):
    """1.0 where the completion equals the reference in a column of the prompt record, else 0.0."""

    column: ShortStr
    """The prompt record's field holding the reference answer."""
    normalize: bool = True
    """Compare case-folded, whitespace collapsed, final punctuation removed."""
    extract: ShortStr | None = None
    """A regular expression with one group: compare what it captures in the completion (no match: 0.0)."""


class RegexRewardSpec(ApiModel):
    """1.0 where every mustMatch pattern is found in the completion and no mustNotMatch one (Python regular
    expressions), else 0.0."""

    must_match: Annotated[list[ShortStr], Field(max_length=32)] = []
    """Patterns the completion must contain."""
    must_not_match: Annotated[list[ShortStr], Field(max_length=32)] = []
    """Patterns the completion must not contain."""


class JsonSchemaRewardSpec(ApiModel):
    """1.0 where the completion is JSON valid against the schema, else 0.0."""

    json_schema: FreeForm = Field(alias="schema")
    """The JSON Schema."""


class LengthRewardSpec(ApiModel):
    """1.0 where the completion's length in characters is within the limits, else 0.0."""

    min_chars: Annotated[int, Field(ge=0, le=MAX_CHARS)] | None = None
    """The shortest completion that scores 1.0."""
    max_chars: Annotated[int, Field(ge=1, le=MAX_CHARS)] | None = None
    """The longest completion that scores 1.0."""


class HttpRewardSpec(ApiModel):
    """A scoring service in the cluster: each batch is POSTed as JSON ({prompts, completions, <column>: [...]}),
    the answer is a JSON list of numbers (or {scores: [...]}), one per completion."""

    url: Annotated[str, Field(pattern=r"^https?://", max_length=2048)]
    """The endpoint, e.g. http://scorer.team.svc:8080/score."""
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = defaults.REWARD_HTTP_TIMEOUT_SECONDS
    """How long one request may take."""
    retries: Annotated[int, Field(ge=0, le=10)] = defaults.REWARD_HTTP_RETRIES
    """Further attempts after a refused, timed-out or 5xx request, with a backoff; then the training fails."""


class RewardSpec(ApiModel):
    """One reward function and its weight (grpo, online-dpo). Set exactly one of python, exactMatch, regex,
    jsonSchema, length or http. A completion's reward is the weighted sum over spec.rewards."""

    name: DnsLabel
    """Name of the reward, unique in the list (metrics: reward_<name>_mean)."""
    weight: Annotated[float, Field(ge=-1000, le=1000)] = 1.0
    """Its weight in the sum."""
    python: PythonRewardSpec | None = None
    """A Python function (TRL's reward signature) from a ConfigMap or a PersistentVolumeClaim."""
    exact_match: ExactMatchRewardSpec | None = None
    """Built in: the completion equals a column of the prompt record."""
    regex: RegexRewardSpec | None = None
    """Built in: the completion matches (or does not match) regular expressions."""
    json_schema: JsonSchemaRewardSpec | None = None
    """Built in: the completion is JSON valid against a schema."""
    length: LengthRewardSpec | None = None
    """Built in: the completion's length is within limits."""
    http: HttpRewardSpec | None = None
    """A scoring service in the cluster."""

    cel_rules = (
        Cel("[has(self.python), has(self.exactMatch), has(self.regex), has(self.jsonSchema), has(self.length), "
            "has(self.http)].filter(x, x).size() == 1",
            "set exactly one of python, exactMatch, regex, jsonSchema, length or http",
            lambda s: sum(x is not None for x in (s.python, s.exact_match, s.regex, s.json_schema, s.length,
                                                  s.http)) == 1),
    )




def config_map_path(name: str) -> str:
    """Where a reward ConfigMap is inside a worker or evaluation pod."""
    return f"{REWARDS_MOUNT_ROOT}/{name}"


def reward_config(r: RewardSpec, field: str, resolve: Callable[[PvcLocation], str],
                  config_map: Callable[[str], str] = config_map_path, error: type[Exception] = ValueError) -> RewardConfig:
    """A reward as the trainer and the evaluator read it; a Python file is where the pods mount it.
    ``error``: raised (naming ``field``) for a PVC path that is not a .py file."""
    common = {"name": r.name, "weight": r.weight}
    if r.python is not None:
        p = r.python
        path = f"{config_map(p.config_map.name)}/{p.config_map.key}" if p.config_map else resolve(p.pvc)
        if not path.endswith(".py"):
            raise error(f"{field}.python.pvc.path: {p.pvc.path!r} is not a .py file")
        return RewardConfig(**common, function=f"{path}:{p.function}")
    if r.exact_match is not None:
        return RewardConfig(**common, exact_match=ExactMatchReward(**r.exact_match.model_dump(exclude_none=True, by_alias=False)))
    if r.regex is not None:
        return RewardConfig(**common, regex=RegexReward(**r.regex.model_dump(by_alias=False)))
    if r.json_schema is not None:
        return RewardConfig(**common, json_schema=JsonSchemaReward(schema=r.json_schema.json_schema))
    if r.length is not None:
        return RewardConfig(**common, length=LengthReward(**r.length.model_dump(by_alias=False)))
    return RewardConfig(**common, http=HttpReward(**r.http.model_dump(by_alias=False)))


def reward_config_maps(rewards: list[RewardSpec]) -> list[str]:
    """The ConfigMaps the pods mount for these rewards (sorted, each once)."""
    return sorted({r.python.config_map.name for r in rewards if r.python and r.python.config_map})
