"""The evaluator's s3:// locations, through the trainer's own storage code (runtime/storage.py): the model,
the baseline and the suites' files are copied to local scratch before they are read, and the results
written there are uploaded to an s3:// output_dir, results.json last.

A model prefix that is a training's checkpoint folder is not copied whole: only the checkpoint that is
evaluated (the one the prefix is, or its newest complete one), as a local checkpoint folder is read."""

from __future__ import annotations

from pathlib import Path

from ..contract import EVAL_RESULTS_FILE
from ..runtime.s3checkpoint import S3Checkpoints
from ..runtime.storage import S3Url, endpoint_address, is_s3, local_mirror, publish
from .config import EvalConfig


def s3_endpoints(config: EvalConfig) -> list[str]:
    """``host:port`` of the store when any location is on S3 (for the egress lock)."""
    return [endpoint_address(config.s3)] if config.s3_locations else []


def _field(config: EvalConfig, location: str, default: str) -> str:
    return config.fields.get(location, default)


def _model(config: EvalConfig, location: str, field: str) -> str:
    """The local copy of a model on S3: of the checkpoint evaluated when the prefix holds a training's
    checkpoints, else of the whole prefix (a model folder)."""
    url = S3Url.parse(location)
    ckpts = S3Checkpoints(location, config.s3, field)
    chosen = url if ckpts.is_complete(url) else ckpts.find_latest()
    return local_mirror(str(chosen or url), config.s3, config.scratch_dir, field)


def localized(config: EvalConfig) -> EvalConfig:
    """The configuration with every s3:// location replaced by a local folder: inputs downloaded now, the
    output a folder under scratch (``publish_results`` uploads it)."""
    if not config.s3_locations:
        return config
    local = lambda path, default: (_model(config, path, _field(config, path, default))  # noqa: E731
                                   if path is not None and is_s3(path) else path)
    models = {"model_path": local(config.model_path, "model_path"),
              "baseline_path": local(config.baseline_path, "baseline_path")}
    suites = [s.model_copy(update={"path": local_mirror(s.path, config.s3, config.scratch_dir,
                                                        _field(config, s.path, f"suites[{i}].path"))})
              if is_s3(s.path) else s for i, s in enumerate(config.suites)]
    output = str(Path(config.scratch_dir) / "results" / config.name) if is_s3(config.output_dir) else config.output_dir
    return config.model_copy(update={**models, "suites": suites, "output_dir": output})


def publish_results(local: EvalConfig, config: EvalConfig) -> str:
    """Upload the results of ``local`` to the s3:// output_dir of ``config``; returns where results.json is."""
    if local.output_dir == config.output_dir:
        return f"{config.output_dir.rstrip('/')}/{EVAL_RESULTS_FILE}"
    publish(Path(local.output_dir), config.output_dir, config.s3, _field(config, config.output_dir, "output_dir"),
            EVAL_RESULTS_FILE)
    return str(S3Url.parse(config.output_dir).child(EVAL_RESULTS_FILE))
