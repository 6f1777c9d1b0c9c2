"""The trainer's configuration: one typed tree that holds every knob.

This module imports neither torch nor transformers: the operator imports it to
validate a training spec and to write it into a ConfigMap. Field docstrings are
the user's documentation (docs/trainer.md summarises them).

Every default the operator's API shares comes from ``defaults.py``; a value derived from another
(the MLP widths, ``min_lr``) may be left out (None) and is filled in here, after validation, so
the operator passes None where the spec left it out and never computes it itself.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import defaults as D
from .contract import DEFAULT_TERMINATION_MESSAGE_PATH

DEFAULT_INCLUDE = {
    "text": ["**/*.txt"],
    "jsonl": ["**/*.jsonl"],
    "parquet": ["**/*.parquet"],
}

PositiveInt = Annotated[int, Field(gt=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ArchitectureConfig(_Model):
    """A model built from scratch with random weights."""

    family: Literal["dense", "moe"] = D.FAMILY
    """dense = Llama (LlamaForCausalLM); moe = Qwen3-MoE (Qwen3MoeForCausalLM)."""
    vocab_size: PositiveInt | None = None
    """Embedding rows; default: the tokenizer's vocabulary size."""
    num_layers: PositiveInt = 6
    """Transformer blocks."""
    hidden_size: PositiveInt = 256
    """Model width."""
    intermediate_size: PositiveInt | None = None
    """Width of the dense MLP; default: about 8/3 x hidden_size, rounded up to a multiple of 64."""
    num_attention_heads: PositiveInt = 4
    """Query heads; hidden_size must be a multiple of it."""
    num_key_value_heads: PositiveInt | None = None
    """Key/value heads (grouped-query attention); default: num_attention_heads."""
    max_position_embeddings: PositiveInt = D.CONTEXT_LENGTH
    """Longest context the model supports; training.seq_len may not exceed it."""
    num_experts: PositiveInt = 8
    """MoE only: experts per layer."""
    num_experts_per_token: PositiveInt = 2
    """MoE only: experts each token is routed to (top-k)."""
    moe_intermediate_size: PositiveInt | None = None
    """MoE only: width of each expert's MLP; default: intermediate_size / num_experts_per_token (at least 8)."""
    router_aux_loss_coef: float = Field(D.ROUTER_AUX_LOSS_COEF, ge=0)
    """MoE only: weight of the load-balancing loss added to the training loss."""
    rope_theta: float = Field(D.ROPE_THETA, gt=0)
    """Base of the rotary position embedding."""
    tie_word_embeddings: bool = D.TIE_WORD_EMBEDDINGS
    """Share the input embedding with the output projection."""

    @model_validator(mode="after")
    def _check_shapes(self) -> ArchitectureConfig:
        if self.intermediate_size is None:
            self.intermediate_size = D.intermediate_size(self.hidden_size)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = D.expert_intermediate_size(self.intermediate_size,
                                                                    self.num_experts_per_token)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {kv}"
            )
        if self.family == "moe" and self.num_experts_per_token > self.num_experts:
            raise ValueError(
                f"num_experts_per_token {self.num_experts_per_token} exceeds num_experts {self.num_experts}"
            )
        return self


class ModelConfig(_Model):
    """Exactly one of `architecture` (from scratch) or `base_path` (continue a model)."""

    architecture: ArchitectureConfig | None = None
    """Build a new model with random weights from this shape."""
    base_path: str | None = None
    """A local directory in Hugging Face format (config.json + safetensors); never downloaded."""

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelConfig:
        if (self.architecture is None) == (self.base_path is None):
            raise ValueError("set exactly one of model.architecture or model.base_path")
        return self


class TokenizerTrainConfig(_Model):
    vocab_size: int = Field(D.VOCAB_SIZE, ge=260, le=2**32 - 1)
    """Vocabulary of the byte-level BPE trained on the training data (256 bytes + merges + specials)."""
    min_frequency: PositiveInt = 2
    """A pair must occur this often to be merged; the data must support vocab_size merges."""
    max_training_bytes: PositiveInt = 1_000_000_000
    """Train the BPE on at most this many bytes of training text (the first files, in order)."""


