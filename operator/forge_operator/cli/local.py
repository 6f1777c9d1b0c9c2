"""`forge train FILE.yaml`: run a ForgeTraining on this machine, no cluster needed.

The file is validated with the same models as the API server and translated
by the same function the operator uses; PersistentVolumeClaims become local
folders (``--volume CLAIM=DIR``, default ``./volumes/<claim>``); S3 locations are used as they are, with
the credentials of the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws), since a
Secret is the cluster's. One process
trains; ``resources`` (nodes, GPUs) and ``podTemplate`` (what the worker pods get) are validated as
the API server would and then ignored, with a line saying so for ``podTemplate``: there is no pod.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from forge_trainer.config import MetricsConfig, TrainerConfig
from forge_trainer.contract import ExitCode, Progress

from ..api.base import PvcLocation, format_error
from ..api.training import ForgeTraining
from ..training.fieldnames import in_spec_terms
from ..training.translate import TranslationError, cache_on_scratch, trainer_config

DEFAULT_PROMPT = "def __init__(self"
# What differs from the worker pods' configuration because it runs here: no Prometheus server, a
# progress bar updated every second, the run's summary beside the model instead of the pod's
# termination log (and PVC paths resolved to --volume folders).
LOCAL_METRICS = MetricsConfig(port=None, progress_interval_seconds=1.0)
SUMMARY_FILE = "run-summary.json"
# With checkpoints on S3: the prepared data, the local copies of s3:// inputs and the run's summary (no claim
# is named so: a claim's name never starts with a dot)
LOCAL_SCRATCH = Path("volumes", ".forge-scratch")


def parse_volumes(volumes: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in volumes:
        claim, sep, folder = item.partition("=")
        if not sep or not claim or not folder:
            raise ValueError(f"--volume {item!r}: expected CLAIM=DIR")
        out[claim] = Path(os.path.expandvars(os.path.expanduser(folder))).resolve()
    return out


def load_training(path: str) -> ForgeTraining:
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if isinstance(doc, dict) and doc.get("kind") == "ForgeTraining":
            doc.setdefault("metadata", {}).setdefault("name", Path(path).stem)
            return ForgeTraining.model_validate(doc)
    raise ValueError(f"{path}: no ForgeTraining in the file")


class ProgressBar:
    """A tqdm bar fed by the trainer's progress reports: step, loss, tokens/s, ETA."""

    def __init__(self) -> None:
        from tqdm import tqdm

        # one ETA: the trainer's (from its budget and measured throughput), not tqdm's own estimate
        self.bar = tqdm(unit="step", dynamic_ncols=True, file=sys.stderr,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def __call__(self, p: Progress) -> None:
        if p.total_steps and self.bar.total != p.total_steps:
            self.bar.total = p.total_steps
        self.bar.n = p.step
        post = {}
        if p.loss is not None:
            post["loss"] = f"{p.loss:.3f}"
        if p.tokens_per_second:
            post["tok/s"] = f"{p.tokens_per_second:,.0f}"
        if (p.method_metrics or {}).get("reward_accuracy") is not None:  # dpo
            post["reward acc"] = f"{p.method_metrics['reward_accuracy']:.2f}"
        if (p.method_metrics or {}).get("reward_mean") is not None:  # grpo, online-dpo
            post["reward"] = f"{p.method_metrics['reward_mean']:.3f}"
        if p.eta_seconds is not None:
            post["eta"] = f"{p.eta_seconds // 60}m{p.eta_seconds % 60:02d}s"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def local_config(path: str, volumes: list[str]) -> tuple[ForgeTraining, TrainerConfig]:
    """The ForgeTraining in ``path`` and the trainer's configuration for one local process: the
    operator's translation, with PVCs (and the ConfigMaps of spec.rewards and the Secret of
    spec.provenance.signingKeySecret, by name) at the --volume folders
    and the settings of LOCAL_METRICS and SUMMARY_FILE. Raises what validating or translating raises."""
    mounts = parse_volumes(volumes)
    ft = load_training(path)

    def resolve(loc: PvcLocation) -> str:
        root = mounts.get(loc.claim_name, Path("volumes", loc.claim_name).resolve())
        return str(root / loc.path.strip("/")) if loc.path.strip("/") else str(root)

    def folder(name: str) -> str:  # a ConfigMap or Secret of the spec, by name
        return str(mounts.get(name, Path("volumes", name).resolve()))

    out = ft.spec.output.location
    summary = (Path(resolve(out.pvc)) if out.pvc is not None else LOCAL_SCRATCH.resolve()) / SUMMARY_FILE
    return ft, trainer_config(ft, resolve, metrics=LOCAL_METRICS.model_copy(), world_size=1,
                              termination_message_path=str(summary),
                              cache_dir=str(LOCAL_SCRATCH.resolve() / "cache") if cache_on_scratch(ft.spec) else None,
                              config_map=folder, secret=folder)


def _local_model(output_dir: str, config: TrainerConfig) -> str:
    """The exported model's folder here: itself, or a copy of its s3:// prefix."""
    from forge_trainer.runtime import storage

    return storage.local_mirror(output_dir, config.s3, storage.scratch_of(config), "output.dir")


def train_local(path: str, volumes: list[str], prompt: str | None = None) -> int:
    try:
        ft, config = local_config(path, volumes)
    except (ValidationError, TranslationError, ValueError, OSError) as err:
        print(f"forge: {path}: {format_error(err)}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR

    import forge_trainer
    from forge_trainer.contract import TrainerError

    print(f"forge: training {ft.metadata.name} ({ft.spec.method}) -> {config.output.dir}", file=sys.stderr)
    if ft.spec.pod_template:
        print("forge: spec.podTemplate is for the worker pods of a cluster; ignored here", file=sys.stderr)
    bar = ProgressBar()
    try:
        summary = forge_trainer.run(config, on_progress=bar)
    except TrainerError as err:
        bar.close()
        print(f"forge: {in_spec_terms(str(err))}", file=sys.stderr)
        return err.exit_code
    bar.close()
    if summary.status != "completed":
        print(f"forge: stopped at step {summary.step} ({summary.reason}); run the same command to resume "
              f"from {summary.checkpoint}", file=sys.stderr)
        return ExitCode.PREEMPTED
    if summary.step == summary.start_step:  # nothing trained in this run
        if summary.reason in ("max_steps", "max_tokens"):  # run again after it finished
            print(f"{ft.metadata.name} is already complete at step {summary.step} (checkpoint {summary.checkpoint})")
        else:
            print(f"{ft.metadata.name} trained no step: {summary.reason} (training.budget) had already been "
                  f"reached at step {summary.step}")
    loss = f", train loss {summary.train_loss:.4f}" if summary.train_loss is not None else ""
    print(f"step {summary.step}, {summary.tokens_seen:,} tokens{loss}")
    if summary.val_loss is not None:
        print(f"validation loss {summary.val_loss:.4f}, perplexity {math.exp(summary.val_loss):.2f}")
    text = prompt if prompt is not None else DEFAULT_PROMPT
    completion = forge_trainer.sample(_local_model(summary.output_dir, config), text, max_new_tokens=48)
    print(f"sample ({text!r} ->):\n{completion}")
    print(f"model: {summary.output_dir} (Hugging Face format; provenance.json beside it)")
    return ExitCode.OK
