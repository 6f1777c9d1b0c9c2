"""ForgeTraining: what to train, on what data, on which nodes, and how it is going."""

from __future__ import annotations

import re

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from .base import (
    Timestamp,
    ApiModel, Cel, Condition, DnsLabel, FreeForm, NetworkSpec, ObjectMeta, PathStr, PvcLocation,
    Quantity, ShortStr, StorageLocation, API_VERSION,
)
from . import defaults
from .enums import TRAINING_PHASES
from .rewards import (  # noqa: F401  (the reward models are part of this API)
    ConfigMapKey, ExactMatchRewardSpec, HttpRewardSpec, JsonSchemaRewardSpec, LengthRewardSpec, PythonRewardSpec,
    RegexRewardSpec, RewardSpec,
)
from .eval import NO_BASELINE_IN_TRAINING, SUITES_AND_GATES_RULES, EvalGate, EvalSuite

Method = Literal["pretrain", "continued-pretrain", "sft", "dpo", "grpo", "online-dpo"]
# Upper bounds of counts that have no natural one: far beyond any training, well inside int64.
MAX_STEPS = 10**9
MAX_TOKENS = 10**15  # a quadrillion tokens: some 30 times the largest public pretraining runs
MAX_BATCH_TOKENS = 2**30
MAX_SECONDS = 10**9  # some 30 years
METHODS_FROM_BASE = ("continued-pretrain", "sft", "dpo", "grpo", "online-dpo")
ONLINE_METHODS = ("grpo", "online-dpo")
"""The methods that sample completions and score them with spec.rewards."""


# --------------------------------------------------------------------------- model
class MoeSpec(ApiModel):
    """Mixture-of-experts layers (Qwen3-MoE style: routed experts, top-k routing)."""

    num_experts: Annotated[int, Field(ge=2, le=512)]
    """Routed experts per MoE layer."""
    num_experts_per_token: Annotated[int, Field(ge=1, le=64)]
    """Experts each token is routed to (top-k)."""
    expert_intermediate_size: Annotated[int, Field(ge=1, le=262144)] | None = None
    """Hidden size of each expert's MLP (default: intermediateSize / numExpertsPerToken)."""
    router_aux_loss_coef: Annotated[float, Field(ge=0, le=1)] = defaults.ROUTER_AUX_LOSS_COEF
    """Weight of the load-balancing loss that keeps the router spreading tokens."""

    cel_rules = (
        Cel("self.numExperts >= self.numExpertsPerToken",
            "numExperts must be >= numExpertsPerToken",
            lambda s: s.num_experts >= s.num_experts_per_token, field_path=".numExpertsPerToken"),
    )


class ArchitectureSpec(ApiModel):
    """A decoder-only transformer built from scratch (Llama-style dense, or mixture-of-experts)."""

    family: Literal["dense", "moe"] = defaults.FAMILY
    """dense (every token uses the whole MLP) or moe (tokens are routed to experts)."""
    num_layers: Annotated[int, Field(ge=1, le=512)]
    """Transformer blocks."""
    hidden_size: Annotated[int, Field(ge=8, le=65536)]
    """Model width (d_model)."""
    intermediate_size: Annotated[int, Field(ge=8, le=262144)] | None = None
    """Width of the MLP (default: about 8/3 x hiddenSize, rounded up to 64)."""
    num_attention_heads: Annotated[int, Field(ge=1, le=512)]
    """Attention heads; hiddenSize must be divisible by it."""
    num_key_value_heads: Annotated[int, Field(ge=1, le=512)] | None = None
    """Key/value heads for grouped-query attention (default: numAttentionHeads); must divide numAttentionHeads."""
    context_length: Annotated[int, Field(ge=16, le=1048576)] = defaults.CONTEXT_LENGTH
    """Longest sequence the model supports (max position embeddings)."""
    rope_theta: Annotated[float, Field(gt=0)] = defaults.ROPE_THETA
    """Base of the rotary position embedding."""
    tie_word_embeddings: bool = defaults.TIE_WORD_EMBEDDINGS
    """Share the input embedding and output projection weights."""
    experts: MoeSpec | None = None
    """Mixture-of-experts settings; required when family is moe, forbidden when dense."""

    cel_rules = (
        Cel("self.hiddenSize % self.numAttentionHeads == 0",
            "hiddenSize must be divisible by numAttentionHeads",
            lambda s: s.hidden_size % s.num_attention_heads == 0, field_path=".hiddenSize"),
        Cel("!has(self.numKeyValueHeads) || self.numAttentionHeads % self.numKeyValueHeads == 0",
            "numAttentionHeads must be divisible by numKeyValueHeads",
            lambda s: s.num_key_value_heads is None or s.num_attention_heads % s.num_key_value_heads == 0,
            field_path=".numKeyValueHeads"),
        Cel("has(self.family) && self.family == 'moe' ? has(self.experts) : !has(self.experts)",
            "experts is required when family is moe and forbidden when family is dense",
            lambda s: (s.experts is not None) == (s.family == "moe"), field_path=".experts"),
    )


class ModelSpec(ApiModel):
    """The model to train: a new architecture, or a base checkpoint to start from. Set exactly one."""

    architecture: ArchitectureSpec | None = None
    """Build a new model with random weights (method pretrain)."""
    base: StorageLocation | None = None
    """A Hugging Face-format checkpoint (config.json + safetensors) to continue from."""

    cel_rules = (
        Cel("has(self.architecture) != has(self.base)", "set exactly one of architecture or base",
            lambda s: (s.architecture is None) != (s.base is None)),
    )


# --------------------------------------------------------------------------- tokenizer
class TokenizerTrainSpec(ApiModel):
    """Train a byte-level BPE tokenizer on the training data before training starts."""

    vocab_size: Annotated[int, Field(ge=260, le=1048576)] = defaults.VOCAB_SIZE
    """Vocabulary size, special tokens included (at least 260: the 256 bytes plus the special tokens)."""


class TokenizerSpec(ApiModel):
    """Which tokenizer to use. Set exactly one of train, fromBase or source."""

    train: TokenizerTrainSpec | None = None
    """Train a new tokenizer on the data (what a from-scratch sovereign model needs)."""
    from_base: bool | None = None
    """Use the base model's tokenizer (requires model.base)."""
    source: StorageLocation | None = None
    """A Hugging Face tokenizer (tokenizer.json) stored elsewhere."""

    cel_rules = (
        Cel("[has(self.train), has(self.fromBase) && self.fromBase, has(self.source)]"
            ".filter(x, x).size() == 1",
            "set exactly one of train, fromBase or source",
            lambda s: [s.train is not None, bool(s.from_base), s.source is not None].count(True) == 1),
    )


# --------------------------------------------------------------------------- data
DataFormat = Literal["text", "jsonl", "parquet"]


