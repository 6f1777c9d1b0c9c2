"""Every default of the Forge API, in one place.

The models (``api/training.py``, ``api/eval.py``) take their field defaults from here, the CRD
generator writes them into the field descriptions (the API server does not default), and the
translation to the trainer's configuration reads the derived ones (``min_learning_rate``,
``intermediate_size``, the validation fraction) from here too. Fields without a default here are
required, or mean "not set" (None).
"""

from __future__ import annotations

# spec.model.architecture
FAMILY = "dense"
CONTEXT_LENGTH = 4096
ROPE_THETA = 500000.0
TIE_WORD_EMBEDDINGS = False
ROUTER_AUX_LOSS_COEF = 0.001  # experts.routerAuxLossCoef


def intermediate_size(hidden_size: int) -> int:
    """architecture.intermediateSize: about 8/3 x hiddenSize, rounded up to a multiple of 64."""
    return -(-int(hidden_size * 8 / 3) // 64) * 64


def expert_intermediate_size(intermediate: int, experts_per_token: int) -> int:
    """experts.expertIntermediateSize: the dense MLP's width shared by the experts a token visits."""
    return max(8, intermediate // experts_per_token)


# spec.tokenizer.train
VOCAB_SIZE = 32000

# spec.data
DATA_FORMAT = "text"
SOURCE_WEIGHT = 1.0
VALIDATION_FRACTION = 0.01  # data.validation left out: this share of the training documents

# spec.training
SEQUENCE_LENGTH = 2048
GLOBAL_BATCH_SEQUENCES = 256
MICRO_BATCH_SIZE = 4
LEARNING_RATE = 3e-4
SCHEDULE = "cosine"
WARMUP_STEPS = 100
DECAY_FRACTION = 0.2
WEIGHT_DECAY = 0.1
GRADIENT_CLIPPING = 1.0
PRECISION = "auto"
SEED = 1234
COMPILE = False
EVAL_INTERVAL_STEPS = 500


def min_learning_rate(learning_rate: float) -> float:
    """training.minLearningRate: a tenth of the learning rate."""
    return learning_rate / 10

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

# spec.checkpoint
CHECKPOINT_INTERVAL_STEPS = 1000
CHECKPOINT_INTERVAL_MINUTES = 30
CHECKPOINT_KEEP_LAST = 3

# spec.failurePolicy
MAX_RESTARTS = 3
BACKOFF_SECONDS = 10
MAX_BACKOFF_SECONDS = 600
NODE_FAILURE_TIMEOUT_SECONDS = 120
STALL_TIMEOUT_SECONDS = 1800

# status.modelRef
PROVENANCE_FILE = "provenance.json"

# ForgeEval
EVAL_FORMAT = "jsonl"
EVAL_MAX_NEW_TOKENS = 64
EVAL_BATCH_SIZE = 8
EVAL_GPUS = 1

# The operator process (the Helm chart may override them through its environment)
RESYNC_SECONDS = 15.0  # how often an unfinished resource is looked at again without any event
PROGRESS_INTERVAL_SECONDS = 15.0  # how often rank 0 reports progress on its pod
