"""Every label, annotation, port, path and environment variable name, defined once.

The names the operator shares with the trainer (the progress annotation, the pod's environment,
the termination message, the preStop hook) come from ``forge_trainer.contract``.
"""

from forge_trainer import contract, defaults as trainer_defaults

from .base import GROUP

FIELD_MANAGER = "forge-operator"
MANAGED_BY = "forge-operator"

# labels on every child object
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_TRAINING = f"{GROUP}/training"
LABEL_EVAL = f"{GROUP}/eval"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

# the well-known node labels spec.residency is matched on (set by the cloud provider or the administrator)
LABEL_REGION = contract.TOPOLOGY_REGION_LABEL
LABEL_ZONE = contract.TOPOLOGY_ZONE_LABEL

# written by the trainer's rank 0 on its own pod; read by the operator
ANNOTATION_PROGRESS = contract.PROGRESS_ANNOTATION
# set by the operator on the Job it creates, so a restarted operator knows the reason of a restart it began
ANNOTATION_RESTART_REASON = f"{GROUP}/restart-reason"
# set by the operator on each child it applies: a digest of what it applied (an unchanged child is not applied again)
ANNOTATION_APPLIED_DIGEST = f"{GROUP}/applied-digest"

# pod layout
CONTAINER_NAME = contract.CONTAINER_NAME
CONFIG_MOUNT = "/etc/forge"
CONFIG_FILE = "trainer.yaml"
EVAL_CONFIG_FILE = "eval.yaml"
EVAL_CONTAINER_NAME = "evaluator"
# the evaluation pod's command, followed by --config
EVAL_COMMAND = ["python", "-m", "forge_trainer.eval"]
PVC_MOUNT_ROOT = "/mnt/pvc"
REWARDS_MOUNT_ROOT = "/mnt/rewards"
"""A reward ConfigMap named in spec.rewards[].python.configMap is mounted at <root>/<its name>."""
SHM_MOUNT = "/dev/shm"
SCRATCH_MOUNT = "/mnt/scratch"
"""Node-local space (an emptyDir) of a training whose checkpoints go to S3: the prepared data, the local copies
of s3:// inputs, and the checkpoints and the export on their way to the store."""
RENDEZVOUS_PORT = 29400
METRICS_PORT = trainer_defaults.METRICS_PORT  # the trainer's default: the config leaves it out
TERMINATION_MESSAGE_PATH = contract.DEFAULT_TERMINATION_MESSAGE_PATH

# environment of the trainer container
ENV_POD_NAME = contract.POD_NAME_ENV
ENV_POD_NAMESPACE = contract.POD_NAMESPACE_ENV
ENV_TRAINING_NAME = "FORGE_TRAINING_NAME"
ENV_IMAGE = contract.IMAGE_ENV
ENV_NODE_NAME = contract.NODE_NAME_ENV
ENV_NODE_REGION = contract.NODE_REGION_ENV
ENV_NODE_ZONE = contract.NODE_ZONE_ENV
SIGNING_KEY_MOUNT = "/etc/forge-signing"
"""spec.provenance.signingKeySecret is mounted here (its one key, read by rank 0 only)."""
ENV_RESTART_COUNT = "FORGE_RESTART_COUNT"
# torch >= 2.12: how long torchrun waits for its workers after forwarding SIGTERM before it SIGKILLs them
# (30 s, fixed, in older versions)
ENV_TORCHRUN_SHUTDOWN_TIMEOUT = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
# set from the Secret of the training's S3 locations (spec...s3.secretRef): boto3's own variables
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_SECRET_KEYS = ("AWS_SESSION_TOKEN",)

# the container's preStop hook: the workers checkpoint and exit before torchrun gets SIGTERM
PRESTOP_COMMAND = list(contract.PRESTOP_COMMAND)
# the container's command: torchrun, run by the trainer so that a rendezvous timeout is recognisable
LAUNCH_COMMAND = list(contract.LAUNCH_COMMAND)

# the trainer image's user and group (trainer-image/Dockerfile): the workers run as them
TRAINER_UID = 10001
TRAINER_GID = 10001

# The workers' ServiceAccount, Role and RoleBinding: forge-trainer-<training>. The chart's
# ValidatingAdmissionPolicy recognises the workers' requests by this prefix.
TRAINER_ACCOUNT_PREFIX = "forge-trainer-"