class DataSource(ApiModel):
    """One body of training data. Several sources are mixed by weight."""

    name: DnsLabel
    """Name of the source, unique in the list (used in metrics and the provenance record)."""
    location: StorageLocation
    """Where the files are."""
    format: DataFormat = defaults.DATA_FORMAT
    """text (each file is a document), jsonl (one JSON object a line) or parquet."""
    include: Annotated[list[ShortStr], Field(max_length=32)] | None = None
    """Glob patterns of files to read, relative to the location (default by format: **/*.txt, **/*.jsonl, **/*.parquet)."""
    text_field: ShortStr | None = None
    """For jsonl/parquet pre-training data: the field holding the text (default: text)."""
    prompt_field: ShortStr | None = None
    """For sft and dpo: the field holding the prompt. For dpo it is text, or a conversation (a list of messages
    {role, content}) that the chosen and rejected answers continue as the next assistant turn. For grpo and
    online-dpo, alone: the prompt to sample completions for (text or a conversation); the record's other
    fields reach the reward functions as columns."""
    completion_field: ShortStr | None = None
    """For sft: the field holding the answer to learn."""
    messages_field: ShortStr | None = None
    """For sft chat data, instead of promptField and completionField: the field holding the conversation, a list
    of messages {role, content} with roles system, user and assistant; the loss is on the assistant turns."""
    chosen_field: ShortStr | None = None
    """For dpo, with promptField and rejectedField: the field holding the preferred answer (text)."""
    rejected_field: ShortStr | None = None
    """For dpo, with promptField and chosenField: the field holding the dispreferred answer (text)."""
    weight: Annotated[float, Field(gt=0, le=1000)] = defaults.SOURCE_WEIGHT
    """Relative sampling weight when mixing sources."""


class ValidationSpec(ApiModel):
    """Held-out data for the validation loss. Set exactly one of fraction or source."""

    fraction: Annotated[float, Field(gt=0, lt=0.5)] | None = None
    """Hold out this fraction of the training documents."""
    source: DataSource | None = None
    """A separate validation source."""

    cel_rules = (
        Cel("has(self.fraction) != has(self.source)", "set exactly one of fraction or source",
            lambda s: (s.fraction is None) != (s.source is None)),
    )


def _is_preference(s: DataSource) -> bool:
    return s.format != "text" and s.prompt_field is not None and s.chosen_field is not None \
        and s.rejected_field is not None and s.completion_field is None and s.messages_field is None


def _is_instruction(s: DataSource) -> bool:
    if s.format == "text" or s.chosen_field is not None or s.rejected_field is not None:
        return False
    if s.messages_field is not None:
        return s.prompt_field is None and s.completion_field is None
    return s.prompt_field is not None and s.completion_field is not None


_RECORDS = "has(s.format) && s.format != 'text'"
_PREFERENCE = " && ".join([_RECORDS, "has(s.promptField)", "has(s.chosenField)", "has(s.rejectedField)",
                           "!has(s.completionField)", "!has(s.messagesField)"])
_INSTRUCTION = (f"{_RECORDS} && !has(s.chosenField) && !has(s.rejectedField) && (has(s.messagesField) ? "
                "!has(s.promptField) && !has(s.completionField) : has(s.promptField) && has(s.completionField))")


def _is_prompt_set(s: DataSource) -> bool:
    return s.format != "text" and s.prompt_field is not None and s.completion_field is None \
        and s.messages_field is None and s.chosen_field is None and s.rejected_field is None


_PROMPTS = " && ".join([_RECORDS, "has(s.promptField)", "!has(s.completionField)", "!has(s.messagesField)",
                        "!has(s.chosenField)", "!has(s.rejectedField)"])


def _method_data_rules(method: str, what: str, pred: str, names: str, check) -> tuple[Cel, Cel]:
    """sft and dpo read records, not documents: every source, and a separate validation source, must
    be jsonl or parquet and name the fields of a record (``pred``, a CEL predicate of a source ``s``)."""
    validation = lambda sp: sp.data.validation.source if sp.data.validation else None  # noqa: E731
    return (
        Cel(f"self.method != '{method}' || self.data.sources.all(s, {pred})",
            f"method {method} needs {what}: every source jsonl or parquet with {names}",
            lambda sp: sp.method != method or all(check(x) for x in sp.data.sources), field_path=".data.sources"),
        Cel(f"self.method != '{method}' || !has(self.data.validation) || !has(self.data.validation.source)"
            f" || [self.data.validation.source].all(s, {pred})",
            f"method {method} needs {what}: the validation source jsonl or parquet with {names}",
            lambda sp: sp.method != method or validation(sp) is None or check(validation(sp)),
            field_path=".data.validation.source"),
    )


class DataSpec(ApiModel):
    """The training data."""

    sources: Annotated[list[DataSource], Field(min_length=1, max_length=16)]
    """One or more sources, mixed by weight."""
    validation: ValidationSpec | None = None
    """Held-out data for the validation loss (default: 1% of the training documents)."""

    cel_rules = (
        Cel("self.sources.all(a, self.sources.exists_one(b, b.name == a.name))",
            "source names must be unique",
            lambda s: len({x.name for x in s.sources}) == len(s.sources), field_path=".sources"),
    )


class SamplingSpec(ApiModel):
    """How grpo and online-dpo sample completions from the policy (in the trainer, with its current weights)."""

    group_size: Annotated[int, Field(ge=2, le=256)] = defaults.GRPO_GROUP_SIZE
    """Completions per prompt. grpo: globalBatch counts completions (a multiple of groupSize x GPUs);
    online-dpo: it counts the pairs' sequences, two per prompt."""
    max_new_tokens: Annotated[int, Field(ge=1, le=1048576)] = defaults.GRPO_MAX_NEW_TOKENS
    """The longest completion; the prompt and it must fit in sequenceLength."""
    temperature: Annotated[float, Field(gt=0, le=10)] = defaults.GRPO_TEMPERATURE
    """Sampling temperature."""
    top_p: Annotated[float, Field(gt=0, le=1)] = defaults.GRPO_TOP_P
    """Nucleus sampling (1: off)."""


class GrpoSpec(ApiModel):
    """GRPO's objective."""

    beta: Annotated[float, Field(ge=0, le=10)] = defaults.GRPO_BETA
    """Weight of the KL penalty to the reference (the starting model); 0: no reference is kept."""
    epsilon: Annotated[float, Field(gt=0, lt=1)] = defaults.GRPO_EPSILON
    """Clip range of the probability ratio."""
    scale_rewards: bool = True
    """Divide each advantage by its group's reward standard deviation; false: only subtract the group mean."""
    updates_per_generation: Annotated[int, Field(ge=1, le=64)] = 1
    """Optimizer steps on each batch of sampled completions."""


# --------------------------------------------------------------------------- training
class GlobalBatchSpec(ApiModel):
    """Global batch per optimizer step, over all GPUs. Set exactly one of sequences or tokens."""

    sequences: Annotated[int, Field(ge=1, le=1048576)] | None = None
    """Sequences per step."""
    tokens: Annotated[int, Field(ge=1, le=MAX_BATCH_TOKENS)] | None = None
    """Tokens per step (rounded down to whole sequences of sequenceLength)."""

    cel_rules = (
        Cel("has(self.sequences) != has(self.tokens)", "set exactly one of sequences or tokens",
            lambda s: (s.sequences is None) != (s.tokens is None)),
    )


