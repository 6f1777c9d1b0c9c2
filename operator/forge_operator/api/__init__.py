"""The Forge API (forge.dev/v1alpha1): pydantic models, the single source of the CRDs and docs.

Beside the models: ``enums`` (phases, condition types, reasons), ``defaults`` (every default of
the API) and ``names`` (labels, annotations, ports, environment variables). Pure: imports neither
kopf nor kubernetes, so the trainer image and the `forge` command can use it too.
"""

from .base import API_VERSION, GROUP, VERSION, Condition, StorageLocation
from .eval import ForgeEval, ForgeEvalSpec, ForgeEvalStatus
from .training import ForgeTraining, ForgeTrainingSpec, ForgeTrainingStatus

__all__ = [
    "API_VERSION", "GROUP", "VERSION", "Condition", "StorageLocation",
    "ForgeEval", "ForgeEvalSpec", "ForgeEvalStatus",
    "ForgeTraining", "ForgeTrainingSpec", "ForgeTrainingStatus",
]