class TokenizerConfig(_Model):
    """Exactly one of `train`, `from_base` or `path`."""

    train: TokenizerTrainConfig | None = None
    """Train a byte-level BPE on the training data."""
    from_base: bool = False
    """Use the tokenizer stored with model.base_path."""
    path: str | None = None
    """A local directory holding a Hugging Face tokenizer (tokenizer.json)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenizerConfig:
        if sum([self.train is not None, self.from_base, self.path is not None]) != 1:
            raise ValueError("set exactly one of tokenizer.train, tokenizer.from_base or tokenizer.path")
        return self


class DataSourceConfig(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Short name, used in the manifest, the metrics and validation.source."""
    path: str
    """A local directory or a single file."""
    format: Literal["text", "jsonl", "parquet"] = D.DATA_FORMAT
    """text: each file is one document; jsonl/parquet: each record's text_field is one document."""
    include: list[str] | None = None
    """Glob patterns relative to path; default **/*.txt, **/*.jsonl or **/*.parquet by format."""
    exclude: list[str] = []
    """Glob patterns relative to path to leave out."""
    text_field: str = D.TEXT_FIELD
    """jsonl/parquet: the field holding the document text."""
    prompt_field: str | None = None
    """sft, prompt/completion records: the field holding the prompt (no loss on it). grpo and online-dpo, alone:
    the prompt to sample completions for, text or a conversation (a list of {role, content}); the record's
    other fields are passed to the reward functions as columns."""
    completion_field: str | None = None
    """sft, prompt/completion records: the field holding the answer to learn."""
    messages_field: str | None = None
    """sft, chat records: the field holding the conversation, a list of {role, content} with roles
    system, user and assistant; the loss is on the assistant turns."""
    chosen_field: str | None = None
    """dpo, preference records (with prompt_field): the field holding the preferred answer."""
    rejected_field: str | None = None
    """dpo, preference records (with prompt_field): the field holding the dispreferred answer."""
    weight: float = Field(D.SOURCE_WEIGHT, gt=0)
    """Mixing weight: the share of training sequences drawn from this source."""

    @model_validator(mode="after")
    def _record_fields(self) -> DataSourceConfig:
        if self.messages_field is not None and (self.prompt_field is not None or self.completion_field is not None):
            raise ValueError(f"data source {self.name!r}: set messages_field or prompt_field and completion_field, not both")
        if (self.chosen_field is None) != (self.rejected_field is None):
            raise ValueError(f"data source {self.name!r}: chosen_field and rejected_field go together")
        if self.chosen_field is not None:
            if self.prompt_field is None or self.completion_field is not None or self.messages_field is not None:
                raise ValueError(f"data source {self.name!r}: preference records are prompt_field, chosen_field and "
                                 "rejected_field (no completion_field or messages_field)")
        elif self.completion_field is not None and self.prompt_field is None:
            raise ValueError(f"data source {self.name!r}: prompt_field and completion_field go together")
        if self.record_kind is not None and self.format == "text":
            raise ValueError(f"data source {self.name!r}: records (prompt/completion, messages or preference pairs) "
                             "need format jsonl or parquet")
        return self

    @property
    def record_kind(self) -> Literal["prompt-completion", "chat", "preference", "prompt"] | None:
        """What a record of this source is: sft's prompt-completion or chat, dpo's preference pair, grpo's
        and online-dpo's prompt (None: the source holds documents)."""
        if self.chosen_field is not None:
            return "preference"
        if self.messages_field is not None:
            return "chat"
        if self.prompt_field is None:
            return None
        return "prompt-completion" if self.completion_field is not None else "prompt"

    @property
    def include_patterns(self) -> list[str]:
        return self.include if self.include is not None else DEFAULT_INCLUDE[self.format]