class BudgetSpec(ApiModel):
    """When training ends. It ends gracefully (checkpoint, then export) at the first limit reached."""

    max_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    """Optimizer steps."""
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    """Training tokens seen."""
    deadline: Timestamp | None = None
    """Wall-clock time (RFC 3339) by which training stops."""
    max_gpu_hours: Annotated[float, Field(gt=0)] | None = None
    """GPU-hours consumed (numNodes x gpusPerNode x hours running, restarts included)."""

    cel_rules = (
        Cel("has(self.maxSteps) || has(self.maxTokens)", "set maxSteps or maxTokens (or both)",
            lambda s: s.max_steps is not None or s.max_tokens is not None),
    )


class LoraSpec(ApiModel):
    """LoRA (low-rank adapters, trained with peft): the base's weights stay frozen and only small adapter
    matrices beside the chosen linear layers train. For methods sft and dpo."""

    r: Annotated[int, Field(ge=1, le=4096)] = defaults.LORA_R
    """Rank of each adapter (peft's r)."""
    alpha: Annotated[float, Field(gt=0)] = defaults.LORA_ALPHA
    """Scaling: an adapter's update is multiplied by alpha / r (peft's lora_alpha)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = defaults.LORA_DROPOUT
    """Dropout on an adapter's input while training (peft's lora_dropout)."""
    target_modules: Annotated[list[Annotated[str, Field(min_length=1, max_length=253)]],
                              Field(min_length=1, max_length=64)] | None = None
    """Names (or name suffixes) of the linear layers that get adapters, e.g. [q_proj, v_proj] (peft's
    target_modules); default: every linear layer of the decoder but the output head (peft's all-linear)."""
    export: Literal["merged", "adapter"] = defaults.LORA_EXPORT
    """merged: the adapters merged into the base, exported as a plain model of the base's family; adapter:
    only the adapter, in peft's format (adapter_config.json + adapter_model.safetensors), to load with
    peft on top of the base."""


class TrainingSpec(ApiModel):
    """Hyperparameters and the budget."""

    sequence_length: Annotated[int, Field(ge=16, le=1048576)] = defaults.SEQUENCE_LENGTH
    """Tokens per training sequence (documents are packed, separated by an end-of-text token)."""
    global_batch: GlobalBatchSpec = GlobalBatchSpec(sequences=defaults.GLOBAL_BATCH_SEQUENCES)
    """Global batch per optimizer step."""
    micro_batch_size: Annotated[int, Field(ge=1, le=4096)] = defaults.MICRO_BATCH_SIZE
    """Sequences per GPU per forward pass; gradient accumulation makes up the global batch."""
    learning_rate: Annotated[float, Field(gt=0, le=1)] = defaults.LEARNING_RATE
    """Peak learning rate."""
    min_learning_rate: Annotated[float, Field(ge=0, le=1)] | None = None
    """Learning rate at the end of the schedule (default: learningRate / 10)."""
    schedule: Literal["cosine", "wsd", "constant"] = defaults.SCHEDULE
    """cosine decay, wsd (warmup-stable-decay) or constant, each after warmup."""
    warmup_steps: Annotated[int, Field(ge=0, le=MAX_STEPS)] = defaults.WARMUP_STEPS
    """Linear warmup steps."""
    decay_fraction: Annotated[float, Field(gt=0, le=1)] = defaults.DECAY_FRACTION
    """For wsd: fraction of the steps spent decaying at the end."""
    weight_decay: Annotated[float, Field(ge=0, le=10)] = defaults.WEIGHT_DECAY
    """AdamW weight decay."""
    gradient_clipping: Annotated[float, Field(ge=0)] = defaults.GRADIENT_CLIPPING
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    precision: Literal["auto", "bf16", "fp32", "fp8"] = defaults.PRECISION
    """auto: bf16 on GPUs, fp32 on CPUs. fp8: bf16, but the linear layers of the transformer blocks (attention
    projections, dense MLPs) multiply in FP8 with dynamic tensorwise scaling (torchao's Float8Linear; their
    weights are all-gathered in FP8); the embeddings, the output head, the MoE routers and the MoE experts stay
    in bf16. Needs GPUs of compute capability 8.9 or later (L4, L40S, H100, H200, B200; refused at start
    otherwise), widths of those layers that are multiples of 16, and no lora."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = defaults.SEED
    """Seed for initialisation, data order and dropout."""
    compile: bool | None = None
    """Compile each transformer block with torch.compile (default: on GPUs, off on CPUs). Compiling takes
    time at the start of every run, a resumed one too, and makes every step after it faster; true or
    false decides for every device."""
    activation_checkpointing: Literal["none", "selective", "full"] = defaults.ACTIVATION_CHECKPOINTING
    """Per transformer block: none keeps every activation for the backward pass; selective keeps the outputs
    of matrix products and attention and recomputes the rest (norms, activation functions: little compute,
    many bytes); full keeps only each block's input and recomputes the block (about a third more compute,
    the least memory)."""
    sharding: Literal["FullShard", "HybridShard"] = defaults.SHARDING
    """How the weights, gradients and optimizer state are spread over the workers (FSDP2, also on one GPU):
    FullShard shards them over every GPU of every node; HybridShard shards them over the GPUs of each node
    and replicates them across the nodes (HSDP: the gathers stay inside a node, only the gradient
    all-reduce crosses nodes; each GPU holds numNodes times more than with FullShard). HybridShard needs
    resources.numNodes of 2 or more."""
    document_masking: bool = defaults.DOCUMENT_MASKING
    """For pretrain and continued-pretrain: each token attends only to the tokens of its own document in a
    packed sequence (positions restart after each end-of-text token), not to the documents packed before
    it. sft, dpo and the online methods never attend across examples."""
    eval_interval_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = defaults.EVAL_INTERVAL_STEPS
    """Compute the validation loss every this many steps (and at the end)."""
    budget: BudgetSpec
    """When to stop: at least maxSteps or maxTokens."""
    dpo_beta: Annotated[float, Field(gt=0, le=10)] | None = None
    """For dpo: strength of the preference (beta), default 0.1."""
    dpo_loss_type: Literal["sigmoid", "ipo"] | None = None
    """For dpo: sigmoid (standard DPO, on summed log-probabilities) or ipo (squared loss on per-token mean
    log-probabilities), default sigmoid."""
    sampling: SamplingSpec | None = None
    """For grpo and online-dpo: how completions are sampled (default: groupSize 8, maxNewTokens 256)."""
    grpo: GrpoSpec | None = None
    """For grpo: the objective's settings."""
    lora: LoraSpec | None = None
    """For sft and dpo: train LoRA adapters instead of every weight; left out: full fine-tuning."""

    cel_rules = (
        Cel("!has(self.precision) || self.precision != 'fp8' || !has(self.lora)",
            "training.precision fp8 does not combine with training.lora (the adapters and their frozen base train "
            "in bf16): use bf16",
            lambda s: s.precision != "fp8" or s.lora is None, field_path=".precision"),
        Cel("!has(self.minLearningRate)"
            f" || self.minLearningRate <= (has(self.learningRate) ? self.learningRate : {defaults.LEARNING_RATE})",
            "minLearningRate must be <= learningRate",
            lambda s: s.min_learning_rate is None or s.min_learning_rate <= s.learning_rate,
            field_path=".minLearningRate"),
    )


