"""Every default of the Forge API, in one place.

The models (``api/training.py``, ``api/eval.py``) take their field defaults from here, and the CRD
generator writes them into the field descriptions (the API server does not default). Fields
without a default here are required, or mean "not set" (None).

The defaults the trainer shares (the model's shape, the tokenizer, the data, the hyperparameters,
checkpoint frequency) are not defined here but in ``forge_trainer.defaults`` and only
re-exported: the trainer's configuration takes its defaults from the same module, so the
translation passes what the spec says and leaves the rest (None) to the trainer's configuration,
which also computes the derived ones (``min_learning_rate``, ``intermediate_size``,
``expert_intermediate_size``, the validation fraction). What follows them is the operator's own.
"""

from __future__ import annotations

from forge_trainer.defaults import (  # noqa: F401  (re-exported: the API's share of the trainer's defaults)
    # spec.model.architecture
    CONTEXT_LENGTH, FAMILY, ROPE_THETA, ROUTER_AUX_LOSS_COEF, TIE_WORD_EMBEDDINGS, expert_intermediate_size,
    intermediate_size,
    # spec.tokenizer.train
    VOCAB_SIZE,
    # spec.data
    DATA_FORMAT, SOURCE_WEIGHT, VALIDATION_FRACTION,
    # spec.training
    ACTIVATION_CHECKPOINTING, DECAY_FRACTION, DOCUMENT_MASKING, EVAL_INTERVAL_STEPS, GLOBAL_BATCH_SEQUENCES, GRADIENT_CLIPPING, LEARNING_RATE,
    FP8_DIMS, FP8_MULTIPLE, MICRO_BATCH_SIZE, PRECISION, SCHEDULE, SEED, SEQUENCE_LENGTH, SHARDING, WARMUP_STEPS, WEIGHT_DECAY, compile_blocks,
    fp8_misfits, min_learning_rate,
    # spec.training.sampling, spec.training.grpo, spec.rewards[].http
    GRPO_BETA, GRPO_EPSILON, GRPO_GROUP_SIZE, GRPO_MAX_NEW_TOKENS, GRPO_TEMPERATURE, GRPO_TOP_P,
    REWARD_HTTP_RETRIES, REWARD_HTTP_TIMEOUT_SECONDS,
    # spec.training.lora
    LORA_ALPHA, LORA_DROPOUT, LORA_EXPORT, LORA_R,
    # spec.checkpoint
    CHECKPOINT_INTERVAL_MINUTES, CHECKPOINT_INTERVAL_STEPS, CHECKPOINT_KEEP_LAST, CHECKPOINT_RETAIN_AFTER_SUCCESS,
    # spec.output
    OUTPUT_FILE_MODE,
    # ForgeEval
    EVAL_BATCH_SIZE, EVAL_FORMAT, EVAL_MAX_NEW_TOKENS, EVAL_SIGNIFICANCE,
)
from forge_trainer.provenance import RECORD_FILE as PROVENANCE_FILE  # noqa: F401  (status.modelRef.provenance)

# spec.resources
NUM_NODES = 1
GPUS_PER_NODE = 1
GPU_RESOURCE_NAME = "nvidia.com/gpu"
SHM_SIZE = "16Gi"
TERMINATION_GRACE_PERIOD_SECONDS = 600
# resources.image left out: the image the operator was installed with, else this one
TRAINER_IMAGE = "ghcr.io/forge-dev/forge-trainer:0.1.0"

# spec.scheduling
SUSPEND = False
EGRESS = "Restricted"  # spec.network.egress: the trainer's egress lock is on

# spec.provenance.signingKeySecret
SIGNING_KEY = "private.pem"

# spec.failurePolicy
MAX_RESTARTS = 3
BACKOFF_SECONDS = 10
MAX_BACKOFF_SECONDS = 600
NODE_FAILURE_TIMEOUT_SECONDS = 120
STALL_TIMEOUT_SECONDS = 1800
RENDEZVOUS_TIMEOUT_SECONDS = 1800  # pods of one attempt may start this far apart


# ForgeEval
EVAL_GPUS = 1

# The operator process (the Helm chart may override it through its environment)
RESYNC_SECONDS = 15.0  # how often an unfinished resource is looked at again without any event
RECONCILE_WORKERS = 16  # threads reconciling keys from the work queue (one object is never in two at once)
