"""Every default the API and the trainer share, in one place.

The trainer's configuration (``config.py``) takes its field defaults from here, and so does the
operator's API (``forge_operator.api.defaults`` re-exports these), so a ForgeTraining that leaves
a field out and a trainer configuration that leaves it out describe the same run: the operator
translates, it does not re-default. A default computed from another value is a function here,
applied by the trainer's configuration when the value is left out (the translation passes None).

Plain values only: this module imports nothing (the operator image has no torch), and it is the
only place to change one of them; ``tests/test_one_config.py`` checks that both sides agree.
Defaults of knobs only one side has (the API's resources and failure policy, the trainer's
``betas`` or ``eval_batches``) live beside their field.
"""

from __future__ import annotations

# model.architecture (API: spec.model.architecture)
FAMILY = "dense"
CONTEXT_LENGTH = 4096  # API contextLength, trainer max_position_embeddings
ROPE_THETA = 500000.0
TIE_WORD_EMBEDDINGS = False
ROUTER_AUX_LOSS_COEF = 0.001  # API experts.routerAuxLossCoef


def intermediate_size(hidden_size: int) -> int:
    """Width of the dense MLP: about 8/3 x the hidden size, rounded up to a multiple of 64."""
    return -(-int(hidden_size * 8 / 3) // 64) * 64


def expert_intermediate_size(intermediate: int, experts_per_token: int) -> int:
    """Width of each expert's MLP: the dense MLP's width shared by the experts a token visits."""
    return max(8, intermediate // experts_per_token)


FP8_MULTIPLE = 16
FP8_DIMS = ("the widths of the transformer blocks' linear layers to be multiples of 16: hidden size, key/value "
            "width (key/value heads x hidden size / attention heads) and, for dense models, the MLP's width")


def fp8_misfits(family: str, hidden_size: int, heads: int, kv_heads: int | None, intermediate: int | None) -> str:
    """With training.precision fp8, the first width of a new model's FP8 linear layers that is not a multiple
    of 16 (FP8 matrix products need it), described; "" when every one is. MoE experts and routers stay in
    bf16, so only a dense model's MLP counts."""
    kv = (kv_heads or heads) * (hidden_size // heads)
    widths = [("hidden size", hidden_size), ("key/value width", kv)]
    if family == "dense" and intermediate is not None:
        widths.append(("MLP width", intermediate))
    return next((f"the {name} is {width}" for name, width in widths if width % FP8_MULTIPLE), "")


# tokenizer.train
VOCAB_SIZE = 32000

# data
DATA_FORMAT = "text"
TEXT_FIELD = "text"  # jsonl / parquet: the field holding a document's text
SOURCE_WEIGHT = 1.0
VALIDATION_FRACTION = 0.01  # no validation set named: this share of the training documents

# training
SEQUENCE_LENGTH = 2048  # API sequenceLength, trainer seq_len
GLOBAL_BATCH_SEQUENCES = 256
MICRO_BATCH_SIZE = 4  # API microBatchSize, trainer micro_batch_sequences
LEARNING_RATE = 3e-4
SCHEDULE = "cosine"
WARMUP_STEPS = 100
DECAY_FRACTION = 0.2
WEIGHT_DECAY = 0.1
GRADIENT_CLIPPING = 1.0
PRECISION = "auto"
SEED = 1234
ACTIVATION_CHECKPOINTING = "none"  # none | selective | full, per transformer block
SHARDING = "FullShard"  # FullShard (FSDP over every worker) | HybridShard (replicated across nodes, sharded within)
DOCUMENT_MASKING = False  # pretrain, continued-pretrain: tokens attend only within their own document
EVAL_INTERVAL_STEPS = 500
DPO_BETA = 0.1  # API training.dpoBeta, trainer method.beta
DPO_LOSS_TYPE = "sigmoid"  # API training.dpoLossType, trainer method.loss_type
GRPO_GROUP_SIZE = 8  # completions per prompt (grpo, online-dpo)
GRPO_MAX_NEW_TOKENS = 256
GRPO_TEMPERATURE = 1.0
GRPO_TOP_P = 1.0
GRPO_BETA = 0.04  # the KL penalty's weight
GRPO_EPSILON = 0.2  # the clip range
REWARD_HTTP_TIMEOUT_SECONDS = 30.0  # an HTTP reward's request
REWARD_HTTP_RETRIES = 2  # further attempts after a failed request
# training.lora (LoRA adapters with peft; the names are peft's LoraConfig's without the lora_ prefix)
LORA_R = 16
LORA_ALPHA = 32.0
LORA_DROPOUT = 0.05
LORA_EXPORT = "merged"  # merged: a plain model of the base's family; adapter: the peft adapter alone


def min_learning_rate(learning_rate: float) -> float:
    """Learning rate at the end of the schedule: a tenth of the peak."""
    return learning_rate / 10


def compile_blocks(device_type: str) -> bool:
    """Whether the transformer blocks are compiled (torch.compile) when training.compile is not set: on
    GPUs, as torchtitan trains; not on CPUs, where the short runs there (tests, the quickstart) would not
    win back the compile time (docs/benchmarks.md, benchmarks/compile.py)."""
    return device_type == "cuda"


# checkpoint
CHECKPOINT_INTERVAL_STEPS = 1000
CHECKPOINT_INTERVAL_MINUTES = 30
CHECKPOINT_KEEP_LAST = 3
CHECKPOINT_RETAIN_AFTER_SUCCESS = "All"  # All (keepLast of them), Last or None once the model is exported
OUTPUT_FILE_MODE = 0o644  # the exported files (folders: 0755): readable by the group and others

# metrics (set by the operator's pods, not by the API)
METRICS_PORT = 9090  # rank 0 serves Prometheus metrics here; the worker pods expose this port
PROGRESS_INTERVAL_SECONDS = 15.0  # how often rank 0 reports progress (on its pod, or to a callback)

# evaluation (API ForgeEval, trainer eval.config)
EVAL_FORMAT = "jsonl"
EVAL_MAX_NEW_TOKENS = 64
EVAL_BATCH_SIZE = 8
EVAL_SIGNIFICANCE = 0.05  # relative gates: McNemar's p-value below which a drop is not noise