# --------------------------------------------------------------------------- resources
# Environment variables the operator, torchrun or the Job controller set in the trainer container: env may not
# set these (the workers would not find each other, or report as another pod).
RESERVED_ENV_NAMES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE",
                      "LOCAL_WORLD_SIZE", "ROLE_WORLD_SIZE", "JOB_COMPLETION_INDEX")
RESERVED_ENV_PREFIXES = ("FORGE_", "TORCHELASTIC_")
_RESERVED_ENV_WORDS = (f"{', '.join(RESERVED_ENV_NAMES)} and names starting with {', '.join(RESERVED_ENV_PREFIXES)} "
                       "are set by the operator, torchrun or the Job controller")
_CEL_ENV_OK = " && ".join(["!(e.name in [" + ", ".join(f"'{n}'" for n in RESERVED_ENV_NAMES) + "])",
                           *(f"!e.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES)])


# core/v1 EnvVar, free-form but for its name, which the API server's rules read
EnvVar = Annotated[dict[str, Any], Field(json_schema_extra={
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {"name": {"type": "string", "maxLength": 256, "description": "Name of the variable."}}})]


def _env_not_reserved(env: list[dict] | None) -> bool:
    names = [e.get("name") for e in env or [] if isinstance(e.get("name"), str)]
    return not any(n in RESERVED_ENV_NAMES or n.startswith(RESERVED_ENV_PREFIXES) for n in names)


ENV_RULE = Cel(f"!has(self.env) || self.env.all(e, !has(e.name) || ({_CEL_ENV_OK}))", _RESERVED_ENV_WORDS,
               lambda s: _env_not_reserved(s.env), field_path=".env")


class ResourcesSpec(ApiModel):
    """Nodes, GPUs and pod settings of the workers. Editable: a change restarts from the last checkpoint."""

    num_nodes: Annotated[int, Field(ge=1, le=4096)] = defaults.NUM_NODES
    """Worker pods, one per node; each runs torchrun with gpusPerNode processes."""
    gpus_per_node: Annotated[int, Field(ge=0, le=16)] = defaults.GPUS_PER_NODE
    """GPUs per node (0 trains on CPU, for tests and trials)."""
    gpu_resource_name: ShortStr = defaults.GPU_RESOURCE_NAME
    """Extended resource that counts GPUs (e.g. amd.com/gpu)."""
    cpu: Quantity | None = None
    """CPU request and limit per node, e.g. "32"."""
    memory: Quantity | None = None
    """Memory request and limit per node, e.g. "512Gi"."""
    shm_size: Quantity = defaults.SHM_SIZE
    """Size of the memory-backed /dev/shm (data loaders and NCCL need more than the default 64Mi)."""
    node_selector: dict[str, ShortStr] | None = None
    """Node labels the workers must run on (pin training to the nodes that may hold the data)."""
    tolerations: Annotated[list[FreeForm], Field(max_length=64)] | None = None
    """Pod tolerations (core/v1 Toleration). A toleration for the GPU resource taint is added for you."""
    affinity: FreeForm | None = None
    """Pod affinity (core/v1 Affinity)."""
    priority_class_name: DnsLabel | None = None
    """PriorityClass of the worker pods."""
    service_account_name: DnsLabel | None = None
    """ServiceAccount of the workers (default: forge-trainer-<name>, which the operator creates). Rank 0 reports
    progress by patching its own pod: grant this account get and patch on pods, or the status shows no progress."""
    image: Annotated[str, Field(max_length=1024)] | None = None
    """Trainer image (default: the one the operator was installed with)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """Image pull policy of the trainer container."""
    image_pull_secrets: Annotated[list[DnsLabel], Field(max_length=16)] | None = None
    """Names of Secrets for pulling the image from a private registry."""
    env: Annotated[list[EnvVar], Field(max_length=256)] | None = None
    """Extra environment variables (core/v1 EnvVar) for the trainer container."""
    volumes: Annotated[list[FreeForm], Field(max_length=64)] | None = None
    """Extra pod volumes (core/v1 Volume)."""
    volume_mounts: Annotated[list[FreeForm], Field(max_length=64)] | None = None
    """Extra volume mounts (core/v1 VolumeMount) for the trainer container."""
    termination_grace_period_seconds: Annotated[int, Field(ge=30, le=86400)] = defaults.TERMINATION_GRACE_PERIOD_SECONDS
    """Time a worker gets after SIGTERM to write its checkpoint before it is killed."""

    cel_rules = (ENV_RULE,)


# Labels and annotations on worker pods that the operator sets and reads (its children are found by them):
# a podTemplate may not set these.
RESERVED_POD_KEYS = ("app.kubernetes.io/managed-by", "app.kubernetes.io/name")
RESERVED_POD_PREFIXES = ("forge.dev/", "batch.kubernetes.io/")
_CEL_RESERVED = " && ".join([*(f"k != '{k}'" for k in RESERVED_POD_KEYS),
                             *(f"!k.startsWith('{p}')" for p in RESERVED_POD_PREFIXES)])
_RESERVED_WORDS = (f"{', '.join(RESERVED_POD_KEYS)} and keys under {', '.join(RESERVED_POD_PREFIXES)} "
                   "are the operator's")


def _not_reserved(keys) -> bool:
    return not any(k in RESERVED_POD_KEYS or k.startswith(RESERVED_POD_PREFIXES) for k in keys)




class PodTemplateMetadata(ApiModel):
    """Labels and annotations added to every worker pod."""

    labels: Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(max_length=64)] | None = None
    """Labels added to the worker pods (e.g. for a NetworkPolicy or a cost report)."""
    annotations: Annotated[dict[str, Annotated[str, Field(max_length=4096)]], Field(max_length=64)] | None = None
    """Annotations added to the worker pods (e.g. a CNI's extra networks: k8s.v1.cni.cncf.io/networks)."""

    cel_rules = (
        Cel(f"!has(self.labels) || self.labels.all(k, {_CEL_RESERVED})", _RESERVED_WORDS,
            lambda s: _not_reserved(s.labels or {}), field_path=".labels"),
        Cel(f"!has(self.annotations) || self.annotations.all(k, {_CEL_RESERVED})",
            _RESERVED_WORDS, lambda s: _not_reserved(s.annotations or {}),
            field_path=".annotations"),
    )


class PodTemplateSpec(ApiModel):
    """What the worker pods get on top of what the operator builds (docs/operator.md, "Pod template")."""

    metadata: PodTemplateMetadata | None = None
    """Labels and annotations added to the worker pods."""
    security_context: FreeForm | None = None
    """Pod securityContext (core/v1 PodSecurityContext), merged field by field over the operator's restricted
    default (runAsNonRoot, runAsUser/runAsGroup/fsGroup 10001, seccompProfile RuntimeDefault): a field set
    here wins (e.g. the uid your storage expects, supplementalGroups)."""
    container_security_context: FreeForm | None = None
    """The trainer container's securityContext (core/v1 SecurityContext), merged field by field over the
    default (allowPrivilegeEscalation false, capabilities drop ALL): a field set here wins, e.g.
    capabilities {add: [IPC_LOCK], drop: [ALL]} for RDMA."""
    extended_resources: Annotated[dict[str, Quantity], Field(max_length=16)] | None = None
    """Extended resources each worker requests and is limited to besides its GPUs, e.g.
    {rdma/hca_shared_devices_a: 1} for an RDMA device plugin. Not cpu, memory or the GPU resource
    (resources.cpu, resources.memory, resources.gpusPerNode say those)."""
    node_selector: dict[str, ShortStr] | None = None
    """Node labels the workers must run on (or resources.nodeSelector, not both)."""
    tolerations: Annotated[list[FreeForm], Field(max_length=64)] | None = None
    """Pod tolerations (core/v1 Toleration); a toleration for the GPU resource taint is added for you (or
    resources.tolerations, not both)."""
    affinity: FreeForm | None = None
    """Pod affinity (core/v1 Affinity); spec.residency and nodes kept out after failures are added to its
    required node selector terms (or resources.affinity, not both)."""
    volumes: Annotated[list[FreeForm], Field(max_length=64)] | None = None
    """Extra pod volumes (core/v1 Volume) (or resources.volumes, not both)."""
    volume_mounts: Annotated[list[FreeForm], Field(max_length=64)] | None = None
    """Extra volume mounts (core/v1 VolumeMount) of the trainer container (or resources.volumeMounts, not both)."""
    env: Annotated[list[EnvVar], Field(max_length=256)] | None = None
    """Extra environment variables (core/v1 EnvVar) of the trainer container (or resources.env, not both)."""
    image_pull_secrets: Annotated[list[DnsLabel], Field(max_length=16)] | None = None
    """Names of Secrets for pulling the image from a private registry (or resources.imagePullSecrets, not both)."""

    cel_rules = (
        ENV_RULE,
        Cel("!has(self.extendedResources) || self.extendedResources.all(k, k != 'cpu' && k != 'memory')",
            "cpu and memory are set by resources.cpu and resources.memory",
            lambda s: not ({"cpu", "memory"} & set(s.extended_resources or {})), field_path=".extendedResources"),
    )


# A label value (what a node's topology.kubernetes.io/region or /zone label holds), never empty.
LabelValue = Annotated[str, Field(min_length=1, max_length=63,
                                  pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")]


class ResidencySpec(ApiModel):
    """Where the workers may run, by the nodes' well-known topology labels: a node qualifies when its
    topology.kubernetes.io/region is one of regions (if given) and its topology.kubernetes.io/zone one
    of zones (if given). Becomes required node affinity on the workers, and is recorded in the trainer's
    configuration (its provenance)."""

    regions: Annotated[list[LabelValue], Field(min_length=1, max_length=64)] | None = None
    """Allowed regions (values of the node label topology.kubernetes.io/region), e.g. [eu-west-1]."""
    zones: Annotated[list[LabelValue], Field(min_length=1, max_length=256)] | None = None
    """Allowed zones (values of the node label topology.kubernetes.io/zone), e.g. [eu-west-1a, eu-west-1b]."""

    cel_rules = (
        Cel("has(self.regions) || has(self.zones)", "residency needs regions, zones or both",
            lambda s: bool(s.regions or s.zones)),
    )


class SchedulingSpec(ApiModel):
    """Queueing and suspension."""

    queue_name: DnsLabel | None = None
    """Kueue LocalQueue; the workers are created suspended and start when Kueue admits them."""
    suspend: bool = defaults.SUSPEND
    """Stop the workers (they write a checkpoint first); unset to resume from it."""


class CheckpointSpec(ApiModel):
    """Periodic checkpoints, from which restarts and resumes continue."""

    location: StorageLocation
    """Where checkpoints are written: a claim shared by all nodes (ReadWriteMany for several nodes), or an
    S3 prefix (each node stages its shards on local scratch and uploads them; a checkpoint is complete
    once its trainer_state.json is uploaded, last)."""
    interval_steps: Annotated[int, Field(ge=0, le=MAX_STEPS)] = defaults.CHECKPOINT_INTERVAL_STEPS
    """Write a checkpoint every this many steps; 0: not by steps."""
    interval_minutes: Annotated[int, Field(ge=0, le=10080)] = defaults.CHECKPOINT_INTERVAL_MINUTES
    """Write a checkpoint at least this often, in minutes of training; 0: not by time."""
    keep_last: Annotated[int, Field(ge=1, le=1000)] = defaults.CHECKPOINT_KEEP_LAST
    """Checkpoints kept; older ones are deleted after a newer one is complete."""
    resume_from: PathStr | None = None
    """Start from this checkpoint folder (relative to the location) instead of the latest one; restarts of
    this training continue from the checkpoints it writes from there, not from this one again."""
    retain_after_success: Literal["All", "Last", "None"] = defaults.CHECKPOINT_RETAIN_AFTER_SUCCESS
    """What stays once the model is exported: All (the keepLast newest), Last (the final checkpoint only) or
    None (every checkpoint deleted; the training cannot be continued from them)."""


class FailurePolicySpec(ApiModel):
    """What happens when a worker fails: the whole group restarts from the last checkpoint."""

    max_restarts: Annotated[int, Field(ge=0, le=1000)] = defaults.MAX_RESTARTS
    """Group restarts allowed before the training is Failed."""
    backoff_seconds: Annotated[int, Field(ge=0, le=3600)] = defaults.BACKOFF_SECONDS
    """Wait before the first restart; doubles on each restart."""
    max_backoff_seconds: Annotated[int, Field(ge=0, le=86400)] = defaults.MAX_BACKOFF_SECONDS
    """Upper bound of the wait between restarts."""
    non_retryable_exit_codes: Annotated[list[Annotated[int, Field(ge=1, le=255)]], Field(max_length=64)] | None = None
    """Trainer exit codes that fail the training at once (65 data error and 78 configuration error always do)."""
    node_failure_timeout_seconds: Annotated[int, Field(ge=1, le=86400)] = defaults.NODE_FAILURE_TIMEOUT_SECONDS
    """A node NotReady, or a worker stuck terminating, for this long counts as a failure."""
    stall_timeout_seconds: Annotated[int, Field(ge=0, le=86400)] = defaults.STALL_TIMEOUT_SECONDS
    """Set the Stalled condition when the step has not advanced for this long while Running; 0: never."""
    rendezvous_timeout_seconds: Annotated[int, Field(ge=60, le=86400)] = defaults.RENDEZVOUS_TIMEOUT_SECONDS
    """How long the workers that started wait for the others (an image pull, a volume attach) before
    the attempt fails with reason RendezvousTimeout, which counts as a failure and restarts the group."""

    cel_rules = (
        Cel("!has(self.stallTimeoutSeconds) || self.stallTimeoutSeconds == 0 || self.stallTimeoutSeconds >= 60",
            "failurePolicy.stallTimeoutSeconds must be 0 (never) or at least 60",
            lambda s: s.stall_timeout_seconds == 0 or s.stall_timeout_seconds >= 60,
            field_path=".stallTimeoutSeconds"),
    )


class OutputSpec(ApiModel):
    """Where the final model goes (Hugging Face format plus a provenance record)."""

    location: StorageLocation
    """Folder for the exported model: a folder inside the volume, never its root (the model is written
    beside it under a temporary name and renamed into place when complete); or an S3 prefix, never a
    bucket's root (the export replaces every object under it, provenance.json uploaded last)."""
    file_mode: Annotated[int, Field(ge=0, le=0o777)] = defaults.OUTPUT_FILE_MODE
    """Permission bits of the exported files, as a volume's defaultMode: octal in YAML (0640) or decimal in JSON
    (416). Its folders get the same bits plus search where readable (0644 -> 0755, 0640 -> 0750)."""

    cel_rules = (
        Cel("!has(self.location.pvc) || (has(self.location.pvc.path) && self.location.pvc.path.matches('[^/.]'))",
            "the model is exported into a folder inside the volume: set a path (not the volume root)",
            lambda s: s.location.pvc is None or any(ch not in "/." for ch in s.location.pvc.path),
            field_path=".location.pvc.path"),
        Cel("!has(self.location.s3) || self.location.s3.uri.matches('^s3://[^/]+/.*[^/]')",
            "the model is exported under a prefix of the bucket: set one (s3://bucket/prefix, not the bucket's root)",
            lambda s: s.location.s3 is None or re.match(r"^s3://[^/]+/.*[^/]", s.location.s3.uri) is not None,
            field_path=".location.s3.uri"),
    )


class SigningKeySecret(ApiModel):
    """A Secret in the training's namespace holding an Ed25519 private key, PEM, unencrypted (made with
    `openssl genpkey -algorithm ed25519 -out private.pem` and `kubectl create secret generic NAME
    --from-file=private.pem`)."""

    name: DnsLabel
    """Name of the Secret."""
    key: Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)] = defaults.SIGNING_KEY
    """The Secret's key that holds the private key."""


class ProvenanceSpec(ApiModel):
    """The provenance record written beside the exported model (provenance.json): data, config, image,
    nodes, times, the base model's record and the hash of every exported file."""

    signing_key_secret: SigningKeySecret | None = None
    """Sign the record with this key (Ed25519, a detached provenance.json.sig); the Secret is mounted
    read-only into the worker pods and only rank 0 reads it. Left out: the record says it is unsigned."""


class TrainingEvaluationSpec(ApiModel):
    """Evaluate the final model when training completes; the result is written back and can gate it."""

    suites: Annotated[list[EvalSuite], Field(min_length=1, max_length=32)]
    """Evaluation suites to run (see ForgeEval)."""
    gates: Annotated[list[EvalGate], Field(max_length=32)] | None = None
    """Thresholds the model must meet; a failed gate fails the training with reason EvaluationGateFailed."""

    cel_rules = SUITES_AND_GATES_RULES + (
        Cel("!has(self.gates) || self.gates.all(g, !has(g.maxDrop))", NO_BASELINE_IN_TRAINING,
            lambda s: all(g.max_drop is None for g in s.gates or []), field_path=".gates"),
    )


def _cel_dir(pvc: str) -> str:
    """A PVC location's path in CEL as '/a/b/' (one slash at each end), so that folders compare by prefix."""
    return f"('/' + (has({pvc}.path) ? {pvc}.path : '') + '/').replace('//', '/')"


def _dir(path: str) -> str:
    return ("/" + path + "/").replace("//", "/")


def _cel_s3_dir(s3: str) -> str:
    """An S3 location's URI in CEL with one slash at its end, so that prefixes compare as folders."""
    return f"({s3}.uri.endsWith('/') ? {s3}.uri : {s3}.uri + '/')"


def _s3_dir(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


# the pod settings podTemplate takes and resources took first: API name -> field
POD_SETTINGS = {"nodeSelector": "node_selector", "tolerations": "tolerations", "affinity": "affinity",
                "volumes": "volumes", "volumeMounts": "volume_mounts", "env": "env",
                "imagePullSecrets": "image_pull_secrets"}


_A = "self.model.architecture"
_CEL_FP8_DIMS = (
    f"!has(self.training.precision) || self.training.precision != 'fp8' || !has({_A}) || ("
    f"{_A}.hiddenSize % {defaults.FP8_MULTIPLE} == 0"
    f" && ((has({_A}.numKeyValueHeads) ? {_A}.numKeyValueHeads : {_A}.numAttentionHeads)"
    f" * ({_A}.hiddenSize / {_A}.numAttentionHeads)) % {defaults.FP8_MULTIPLE} == 0"
    f" && ((has({_A}.family) && {_A}.family == 'moe') || !has({_A}.intermediateSize)"
    f" || {_A}.intermediateSize % {defaults.FP8_MULTIPLE} == 0))"
)
"""training.precision fp8 and a new model: the widths of its FP8 linear layers are multiples of 16
(defaults.fp8_misfits; left out, intermediateSize defaults to a multiple of 64)."""


class ForgeTrainingSpec(ApiModel):
    """Desired state of a ForgeTraining."""

    method: Method
    """pretrain (from scratch), continued-pretrain, sft (supervised fine-tuning), dpo (preference alignment), grpo
    or online-dpo (reinforcement learning against spec.rewards)."""
    model: ModelSpec
    """The architecture to build, or the base checkpoint to start from."""
    tokenizer: TokenizerSpec
    """Train a tokenizer on the data, or take the base model's."""
    data: DataSpec
    """Training (and validation) data."""
    training: TrainingSpec
    """Hyperparameters and budget."""
    resources: ResourcesSpec = ResourcesSpec()
    """Nodes, GPUs and pod settings."""
    pod_template: PodTemplateSpec | None = None
    """What the worker pods get besides what the operator builds: labels, annotations, security contexts,
    extended resources, node selector, tolerations, affinity, volumes, environment, image pull secrets."""
    scheduling: SchedulingSpec = SchedulingSpec()
    """Queueing and suspension."""
    residency: ResidencySpec | None = None
    """The regions and/or zones the workers must run in (data residency); a training no node there can
    run stays Pending with condition PodsReady False, reason ResidencyUnsatisfiable."""
    network: NetworkSpec = NetworkSpec()
    """What the workers (and the evaluation of spec.evaluation) may reach: an egress lock in the trainer and a
    NetworkPolicy."""
    checkpoint: CheckpointSpec
    """Checkpoint storage and frequency."""
    failure_policy: FailurePolicySpec = FailurePolicySpec()
    """Restarts, backoff and non-retryable exit codes."""
    output: OutputSpec
    """Where the final model is exported."""
    provenance: ProvenanceSpec = ProvenanceSpec()
    """How the exported model's provenance record is signed."""
    evaluation: TrainingEvaluationSpec | None = None
    """Evaluate the final model and gate on the result."""
    rewards: Annotated[list[RewardSpec], Field(max_length=16)] | None = None
    """For grpo and online-dpo (required): the reward functions that score the sampled completions."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0, le=MAX_SECONDS)] | None = None
    """Delete the workers (never this resource) this long after it finished."""

    def pod_setting(self, field: str) -> Any:
        """A pod setting that podTemplate and (for older specs) resources both take: podTemplate's, else
        resources' (admission refuses both)."""
        value = getattr(self.pod_template, field) if self.pod_template is not None else None
        return value if value is not None else getattr(self.resources, field)

    cel_rules = (
        *(Cel(f"!has(self.podTemplate) || !has(self.podTemplate.{name}) || !has(self.resources) || "
              f"!has(self.resources.{name})", f"set podTemplate.{name} or resources.{name}, not both",
              lambda s, f=field: s.pod_template is None or getattr(s.pod_template, f) is None
              or getattr(s.resources, f) is None, field_path=f".podTemplate.{name}")
          for name, field in POD_SETTINGS.items()),
        Cel("!has(self.podTemplate) || !has(self.podTemplate.extendedResources) || !((has(self.resources) && "
            f"has(self.resources.gpuResourceName) ? self.resources.gpuResourceName : '{defaults.GPU_RESOURCE_NAME}')"
            " in self.podTemplate.extendedResources)",
            "the GPU resource is set by resources.gpusPerNode",
            lambda s: s.pod_template is None or s.resources.gpu_resource_name not in (s.pod_template.extended_resources or {}),
            field_path=".podTemplate.extendedResources"),
        Cel("self.method == 'pretrain' ? has(self.model.architecture) : has(self.model.base)",
            "method pretrain needs model.architecture; continued-pretrain, sft and dpo need model.base",
            lambda s: (s.model.architecture is not None) if s.method == "pretrain" else (s.model.base is not None),
            field_path=".model"),
        Cel("!has(self.tokenizer.fromBase) || !self.tokenizer.fromBase || has(self.model.base)",
            "tokenizer.fromBase needs model.base",
            lambda s: not s.tokenizer.from_base or s.model.base is not None, field_path=".tokenizer"),
        Cel("!has(self.model.architecture) || (has(self.training.sequenceLength) ? self.training.sequenceLength : "
            f"{defaults.SEQUENCE_LENGTH}) <= (has(self.model.architecture.contextLength) ? "
            f"self.model.architecture.contextLength : {defaults.CONTEXT_LENGTH})",
            "training.sequenceLength must not exceed model.architecture.contextLength",
            lambda s: s.model.architecture is None
            or s.training.sequence_length <= s.model.architecture.context_length,
            field_path=".training.sequenceLength"),
        Cel(_CEL_FP8_DIMS, f"training.precision fp8 needs {defaults.FP8_DIMS}",
            lambda s: s.training.precision != "fp8" or s.model.architecture is None or not defaults.fp8_misfits(
                s.model.architecture.family, s.model.architecture.hidden_size, s.model.architecture.num_attention_heads,
                s.model.architecture.num_key_value_heads, s.model.architecture.intermediate_size),
            field_path=".training.precision"),
        *_method_data_rules("dpo", "preference data", _PREFERENCE,
                            "promptField, chosenField and rejectedField (no completionField or messagesField)",
                            _is_preference),
        *_method_data_rules("sft", "instruction data", _INSTRUCTION,
                            "promptField and completionField, or messagesField alone (no chosenField or rejectedField)",
                            _is_instruction),
        Cel("self.method == 'pretrain' || self.method == 'continued-pretrain' || !has(self.tokenizer.train)",
            "methods sft, dpo, grpo and online-dpo fine-tune model.base with its own tokenizer: set "
            "tokenizer.fromBase (or tokenizer.source)",
            lambda s: s.method in ("pretrain", "continued-pretrain") or s.tokenizer.train is None,
            field_path=".tokenizer"),
        Cel("self.method == 'dpo' || self.method == 'online-dpo' || !has(self.training.dpoBeta)",
            "training.dpoBeta is only for methods dpo and online-dpo",
            lambda s: s.method in ("dpo", "online-dpo") or s.training.dpo_beta is None, field_path=".training.dpoBeta"),
        Cel("self.method == 'dpo' || self.method == 'online-dpo' || !has(self.training.dpoLossType)",
            "training.dpoLossType is only for methods dpo and online-dpo",
            lambda s: s.method in ("dpo", "online-dpo") or s.training.dpo_loss_type is None,
            field_path=".training.dpoLossType"),
        *_method_data_rules("grpo", "prompt records", _PROMPTS, "promptField alone", _is_prompt_set),
        *_method_data_rules("online-dpo", "prompt records", _PROMPTS, "promptField alone", _is_prompt_set),
        Cel("(self.method == 'grpo' || self.method == 'online-dpo') == (has(self.rewards) && size(self.rewards) > 0)",
            "methods grpo and online-dpo need rewards; the other methods take none",
            lambda s: (s.method in ONLINE_METHODS) == bool(s.rewards), field_path=".rewards"),
        Cel("!has(self.rewards) || self.rewards.all(a, self.rewards.exists_one(b, b.name == a.name))",
            "reward names must be unique",
            lambda s: not s.rewards or len({r.name for r in s.rewards}) == len(s.rewards), field_path=".rewards"),
        Cel("self.method == 'grpo' || self.method == 'online-dpo' || !has(self.training.sampling)",
            "training.sampling is only for methods grpo and online-dpo",
            lambda s: s.method in ONLINE_METHODS or s.training.sampling is None, field_path=".training.sampling"),
        Cel("self.method == 'grpo' || !has(self.training.grpo)", "training.grpo is only for method grpo",
            lambda s: s.method == "grpo" or s.training.grpo is None, field_path=".training.grpo"),
        Cel("!has(self.training.sharding) || self.training.sharding != 'HybridShard' || "
            f"(has(self.resources) && has(self.resources.numNodes) ? self.resources.numNodes : {defaults.NUM_NODES}) >= 2",
            "training.sharding HybridShard replicates across nodes and needs resources.numNodes of 2 or more; "
            "on one node use FullShard",
            lambda s: s.training.sharding != "HybridShard" or s.resources.num_nodes >= 2,
            field_path=".training.sharding"),
        Cel("self.method == 'pretrain' || self.method == 'continued-pretrain' || !has(self.training.documentMasking)"
            " || !self.training.documentMasking",
            "training.documentMasking is only for methods pretrain and continued-pretrain (the other methods "
            "never attend across examples)",
            lambda s: s.method in ("pretrain", "continued-pretrain") or not s.training.document_masking,
            field_path=".training.documentMasking"),
        Cel("self.method == 'sft' || self.method == 'dpo' || !has(self.training.lora)",
            "training.lora is only for methods sft and dpo",
            lambda s: s.method in ("sft", "dpo") or s.training.lora is None, field_path=".training.lora"),
        Cel(f"!has(self.output.location.pvc) || !has(self.checkpoint.location.pvc) || "
            f"self.output.location.pvc.claimName != self.checkpoint.location.pvc.claimName || "
            f"!{_cel_dir('self.checkpoint.location.pvc')}.startsWith({_cel_dir('self.output.location.pvc')})",
            "output.location must not be the checkpoint folder or a folder above it: the export replaces the "
            "output folder, and the checkpoints would go with it",
            lambda s: s.output.location.pvc is None or s.checkpoint.location.pvc is None
            or s.output.location.pvc.claim_name != s.checkpoint.location.pvc.claim_name
            or not _dir(s.checkpoint.location.pvc.path).startswith(_dir(s.output.location.pvc.path)),
            field_path=".output.location.pvc.path"),
        Cel(f"!has(self.output.location.s3) || !has(self.checkpoint.location.s3) || "
            f"!{_cel_s3_dir('self.checkpoint.location.s3')}.startsWith({_cel_s3_dir('self.output.location.s3')})",
            "output.location must not be the checkpoint prefix or a prefix above it: the export replaces the "
            "objects under the output prefix, and the checkpoints would go with them",
            lambda s: s.output.location.s3 is None or s.checkpoint.location.s3 is None
            or not _s3_dir(s.checkpoint.location.s3.uri).startswith(_s3_dir(s.output.location.s3.uri)),
            field_path=".output.location.s3.uri"),
    )


# --------------------------------------------------------------------------- status
Phase = Literal[tuple(p.value for p in TRAINING_PHASES)]  # type: ignore[valid-type]


class CheckpointRef(ApiModel):
    """A checkpoint the trainer finished writing."""

    step: int
    """Optimizer step it holds."""
    path: str = ""
    """Folder of the checkpoint inside the checkpoint location."""
    time: Timestamp | None = None
    """When it was complete."""


class ProgressStatus(ApiModel):
    """Training progress, as reported by rank 0 of the workers."""

    step: int = 0
    """Optimizer steps done."""
    total_steps: int | None = None
    """Steps the budget allows."""
    tokens_seen: int = 0
    """Training tokens consumed."""
    token_budget: int | None = None
    """Tokens the budget allows."""
    percent: float | None = None
    """Progress towards the budget, 0-100."""
    loss: float | None = None
    """Training loss (mean over the last logging window)."""
    validation_loss: float | None = None
    """Latest validation loss."""
    learning_rate: float | None = None
    """Current learning rate."""
    tokens_per_second: float | None = None
    """Training throughput over all GPUs."""
    mfu: float | None = None
    """Model FLOPs utilisation, 0-1."""
    eta_seconds: int | None = None
    """Estimated seconds to the end of the budget."""
    eta: str | None = None
    """The same, for people (e.g. 3h12m)."""
    updated_at: Timestamp | None = None
    """When the trainer last reported."""
    last_step_time: Timestamp | None = None
    """When the step last advanced (the Stalled condition compares it with stallTimeoutSeconds)."""


class FailedPod(ApiModel):
    """One worker pod that had failed when the group was restarted."""

    name: ShortStr
    """The pod."""
    rank: int | None = None
    """Its node rank (the Job completion index)."""
    node: ShortStr | None = None
    """The node it ran on."""
    reason: ShortStr
    """PodFailed, OOMKilled, Evicted, PodRejected (the kubelet refused it: UnexpectedAdmissionError, ...), Preempted, ..."""
    exit_code: int | None = None
    """Exit code of its container (the trainer's own when it reported one)."""


class RestartRecord(ApiModel):
    """One restart of the worker group."""

    time: Timestamp
    """When the restart was decided."""
    reason: ShortStr
    """PodFailed, Evicted, Preempted, NodeLost, OOMKilled, StuckTerminating, ResourcesChanged, ..."""
    message: Annotated[str, Field(max_length=4096)] = ""
    """Details (pod, node, exit code)."""
    exit_code: int | None = None
    """Exit code of the failed worker, when known."""
    step: int | None = None
    """Checkpoint step the restart resumes from."""
    node: ShortStr | None = None
    """The node blamed for the failure (lost, stuck, evicted or refused a pod, or its worker died of a signal);
    a node blamed twice is kept out of the next attempts (node affinity NotIn)."""
    failed_pods: Annotated[list[FailedPod], Field(max_length=8)] | None = None
    """The attempt's failed pods (at most 8), each with its reason."""


class BudgetStatus(ApiModel):
    """Budget consumed so far."""

    gpu_hours: float = 0.0
    """GPU-hours consumed (restarts included)."""
    tokens: int = 0
    """Training tokens consumed."""
    accounted_at: Timestamp | None = None
    """Time up to which gpuHours is counted."""


class EvaluationSummary(ApiModel):
    """Result of the evaluation run when training completed."""

    name: str
    """The ForgeEval that evaluates the model (a child of the training, of the same name)."""
    phase: str = ""
    """Its phase."""
    gates_passed: bool | None = None
    """Whether every gate passed (once it has Succeeded)."""
    metrics: dict[str, float] | None = None
    """suite.metric -> value."""


class ModelRef(ApiModel):
    """Where the exported model is."""

    location: StorageLocation
    """The output location."""
    provenance: str = defaults.PROVENANCE_FILE
    """Provenance record inside it: data digests, tokenizer, base model, image, config hash, nodes, times."""


class ForgeTrainingStatus(ApiModel):
    """Observed state of a ForgeTraining. Written by the operator only."""

    phase: Phase | None = None
    """Pending, Queued, Initializing, Running, Restarting, Suspended, Succeeded or Failed."""
    conditions: Annotated[list[Condition], Field(max_length=32)] | None = None
    """Latest observations: Queued, Initializing, Running, Restarting, Suspended, Succeeded, Failed (one per phase),
    and Stalled, Invalid and PodsReady (False: what holds the workers up, e.g. Unschedulable, ImagePullFailed)."""
    observed_generation: int | None = None
    """The .metadata.generation last acted on."""
    progress: ProgressStatus | None = None
    """Step, tokens, loss, throughput and ETA."""
    last_checkpoint: CheckpointRef | None = None
    """The most recent complete checkpoint."""
    restart_count: int | None = None
    """Restarts of the worker group so far, whatever the reason."""
    failure_count: int | None = None
    """Restarts caused by failures; compared with failurePolicy.maxRestarts (edits do not count)."""
    restarts: Annotated[list[RestartRecord], Field(max_length=20)] | None = None
    """The latest restarts with their reasons (at most 20 kept)."""
    nodes: Annotated[list[str], Field(max_length=4096)] | None = None
    """Nodes that ran workers of this training (data residency record)."""
    budget: BudgetStatus | None = None
    """Budget consumed."""
    start_time: Timestamp | None = None
    """When the workers first ran."""
    completion_time: Timestamp | None = None
    """When the training finished."""
    evaluation: EvaluationSummary | None = None
    """Evaluation of the final model."""
    model_ref: ModelRef | None = None
    """Where the final model is."""


class ForgeTraining(ApiModel):
    """A training run of a language model: method, model, tokenizer, data, hyperparameters, nodes, budget."""

    api_version: Literal["forge.dev/v1alpha1"] = API_VERSION
    kind: Literal["ForgeTraining"] = "ForgeTraining"
    metadata: ObjectMeta = ObjectMeta()
    spec: ForgeTrainingSpec
    status: ForgeTrainingStatus | None = None

    cel_rules = (
        Cel("self.metadata.name.size() <= 40",
            "metadata.name must be at most 40 characters: it prefixes the worker pods' host names",
            lambda s: len(s.metadata.name) <= 40, field_path=".metadata.name"),
        Cel("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
            "metadata.name must start with a letter and hold only lowercase letters, digits and '-' (no '.'): it "
            "names the workers' Service and their host names",
            lambda s: re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", s.metadata.name) is not None,
            field_path=".metadata.name"),
    )
    # Rules that compare with the stored object, checked by the API server only.
    transition_rules: ClassVar[tuple[Cel, ...]] = tuple(
        Cel(f"!has(oldSelf.status) || !has(oldSelf.status.startTime) || self.spec.{f} == oldSelf.spec.{f}",
            f"spec.{f} is immutable once the training has started", field_path=f".spec.{f}",
            reason="FieldValueForbidden")
        for f in ("method", "model", "tokenizer", "data", "checkpoint.location")
    )