class ValidationConfig(_Model):
    """Exactly one of `fraction` or `source`."""

    fraction: float | None = Field(None, ge=0, lt=1)
    """Hold out this fraction of documents (chosen by a hash of their location) from every source."""
    source: str | None = None
    """Use the named source entirely for validation (it is not trained on)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> ValidationConfig:
        if (self.fraction is None) == (self.source is None):
            raise ValueError("set exactly one of data.validation.fraction or data.validation.source")
        return self


class DataConfig(_Model):
    sources: list[DataSourceConfig] = Field(min_length=1)
    """Where the training text comes from."""
    validation: ValidationConfig = ValidationConfig(fraction=D.VALIDATION_FRACTION)
    """How the held-out validation set is chosen."""

    @model_validator(mode="after")
    def _check_sources(self) -> DataConfig:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources names must be unique, got {names}")
        if self.validation.source is not None:
            if self.validation.source not in names:
                raise ValueError(f"data.validation.source {self.validation.source!r} is not one of {names}")
            if len(names) < 2:
                raise ValueError("data.validation.source needs another source to train on")
        return self


class BudgetConfig(_Model):
    """When the run ends (the first limit reached wins). At least one is required."""

    max_steps: PositiveInt | None = None
    """Optimizer steps."""
    max_tokens: PositiveInt | None = None
    """Training tokens seen (rounded up to whole steps)."""
    deadline: datetime | None = None
    """Absolute time (UTC if no zone is given) after which the run checkpoints, exports and ends."""

    @field_validator("deadline")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            v = v.replace(tzinfo=timezone.utc)
        return v

    @model_validator(mode="after")
    def _at_least_one(self) -> BudgetConfig:
        if self.max_steps is None and self.max_tokens is None and self.deadline is None:
            raise ValueError("set at least one of training.budget.max_steps, max_tokens or deadline")
        return self


class LoraConfig(_Model):
    """LoRA (low-rank adapters, with peft): the base's weights stay frozen and only small adapter matrices
    beside the chosen linear layers train. Methods sft and dpo."""

    r: PositiveInt = D.LORA_R
    """Rank of each adapter (peft's r)."""
    alpha: float = Field(D.LORA_ALPHA, gt=0)
    """Scaling: an adapter's update is multiplied by alpha / r (peft's lora_alpha)."""
    dropout: float = Field(D.LORA_DROPOUT, ge=0, lt=1)
    """Dropout on an adapter's input while training (peft's lora_dropout)."""
    target_modules: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    """Names (or name suffixes) of the linear layers that get adapters, e.g. [q_proj, v_proj]; default:
    every linear layer of the decoder but the output head (peft's "all-linear")."""
    export: Literal["merged", "adapter"] = D.LORA_EXPORT
    """merged: the adapters merged into the base, saved as a plain model of the base's family; adapter:
    only the adapter, in peft's format (adapter_config.json + adapter_model.safetensors), to load with
    peft on top of the base."""


class TrainingConfig(_Model):
    seq_len: PositiveInt = D.SEQUENCE_LENGTH
    """Tokens per training sequence (documents are packed, separated by EOS)."""
    global_batch_sequences: PositiveInt = D.GLOBAL_BATCH_SEQUENCES
    """Sequences per optimizer step over all workers."""
    micro_batch_sequences: PositiveInt = D.MICRO_BATCH_SIZE
    """Sequences per forward/backward on one worker; gradient accumulation makes up the rest."""
    lr: float = Field(D.LEARNING_RATE, gt=0)
    """Peak learning rate."""
    min_lr: float | None = Field(None, ge=0)
    """Learning rate at the end of the cosine / WSD decay; default: lr / 10."""
    schedule: Literal["cosine", "wsd", "constant"] = D.SCHEDULE
    """Learning-rate schedule after warmup (wsd = warmup-stable-decay)."""
    warmup_steps: int = Field(D.WARMUP_STEPS, ge=0)
    """Linear warmup from 0 to lr."""
    decay_fraction: float = Field(D.DECAY_FRACTION, gt=0, le=1)
    """wsd only: the final fraction of steps that decays linearly to min_lr."""
    weight_decay: float = Field(D.WEIGHT_DECAY, ge=0)
    """AdamW weight decay on matrices (not on norms and biases)."""
    grad_clip: float | None = Field(D.GRADIENT_CLIPPING, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    precision: Literal["auto", "bf16", "fp32", "fp8"] = D.PRECISION
    """auto = bf16 autocast on CUDA, fp32 on CPU; fp8 = bf16, but the transformer blocks' linear layers
    multiply in FP8 (torchao's Float8Linear, tensorwise scaling; not the output head, the MoE routers or the
    MoE experts): GPUs of compute capability 8.9 or later (or a CPU whose PyTorch has FP8 matrix products),
    and every such layer's dimensions multiples of 16."""
    seed: int = D.SEED
    """Seeds weight init and data order; the same seed and data give the same run."""
    compile: bool | None = None
    """torch.compile each transformer block; default: on GPUs (CUDA), off on CPUs (decided where the
    run starts, by the device it trains on)."""
    activation_checkpointing: Literal["none", "selective", "full"] = D.ACTIVATION_CHECKPOINTING
    """Per transformer block: none keeps every activation for the backward pass; full keeps only each
    block's input and recomputes the block in the backward pass (about a third more compute, the least
    memory); selective keeps the matrix products' and attention's outputs and recomputes the rest (norms,
    activation functions, element-wise products: little compute, most of the bytes)."""
    sharding: Literal["FullShard", "HybridShard"] = D.SHARDING
    """FSDP2 over the workers (one included): FullShard shards parameters, gradients and optimizer state
    over every worker; HybridShard shards them over the workers of a node (LOCAL_WORLD_SIZE) and
    replicates them across the nodes (a 2-D device mesh: nodes x workers per node)."""
    budget: BudgetConfig = BudgetConfig(max_steps=1000)
    """When to stop."""
    eval_interval_steps: PositiveInt | None = D.EVAL_INTERVAL_STEPS
    """Compute the validation loss every N steps (and always at the end); null = only at the end."""
    eval_batches: PositiveInt = 20
    """Micro-batches in one validation pass, in all (split over the workers), spread over the whole validation split."""
    log_interval_steps: PositiveInt = 10
    """Print a log line every N steps (rank 0); the loss and gradient norm are read from the device then only."""
    gc_interval_steps: PositiveInt = 50
    """Python's automatic garbage collection is off while the loop runs; it collects (the young
    generations) every N steps, between two steps, on every worker at the same step."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of every weight (methods sft and dpo); null: full fine-tuning."""

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.min_lr is None:
            self.min_lr = D.min_learning_rate(self.lr)
        if self.global_batch_sequences % self.micro_batch_sequences:
            raise ValueError(
                f"global_batch_sequences {self.global_batch_sequences} is not a multiple of "
                f"micro_batch_sequences {self.micro_batch_sequences}"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} exceeds lr {self.lr}")
        if self.schedule != "constant" and self.budget.max_steps is None and self.budget.max_tokens is None:
            raise ValueError(f"schedule {self.schedule} needs training.budget.max_steps or max_tokens to know its length")
        return self


class CheckpointConfig(_Model):
    dir: str = "/checkpoints"
    """Where checkpoints go; must be shared storage when workers run on several nodes."""
    interval_steps: PositiveInt | None = D.CHECKPOINT_INTERVAL_STEPS
    """Checkpoint every N steps (null: never by step)."""
    interval_minutes: float | None = Field(float(D.CHECKPOINT_INTERVAL_MINUTES), gt=0)
    """Checkpoint when this many minutes passed since the last one (null: never by time)."""
    keep_last: PositiveInt = D.CHECKPOINT_KEEP_LAST
    """Delete older checkpoints, keeping this many."""
    resume: str = "auto"
    """auto = resume from the latest valid checkpoint in dir; never = start fresh; or a checkpoint path."""
    retain_after_success: Literal["All", "Last", "None"] = D.CHECKPOINT_RETAIN_AFTER_SUCCESS
    """Once the model is exported: All = keep the checkpoints (keep_last of them); Last = only the final one;
    None = delete them all (a run started again then trains from the start)."""


class OutputConfig(_Model):
    dir: str = "/output"
    """Where the exported Hugging Face model, tokenizer and provenance.json are written."""
    file_mode: int = Field(D.OUTPUT_FILE_MODE, ge=0, le=0o777)
    """Permission bits of the exported files; its folders get them plus search where readable (0644 -> 0755)."""


class ProvenanceConfig(_Model):
    """The provenance record written beside the exported model (provenance.json)."""

    signing_key: str | None = None
    """An Ed25519 private key (PEM, unencrypted): rank 0 signs the record with it (provenance.json.sig);
    null: the record says it is unsigned."""


class MetricsConfig(_Model):
    port: int | None = Field(D.METRICS_PORT, ge=0, le=65535)
    """Rank 0 serves Prometheus metrics on this port; 0 or null disables."""
    progress_interval_seconds: float = Field(D.PROGRESS_INTERVAL_SECONDS, gt=0)
    """How often rank 0 reports progress (callback, pod annotation)."""
    peak_flops_per_device: float | None = Field(None, gt=0)
    """Peak FLOP/s of one device for MFU; default: looked up by GPU name (none on CPU)."""


class EgressConfig(_Model):
    """The trainer's own egress lock (``runtime/egress.py``), the second line behind a NetworkPolicy."""

    lock: bool = True
    """While the run lasts, refuse outbound connections from Python code except to loopback, the
    Kubernetes API server, the HTTP reward services of the method, the endpoint of ``s3`` (when a location
    is on S3), and ``allow``."""
    allow: list[str] = []
    """More destinations: ``host`` (any port) or ``host:port``; names are resolved when the run starts."""


class ResidencyConfig(_Model):
    """Where the operator let the workers run (a ForgeTraining's spec.residency: required node affinity on
    the nodes' topology.kubernetes.io/region and /zone labels). Recorded, not enforced, by the trainer."""

    regions: list[str] = []
    """Allowed regions; empty: any."""
    zones: list[str] = []
    """Allowed zones; empty: any."""


class S3Config(_Model):
    """How the trainer reaches the S3-compatible store of its ``s3://bucket/prefix`` locations (data source
    paths, checkpoint.dir, output.dir). Credentials are boto3's: AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY (the operator sets them from the location's Secret), or a credentials file."""

    endpoint: str | None = Field(None, pattern=r"^https?://")
    """Endpoint URL of the store (default: AWS's, from the region)."""
    region: str | None = None
    """Region of the bucket (default: us-east-1, which most S3-compatible stores accept)."""
    path_style: bool = False
    """Address buckets as endpoint/bucket/key rather than bucket.endpoint/key (most on-premises stores)."""
    connect_timeout_seconds: float = Field(10.0, gt=0)
    """How long one connection attempt may take."""
    max_attempts: PositiveInt = 3
    """Attempts of each request before the run fails (botocore's standard retry mode)."""


class PretrainMethod(_Model):
    """Next-token prediction on packed text, from a new model (model.architecture)."""

    kind: Literal["pretrain"] = "pretrain"
    document_masking: bool = D.DOCUMENT_MASKING
    """Each token attends only to its own document in a packed window: the position ids restart after
    every end-of-text token, from which transformers builds a block-diagonal causal mask (as sft packs
    its examples). False: a window is one sequence, each document seeing those packed before it."""


class ContinuedPretrainMethod(_Model):
    """Next-token prediction on packed text, continuing model.base_path."""

    kind: Literal["continued-pretrain"] = "continued-pretrain"
    document_masking: bool = D.DOCUMENT_MASKING
    """As pretrain's: each document of a packed window attends only to itself."""


class SftMethod(_Model):
    """Supervised fine-tuning of model.base_path on prompt/completion or chat records: the loss is on
    the completion and assistant tokens only; several examples are packed in one sequence, none
    attending to another."""

    kind: Literal["sft"] = "sft"


class DpoMethod(_Model):
    """Direct preference optimisation of model.base_path on (prompt, chosen, rejected) records; the
    frozen reference is the starting model, its log-probabilities computed once before the first step."""

    kind: Literal["dpo"] = "dpo"
    beta: float = Field(D.DPO_BETA, gt=0)
    """Strength of the preference: how far the policy may move from the reference."""
    loss_type: Literal["sigmoid", "ipo"] = D.DPO_LOSS_TYPE
    """sigmoid: standard DPO, -log sigmoid(beta x margin) on summed log-probabilities; ipo: (margin -
    1/(2 beta))^2 on per-token mean log-probabilities."""


class ExactMatchReward(_Model):
    """1.0 where the completion equals the reference in a column of the prompt record, else 0.0."""

    column: str
    """The prompt record's field holding the reference answer."""
    normalize: bool = True
    """Compare case-folded, with runs of whitespace made one space and surrounding whitespace and final
    punctuation removed; false: compare exactly."""
    extract: str | None = None
    """A regular expression with one group: compare what the group captures in the completion (its first
    match; no match scores 0.0) instead of the whole completion, e.g. `<answer>(.*?)</answer>`."""

    @field_validator("extract")
    @classmethod
    def _one_group(cls, v: str | None) -> str | None:
        return None if v is None else _regex(v, groups=1)


class RegexReward(_Model):
    """1.0 where every `must_match` pattern is found in the completion and no `must_not_match` one, else 0.0
    (Python regular expressions, searched anywhere: anchor them with ^ and $, and use (?s) to let . cross lines)."""

    must_match: list[str] = []
    """Patterns the completion must contain."""
    must_not_match: list[str] = []
    """Patterns the completion must not contain."""

    @model_validator(mode="after")
    def _check(self) -> RegexReward:
        if not self.must_match and not self.must_not_match:
            raise ValueError("a regex reward needs must_match or must_not_match patterns")
        for p in self.must_match + self.must_not_match:
            _regex(p)
        return self


class JsonSchemaReward(_Model):
    """1.0 where the completion is a JSON document valid against the schema, else 0.0."""

    json_schema: dict[str, Any] = Field(alias="schema")
    """The JSON Schema (any draft the `jsonschema` library knows; by its `$schema`, else the latest)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, populate_by_name=True,
                              serialize_by_alias=True)


class LengthReward(_Model):
    """1.0 where the completion's length in characters is within the limits, else 0.0."""

    min_chars: int | None = Field(None, ge=0)
    max_chars: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self) -> LengthReward:
        if self.min_chars is None and self.max_chars is None:
            raise ValueError("a length reward needs min_chars or max_chars")
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(f"length reward: min_chars {self.min_chars} exceeds max_chars {self.max_chars}")
        return self


class HttpReward(_Model):
    """A scoring service: the trainer POSTs a batch as JSON, `{"prompts": [...], "completions": [...], <column>:
    [...]}`, and reads back the scores, a JSON list of numbers (or `{"scores": [...]}`), one per completion."""

    url: str = Field(pattern=r"^https?://")
    """The service's endpoint, e.g. http://scorer.team.svc:8080/score."""
    timeout_seconds: float = Field(D.REWARD_HTTP_TIMEOUT_SECONDS, gt=0)
    """How long one request may take."""
    retries: int = Field(D.REWARD_HTTP_RETRIES, ge=0)
    """Further attempts after a failed request (refused, timed out, a 5xx answer), with a backoff;
    then the step fails."""


class RewardConfig(_Model):
    """One reward function and its weight: exactly one of `function`, `exact_match`, `regex`, `json_schema`,
    `length` or `http`. A completion's reward is the weighted sum over the functions."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Short name, used in the logs and the metrics (reward_<name>_mean)."""
    weight: float = 1.0
    """Its weight in the sum."""
    function: str | None = Field(None, pattern=r"^[^:]+\.py:[A-Za-z_][A-Za-z0-9_]*$")
    """A Python callable `path/to/module.py:function` with TRL's signature `f(prompts, completions, **columns) ->
    list[float]` (columns: the prompt record's other fields, one list each); a relative path is relative to
    the working directory. A score may be None where the function does not apply (it then adds nothing)."""
    exact_match: ExactMatchReward | None = None
    regex: RegexReward | None = None
    json_schema: JsonSchemaReward | None = None
    length: LengthReward | None = None
    http: HttpReward | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> RewardConfig:
        kinds = [k for k in REWARD_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"reward {self.name!r}: set exactly one of {', '.join(REWARD_KINDS)} (got "
                             f"{', '.join(kinds) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in REWARD_KINDS if getattr(self, k) is not None)


REWARD_KINDS = ("function", "exact_match", "regex", "json_schema", "length", "http")


def _regex(pattern: str, groups: int | None = None) -> str:
    import re

    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None
    if groups is not None and compiled.groups != groups:
        raise ValueError(f"regular expression {pattern!r} needs exactly {groups} group(s), has {compiled.groups}")
    return pattern


class _OnlineSampling(_Model):
    """What grpo and online-dpo share: the rewards and how completions are sampled from the policy."""

    rewards: list[RewardConfig] = Field(min_length=1)
    """The reward functions; a completion's reward is their weighted sum."""
    group_size: int = Field(D.GRPO_GROUP_SIZE, ge=2)
    """Completions sampled per prompt (a group). grpo: training.global_batch_sequences counts completions (a
    multiple of group_size x the workers); online-dpo: it counts the sequences of the pairs, two per prompt."""
    max_new_tokens: PositiveInt = D.GRPO_MAX_NEW_TOKENS
    """The longest completion; prompt + completion must fit in training.seq_len."""
    temperature: float = Field(D.GRPO_TEMPERATURE, gt=0)
    """Sampling temperature."""
    top_p: float = Field(D.GRPO_TOP_P, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: all)."""
    rollout: Literal["in-process"] = "in-process"
    """Where completions are generated: in-process = by the trainer's own workers with the current weights
    (batched generate with a key/value cache). A vLLM rollout worker is not available yet."""

    @model_validator(mode="after")
    def _unique_rewards(self) -> _OnlineSampling:
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"method.rewards names must be unique, got {names}")
        return self


class GrpoMethod(_OnlineSampling):
    """Group relative policy optimisation of model.base_path against reward functions: for each prompt a group
    of completions is sampled with the current weights and scored; each completion's advantage is its reward
    relative to its group's; the policy follows the clipped objective, optionally held near the frozen
    reference (the starting model) by a KL penalty."""

    kind: Literal["grpo"] = "grpo"
    beta: float = Field(D.GRPO_BETA, ge=0)
    """Weight of the KL penalty to the reference (the k3 estimator, as TRL); 0: no reference model is kept."""
    epsilon: float = Field(D.GRPO_EPSILON, gt=0, lt=1)
    """Clip range of the probability ratio: [1 - epsilon, 1 + epsilon]."""
    scale_rewards: bool = True
    """Divide each advantage by its group's reward standard deviation; false: only subtract the group mean
    (Dr. GRPO)."""
    updates_per_generation: PositiveInt = 1
    """Optimizer steps on each batch of sampled completions (TRL's num_iterations); above 1 the clipping acts."""


class OnlineDpoMethod(_OnlineSampling):
    """Online DPO of model.base_path against reward functions: for each prompt a group of completions is sampled
    with the current weights and scored; the best and the worst form a preference pair and the policy follows
    the DPO loss relative to the frozen reference (the starting model). A group whose completions all score
    the same gives no pair."""

    kind: Literal["online-dpo"] = "online-dpo"
    beta: float = Field(D.DPO_BETA, gt=0)
    """Strength of the preference: how far the policy may move from the reference."""
    loss_type: Literal["sigmoid", "ipo"] = D.DPO_LOSS_TYPE
    """As dpo's: sigmoid on summed log-probabilities, or ipo on per-token means."""


MethodConfig = Annotated[PretrainMethod | ContinuedPretrainMethod | SftMethod | DpoMethod | GrpoMethod | OnlineDpoMethod,
                         Field(discriminator="kind")]
"""One member per training method, told apart by `kind`; a method's own settings live beside it."""

RECORD_KINDS = {"sft": ("prompt-completion", "chat"), "dpo": ("preference",), "grpo": ("prompt",),
                "online-dpo": ("prompt",)}
"""The methods that read records, and the records each reads."""


class TrainerConfig(_Model):
    """Everything one training run needs."""

    run_name: str = "forge-run"
    """Shown in logs and recorded in provenance.json."""
    method: MethodConfig = PretrainMethod()
    """pretrain = from scratch; continued-pretrain = keep training model.base_path on new text;
    sft = fine-tune model.base_path on prompt/completion or chat records; dpo = align model.base_path
    with preference pairs (`{kind: dpo, beta: 0.1, loss_type: sigmoid}`); grpo and online-dpo = train
    model.base_path on its own sampled completions, scored by reward functions
    (`{kind: grpo, rewards: [{name: format, regex: {must_match: ["^<answer>"]}}], group_size: 8}`). A method without settings
    may be written as its kind alone (`method: pretrain`)."""
    model: ModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig(train=TokenizerTrainConfig())
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    output: OutputConfig = OutputConfig()
    cache_dir: str = "/cache"
    """Where prepared token shards and trained tokenizers are cached (keyed by data and tokenizer digests), and,
    under ``s3/``, the local copies of s3:// data and the checkpoints and exports on their way to S3. A local
    folder: not an s3:// URL."""
    metrics: MetricsConfig = MetricsConfig()
    egress: EgressConfig = EgressConfig()
    residency: ResidencyConfig | None = None
    """The regions and zones the workers were confined to; None: anywhere (or a local run)."""
    provenance: ProvenanceConfig = ProvenanceConfig()
    s3: S3Config = S3Config()
    """How to reach the store of the s3:// locations (unused without them)."""
    termination_message_path: str = DEFAULT_TERMINATION_MESSAGE_PATH
    """A one-line JSON summary is written here at exit (when its directory is writable)."""

    @model_validator(mode="before")
    @classmethod
    def _method_kind(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        method = data.get("method")
        kind = method if isinstance(method, str) else method.get("kind") if isinstance(method, dict) else None
        if isinstance(method, str):
            data = {**data, "method": {"kind": method}}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        if self.method.kind in ("continued-pretrain", "sft", "dpo", "grpo", "online-dpo") and self.model.base_path is None:
            raise ValueError(f"method {self.method.kind} needs model.base_path")
        if self.cache_dir.startswith("s3://"):
            raise ValueError("cache_dir must be a local folder (s3:// is for data, checkpoint.dir and output.dir)")
        self._check_records()
        if self.method.kind == "pretrain" and self.model.base_path is not None:
            raise ValueError("method pretrain builds a new model: use model.architecture (or method continued-pretrain)")
        if self.training.lora is not None and self.method.kind not in ("sft", "dpo"):
            raise ValueError(f"training.lora is only for methods sft and dpo (method is {self.method.kind})")
        if self.tokenizer.from_base and self.model.base_path is None:
            raise ValueError("tokenizer.from_base needs model.base_path")
        if self.training.precision == "fp8" and self.training.lora is not None:
            raise ValueError("training.precision fp8 does not combine with training.lora (the adapters and their "
                             "frozen base train in bf16): use bf16")
        arch = self.model.architecture
        if arch is not None and self.training.precision == "fp8" and (odd := D.fp8_misfits(
                arch.family, arch.hidden_size, arch.num_attention_heads, arch.num_key_value_heads,
                arch.intermediate_size)):
            raise ValueError(f"training.precision fp8 needs {D.FP8_DIMS}: {odd}")
        if arch is not None and self.training.seq_len > arch.max_position_embeddings:
            raise ValueError(
                f"training.seq_len {self.training.seq_len} exceeds the model's context "
                f"(model.architecture.max_position_embeddings {arch.max_position_embeddings})"
            )
        return self

    def _check_records(self) -> None:
        """sft and dpo read records from every source; the other methods read documents."""
        sources, kind = self.data.sources, self.method.kind
        if kind != "sft":
            alone = [s.name for s in sources if s.record_kind == "prompt"]
            if alone and kind not in ("grpo", "online-dpo"):
                raise ValueError(f"data source {alone[0]!r}: prompt_field and completion_field go together "
                                 "(a prompt alone is for methods grpo and online-dpo)")
        if kind in ("grpo", "online-dpo"):
            bare = [s.name for s in sources if s.record_kind != "prompt"]
            if bare:
                raise ValueError(f"method {kind} needs prompt records: data sources {bare} must set prompt_field only "
                                 "(no completion_field, messages_field, chosen_field or rejected_field)")
            if self.data.validation.source is not None:
                raise ValueError(f"method {kind} has no validation pass: data.validation.source is not supported "
                                 "(score held-out prompts with an evaluation's generation suite)")
            g, t = self.method.group_size, self.training
            if kind == "online-dpo":
                if t.global_batch_sequences % 2 or t.micro_batch_sequences % 2:
                    raise ValueError(f"method online-dpo trains pairs: training.global_batch_sequences "
                                     f"{t.global_batch_sequences} and micro_batch_sequences {t.micro_batch_sequences} "
                                     "(two sequences per prompt) must be even")
            elif t.global_batch_sequences % g:
                raise ValueError(f"training.global_batch_sequences {t.global_batch_sequences} (completions per step) is "
                                 f"not a multiple of method.group_size {g}")
            if self.method.max_new_tokens >= t.seq_len:
                raise ValueError(f"method.max_new_tokens {self.method.max_new_tokens} leaves no room for the prompt in "
                                 f"training.seq_len {t.seq_len}")
        elif kind == "sft":
            bare = [s.name for s in sources if s.record_kind not in RECORD_KINDS[kind]]
            if bare:
                raise ValueError(f"method sft needs records: data sources {bare} set neither messages_field nor "
                                 "prompt_field and completion_field")
        elif kind == "dpo":
            bare = [s.name for s in sources if s.record_kind not in RECORD_KINDS[kind]]
            if bare:
                raise ValueError(f"method dpo needs preference records: data sources {bare} do not set prompt_field, "
                                 "chosen_field and rejected_field")
        else:
            mixed = [s.name for s in sources if s.record_kind is not None]
            if mixed:
                raise ValueError(f"method {kind} reads documents: messages_field, prompt_field, completion_field, "
                                 f"chosen_field and rejected_field (data sources {mixed}) are for methods sft, dpo, "
                                 "grpo and online-dpo")
        if kind in RECORD_KINDS and self.tokenizer.train is not None:
            raise ValueError(f"method {kind} fine-tunes model.base_path with its own tokenizer: use tokenizer.from_base "
                             "(or tokenizer.path), not tokenizer.train")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path) -> TrainerConfig:
    """Read a TrainerConfig from YAML or JSON (JSON is YAML, but its error messages are better)."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return TrainerConfig.model_validate(data)


def validation_message(e: ValidationError) -> str:
    """A configuration's first validation error in one line: `where: what (and N more)`."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}{more}" if where else f"{message}{more}"
