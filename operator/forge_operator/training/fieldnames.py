"""The trainer's messages in the spec's own field names.

The trainer knows its configuration (``forge_trainer.config``), whose fields are the spec's in
snake_case and sometimes in another shape (``training.seq_len`` is ``spec.training.sequenceLength``,
``model.base_path`` is ``spec.model.base``). What it reports (a termination message, an error of
``forge train``) goes through :func:`in_spec_terms` before a user sees it: each configuration path
becomes the spec's (``translate.py`` is the mapping's other half), and a path without its own entry
becomes its camelCase form under ``spec.``.
"""

from __future__ import annotations

import re

# configuration path -> spec path, where the two differ in more than case
RENAMED = {
    "training.seq_len": "spec.training.sequenceLength",
    "training.global_batch_sequences": "spec.training.globalBatch.sequences",
    "training.micro_batch_sequences": "spec.training.microBatchSize",
    "training.lr": "spec.training.learningRate",
    "training.min_lr": "spec.training.minLearningRate",
    "training.grad_clip": "spec.training.gradientClipping",
    "model.base_path": "spec.model.base",
    "model.architecture.max_position_embeddings": "spec.model.architecture.contextLength",
    "tokenizer.path": "spec.tokenizer.source",
    "method.beta": "spec.training.dpoBeta",
    "method.group_size": "spec.training.sampling.groupSize",
    "method.max_new_tokens": "spec.training.sampling.maxNewTokens",
    "method.temperature": "spec.training.sampling.temperature",
    "method.top_p": "spec.training.sampling.topP",
    "method.epsilon": "spec.training.grpo.epsilon",
    "method.scale_rewards": "spec.training.grpo.scaleRewards",
    "method.updates_per_generation": "spec.training.grpo.updatesPerGeneration",
    "method.rewards": "spec.rewards",
    "method.loss_type": "spec.training.dpoLossType",
    "checkpoint.resume": "spec.checkpoint.resumeFrom",
    "checkpoint.interval_steps": "spec.checkpoint.intervalSteps",
    "checkpoint.dir": "spec.checkpoint.location",
    "output.dir": "spec.output.location",
}
# a source's folder is its location in the spec
SOURCE_PATH = re.compile(r"\bdata\.(sources\[\d+\]|validation\.source)\.path\b")
CONFIG_PATH = re.compile(r"(?<![\w./-])(training|model|tokenizer|data|method|checkpoint|output)"
                         r"((?:\.[a-z][a-z0-9_]*(?:\[\d+\])?)+)")


def _camel(segment: str) -> str:
    head, *rest = segment.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


FILE_SUFFIXES = {"safetensors", "json", "jsonl", "bin", "pt", "py", "yaml", "txt", "parquet", "jinja", "model"}


def _spec_path(match: re.Match) -> str:
    path = match.group(0)
    if path.rsplit(".", 1)[-1] in FILE_SUFFIXES:  # a file name (model.safetensors), not a field
        return path
    for old, new in sorted(RENAMED.items(), key=lambda kv: -len(kv[0])):
        if path == old or path.startswith(old + ".") or path.startswith(old + "["):
            return new + path[len(old):]
    return "spec." + ".".join(_camel(s) for s in path.split("."))


def in_spec_terms(message: str) -> str:
    """``message`` with every trainer configuration path written as the spec's field."""
    message = SOURCE_PATH.sub(lambda m: f"spec.data.{m.group(1)}.location", message)
    return CONFIG_PATH.sub(_spec_path, message)
