"""One source of every default: a ForgeTraining trains the same model under the operator and with
`forge train`, and the API and the trainer's configuration default every shared field alike.

Pure: the operator's planner and `forge train`'s configuration code, no cluster and no training.
"""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from forge_operator.api import defaults as api_defaults
from forge_operator.api.base import format_error
from forge_operator.api.enums import ConditionType
from forge_operator.api.names import (
    CONFIG_FILE, PVC_MOUNT_ROOT, REWARDS_MOUNT_ROOT, SCRATCH_MOUNT, TERMINATION_MESSAGE_PATH,
)
from forge_operator.api.training import (
    ArchitectureSpec, CheckpointSpec, DataSource, DataSpec, ForgeTraining, GrpoSpec, HttpRewardSpec, LoraSpec, MoeSpec,
    OutputSpec, SamplingSpec, TokenizerTrainSpec, TrainingSpec,
)
from forge_operator.cli.local import LOCAL_METRICS, LOCAL_SCRATCH, SUMMARY_FILE, local_config
from forge_operator.training.children import config_map_name
from forge_operator.training.observe import Observed
from forge_operator.training.planner import plan_training
from forge_operator.training.translate import trainer_config
from forge_trainer import defaults as shared
from forge_trainer.config import (
    ArchitectureConfig, CheckpointConfig, DataSourceConfig, DpoMethod, GrpoMethod, HttpReward, LoraConfig,
    OutputConfig, PretrainMethod, TokenizerTrainConfig, TrainerConfig, TrainingConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=timezone.utc)

# The fields of the trainer's configuration that differ because of where it runs, and only those.
# (PVC paths and cache_dir would too; both sides below resolve volumes alike, so they must be equal.)
WHERE_IT_RUNS = {
    "run_name": "namespace/name on a cluster; a file has no namespace",
    "metrics.port": "the pod serves Prometheus metrics; forge train serves none",
    "metrics.progress_interval_seconds": "the pod's annotation vs forge train's progress bar",
    "termination_message_path": "the pod's termination log vs a summary beside the local model",
}


def _trainings() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text())
                  if isinstance(doc, dict) and doc.get("kind") == "ForgeTraining"]
    return found


EXAMPLES = _trainings()


def _claims(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("claimName"), str):
            yield node["claimName"]
        for value in node.values():
            yield from _claims(value)
    elif isinstance(node, list):
        for value in node:
            yield from _claims(value)


def _by_the_operator(manifest: dict[str, Any], tmp_path: Path) -> TrainerConfig | str:
    """What the workers read: the ConfigMap the planner applies for a new training, read the way the
    trainer reads its --config file; or the Invalid condition's message when it applies nothing."""
    obj = copy.deepcopy(manifest)  # as `kubectl apply -f` stores it: what the file says, in a namespace
    obj["metadata"] = {"namespace": "default", **obj["metadata"], "uid": "uid-1", "generation": 1,
                       "resourceVersion": "1"}
    plan = plan_training(obj, Observed(now=NOW))
    name = config_map_name(ForgeTraining.model_validate(obj))
    maps = [c for c in plan.applies("ConfigMap") if c["metadata"]["name"] == name]
    if not maps:
        invalid = [c for c in plan.status.get("conditions") or [] if c["type"] == ConditionType.INVALID]
        assert invalid and invalid[0]["status"] == "True", plan.status
        return invalid[0]["message"]
    (tmp_path / CONFIG_FILE).write_text(maps[0]["data"][CONFIG_FILE])
    return load_config(tmp_path / CONFIG_FILE)


def _config_maps(manifest: dict[str, Any]) -> set[str]:
    """The ConfigMaps holding the spec's Python rewards."""
    rewards = manifest["spec"].get("rewards") or []
    return {r["python"]["configMap"]["name"] for r in rewards if (r.get("python") or {}).get("configMap")}


def _by_forge_train(path: Path, manifest: dict[str, Any]) -> TrainerConfig | str:
    """`forge train FILE --volume CLAIM=DIR ...` with every claim, and every reward ConfigMap, where the worker
    pods mount it."""
    volumes = [f"{claim}={PVC_MOUNT_ROOT}/{claim}" for claim in sorted(set(_claims(manifest)))]
    volumes += [f"{name}={REWARDS_MOUNT_ROOT}/{name}" for name in sorted(_config_maps(manifest))]
    try:
        return local_config(str(path), volumes)[1]
    except ValueError as err:  # TranslationError and pydantic's ValidationError too
        return format_error(err)


def _pop(tree: dict[str, Any], dotted: str) -> Any:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree[key]
    return tree.pop(last)


@pytest.mark.parametrize("name, manifest", EXAMPLES, ids=[f"{n}:{m['metadata']['name']}" for n, m in EXAMPLES])
def test_forge_train_and_the_operator_give_the_trainer_the_same_config(name, manifest, tmp_path):
    operator, local = _by_the_operator(manifest, tmp_path), _by_forge_train(ROOT / "examples" / name, manifest)
    if isinstance(operator, str) or isinstance(local, str):  # refused: alike, for the same reason
        assert operator == local
        return

    by_operator, by_forge_train = operator.model_dump(mode="json"), local.model_dump(mode="json")
    differ = {field: (_pop(by_operator, field), _pop(by_forge_train, field)) for field in WHERE_IT_RUNS}
    on_scratch = by_operator["cache_dir"] == f"{SCRATCH_MOUNT}/cache"  # checkpoints on S3: each place's own scratch
    if on_scratch:
        assert (by_operator.pop("cache_dir"), by_forge_train.pop("cache_dir")) == (
            f"{SCRATCH_MOUNT}/cache", str(LOCAL_SCRATCH.resolve() / "cache"))
    assert by_forge_train == by_operator
    # ... and the fields that differ hold what each place sets
    namespace = manifest["metadata"].get("namespace", "default")
    assert differ["run_name"] == (f"{namespace}/{manifest['metadata']['name']}", manifest["metadata"]["name"])
    assert differ["metrics.port"] == (shared.METRICS_PORT, LOCAL_METRICS.port)
    assert differ["metrics.progress_interval_seconds"] == (shared.PROGRESS_INTERVAL_SECONDS,
                                                           LOCAL_METRICS.progress_interval_seconds)
    summary_dir = LOCAL_SCRATCH.resolve() if local.output.dir.startswith("s3://") else local.output.dir
    assert differ["termination_message_path"] == (TERMINATION_MESSAGE_PATH, f"{summary_dir}/{SUMMARY_FILE}")


def test_every_refusal_and_every_method_that_runs_is_covered():
    """The examples exercise the configurations compared above, S3 locations among them (and `forge train`
    reads the file's first ForgeTraining: one a file)."""
    assert len(EXAMPLES) == len({n for n, _ in EXAMPLES}) >= 5
    methods = {m["spec"]["method"] for _, m in EXAMPLES}
    assert {"pretrain", "continued-pretrain", "sft", "dpo"} <= methods
    assert any("s3" in yaml.safe_dump(m) for _, m in EXAMPLES)
    families = {m["spec"]["model"].get("architecture", {}).get("family") for _, m in EXAMPLES}
    assert {"dense", "moe"} <= families


def test_dpo_reaches_the_trainer_with_its_settings(tmp_path):
    """examples/dpo.yaml: the operator and `forge train` both give the trainer method dpo with the
    spec's beta and loss type, and the preference fields of every source; left out, the shared defaults."""
    name, manifest = next((n, m) for n, m in EXAMPLES if m["spec"]["method"] == "dpo")
    cfg = _by_the_operator(manifest, tmp_path)
    assert not isinstance(cfg, str), cfg
    t = manifest["spec"]["training"]
    assert cfg.method == DpoMethod(beta=t["dpoBeta"], loss_type=t["dpoLossType"])
    assert [(s.prompt_field, s.chosen_field, s.rejected_field, s.record_kind) for s in cfg.data.sources] == \
        [("prompt", "chosen", "rejected", "preference")]
    bare = copy.deepcopy(manifest)
    del bare["spec"]["training"]["dpoBeta"], bare["spec"]["training"]["dpoLossType"]
    assert _by_the_operator(bare, tmp_path).method == DpoMethod(beta=shared.DPO_BETA, loss_type=shared.DPO_LOSS_TYPE)


# --------------------------------------------------------------------------- the defaults themselves
# (API model, API field, trainer model, trainer field): the same knob on both sides
SHARED_FIELDS = [
    (ArchitectureSpec, "family", ArchitectureConfig, "family"),
    (ArchitectureSpec, "intermediate_size", ArchitectureConfig, "intermediate_size"),
    (ArchitectureSpec, "num_key_value_heads", ArchitectureConfig, "num_key_value_heads"),
    (ArchitectureSpec, "context_length", ArchitectureConfig, "max_position_embeddings"),
    (ArchitectureSpec, "rope_theta", ArchitectureConfig, "rope_theta"),
    (ArchitectureSpec, "tie_word_embeddings", ArchitectureConfig, "tie_word_embeddings"),
    (MoeSpec, "expert_intermediate_size", ArchitectureConfig, "moe_intermediate_size"),
    (MoeSpec, "router_aux_loss_coef", ArchitectureConfig, "router_aux_loss_coef"),
    (TokenizerTrainSpec, "vocab_size", TokenizerTrainConfig, "vocab_size"),
    (DataSource, "format", DataSourceConfig, "format"),
    (DataSource, "include", DataSourceConfig, "include"),
    (DataSource, "text_field", DataSourceConfig, "text_field"),
    (DataSource, "prompt_field", DataSourceConfig, "prompt_field"),
    (DataSource, "completion_field", DataSourceConfig, "completion_field"),
    (DataSource, "messages_field", DataSourceConfig, "messages_field"),
    (DataSource, "chosen_field", DataSourceConfig, "chosen_field"),
    (DataSource, "rejected_field", DataSourceConfig, "rejected_field"),
    (DataSource, "weight", DataSourceConfig, "weight"),
    (TrainingSpec, "sequence_length", TrainingConfig, "seq_len"),
    (TrainingSpec, "micro_batch_size", TrainingConfig, "micro_batch_sequences"),
    (TrainingSpec, "learning_rate", TrainingConfig, "lr"),
    (TrainingSpec, "min_learning_rate", TrainingConfig, "min_lr"),
    (TrainingSpec, "schedule", TrainingConfig, "schedule"),
    (TrainingSpec, "warmup_steps", TrainingConfig, "warmup_steps"),
    (TrainingSpec, "decay_fraction", TrainingConfig, "decay_fraction"),
    (TrainingSpec, "weight_decay", TrainingConfig, "weight_decay"),
    (TrainingSpec, "gradient_clipping", TrainingConfig, "grad_clip"),
    (TrainingSpec, "dpo_beta", DpoMethod, "beta"),
    (TrainingSpec, "dpo_loss_type", DpoMethod, "loss_type"),
    (TrainingSpec, "precision", TrainingConfig, "precision"),
    (TrainingSpec, "seed", TrainingConfig, "seed"),
    (TrainingSpec, "compile", TrainingConfig, "compile"),
    (TrainingSpec, "activation_checkpointing", TrainingConfig, "activation_checkpointing"),
    (TrainingSpec, "sharding", TrainingConfig, "sharding"),
    (TrainingSpec, "document_masking", PretrainMethod, "document_masking"),
    (TrainingSpec, "eval_interval_steps", TrainingConfig, "eval_interval_steps"),
    (TrainingSpec, "lora", TrainingConfig, "lora"),
    (LoraSpec, "r", LoraConfig, "r"),
    (LoraSpec, "alpha", LoraConfig, "alpha"),
    (LoraSpec, "dropout", LoraConfig, "dropout"),
    (LoraSpec, "target_modules", LoraConfig, "target_modules"),
    (LoraSpec, "export", LoraConfig, "export"),
    (SamplingSpec, "group_size", GrpoMethod, "group_size"),
    (SamplingSpec, "max_new_tokens", GrpoMethod, "max_new_tokens"),
    (SamplingSpec, "temperature", GrpoMethod, "temperature"),
    (SamplingSpec, "top_p", GrpoMethod, "top_p"),
    (GrpoSpec, "beta", GrpoMethod, "beta"),
    (GrpoSpec, "epsilon", GrpoMethod, "epsilon"),
    (GrpoSpec, "scale_rewards", GrpoMethod, "scale_rewards"),
    (GrpoSpec, "updates_per_generation", GrpoMethod, "updates_per_generation"),
    (HttpRewardSpec, "timeout_seconds", HttpReward, "timeout_seconds"),
    (HttpRewardSpec, "retries", HttpReward, "retries"),
    (CheckpointSpec, "interval_steps", CheckpointConfig, "interval_steps"),
    (CheckpointSpec, "interval_minutes", CheckpointConfig, "interval_minutes"),
    (CheckpointSpec, "keep_last", CheckpointConfig, "keep_last"),
    (CheckpointSpec, "retain_after_success", CheckpointConfig, "retain_after_success"),
    (OutputSpec, "file_mode", OutputConfig, "file_mode"),
]
# API fields with a default that the trainer has no field for: the operator acts on them itself
# (or translates them into another shape, checked by the next test)
API_ONLY = {
    (ArchitectureSpec, "experts"), (TrainingSpec, "global_batch"), (CheckpointSpec, "resume_from"),
    (TrainingSpec, "sampling"), (TrainingSpec, "grpo"),  # grpo's and online-dpo's settings: in the trainer's method
}


@pytest.mark.parametrize("api, field, trainer, trainer_field", SHARED_FIELDS,
                         ids=[f"{a.__name__}.{f}" for a, f, _, _ in SHARED_FIELDS])
def test_the_api_and_the_trainer_default_a_shared_field_alike(api, field, trainer, trainer_field):
    """Equal, or the API leaves it out (None) and says in its description what the trainer fills in."""
    ours, theirs = api.model_fields[field].default, trainer.model_fields[trainer_field].default
    if ours is None and theirs is not None:
        assert str(theirs) in api.model_fields[field].description, (field, theirs)
    else:
        assert ours == theirs, f"{api.__name__}.{field} defaults to {ours!r}, the trainer's {trainer_field} to {theirs!r}"


def test_every_api_default_the_trainer_reads_is_listed():
    """A new defaulted field of these models is either shared (and checked above) or the API's own."""
    listed = {(a, f) for a, f, _, _ in SHARED_FIELDS} | API_ONLY
    for model in {a for a, _, _, _ in SHARED_FIELDS}:
        for field, info in model.model_fields.items():
            if not info.is_required():
                assert (model, field) in listed, f"{model.__name__}.{field}: add it to SHARED_FIELDS or API_ONLY"


def test_the_api_takes_its_shared_defaults_from_the_trainer():
    names = [n for n in vars(shared) if not n.startswith("_") and n != "annotations"]
    reexported = [n for n in names if hasattr(api_defaults, n)]
    assert {"ROPE_THETA", "TIE_WORD_EMBEDDINGS", "ROUTER_AUX_LOSS_COEF", "VOCAB_SIZE", "SEED"} <= set(reexported)
    for n in reexported:
        assert getattr(api_defaults, n) is getattr(shared, n), n


def _bare(family: str) -> tuple[ForgeTraining, TrainerConfig]:
    """A ForgeTraining with only its required fields, and the trainer's configuration with only the same
    values: everything else is left to each side's defaults."""
    experts = {"experts": {"numExperts": 8, "numExpertsPerToken": 2}} if family == "moe" else {}
    ft = ForgeTraining.model_validate({
        "apiVersion": "forge.dev/v1alpha1", "kind": "ForgeTraining", "metadata": {"name": "bare"},
        "spec": {
            "method": "pretrain",
            "model": {"architecture": {"family": family, "numLayers": 6, "hiddenSize": 512,
                                       "numAttentionHeads": 8, **experts}},
            "tokenizer": {"train": {}},
            "data": {"sources": [{"name": "web", "location": {"pvc": {"claimName": "data"}}}]},
            "training": {"budget": {"maxSteps": 1000}},
            "checkpoint": {"location": {"pvc": {"claimName": "runs", "path": "ckpt"}}},
            "output": {"location": {"pvc": {"claimName": "runs", "path": "model"}}},
        },
    })
    trainer = TrainerConfig.model_validate({
        "run_name": "bare",
        "model": {"architecture": {"family": family, "num_layers": 6, "hidden_size": 512, "num_attention_heads": 8,
                                   **({"num_experts": 8, "num_experts_per_token": 2} if experts else {})}},
        "data": {"sources": [{"name": "web", "path": f"{PVC_MOUNT_ROOT}/data"}]},
        "training": {"budget": {"max_steps": 1000}},
        "checkpoint": {"dir": f"{PVC_MOUNT_ROOT}/runs/ckpt"},
        "output": {"dir": f"{PVC_MOUNT_ROOT}/runs/model"},
        "cache_dir": f"{PVC_MOUNT_ROOT}/runs/ckpt/.forge-cache",
    })
    return ft, trainer


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_a_spec_and_a_trainer_config_that_leave_everything_out_are_the_same_run(family):
    ft, trainer = _bare(family)
    assert trainer_config(ft).model_dump(mode="json") == trainer.model_dump(mode="json")


def test_derived_defaults_are_what_the_api_documents():
    """Computed once, by the trainer's configuration, from the values the API describes."""
    ft, _ = _bare("moe")
    cfg = trainer_config(ft)
    arch = cfg.model.architecture
    assert arch.intermediate_size == 1408  # about 8/3 x 512, rounded up to a multiple of 64
    assert arch.moe_intermediate_size == 1408 // 2  # intermediateSize / numExpertsPerToken
    assert cfg.training.min_lr == pytest.approx(shared.LEARNING_RATE / 10)
    assert cfg.data.validation.fraction == shared.VALIDATION_FRACTION == 0.01  # "1% of the training documents"
    assert "1%" in DataSpec.model_fields["validation"].description
    # what the spec sets wins over every derived default
    spec = ft.spec.model_copy(deep=True)
    spec.model.architecture.intermediate_size = 640
    spec.model.architecture.experts.expert_intermediate_size = 96
    spec.training.min_learning_rate = 1e-5
    cfg = trainer_config(ft.model_copy(update={"spec": spec}))
    assert (cfg.model.architecture.intermediate_size, cfg.model.architecture.moe_intermediate_size,
            cfg.training.min_lr) == (640, 96, 1e-5)


def test_sharding_and_document_masking_reach_the_trainer(tmp_path):
    """examples/continued-pretrain.yaml: HybridShard on two nodes and document masking, through the
    operator; left out, FullShard and no masking."""
    name, manifest = next((n, m) for n, m in EXAMPLES if m["spec"]["method"] == "continued-pretrain")
    cfg = _by_the_operator(manifest, tmp_path)
    assert not isinstance(cfg, str), cfg
    assert (cfg.training.sharding, cfg.method.kind, cfg.method.document_masking) == (
        "HybridShard", "continued-pretrain", True)
    bare = copy.deepcopy(manifest)
    del bare["spec"]["training"]["sharding"], bare["spec"]["training"]["documentMasking"]
    cfg = _by_the_operator(bare, tmp_path)
    assert (cfg.training.sharding, cfg.method.document_masking) == ("FullShard", False)


FP8_SHAPES = [  # family, hiddenSize, numAttentionHeads, numKeyValueHeads, intermediateSize, accepted
    ("dense", 512, 8, None, None, True),
    ("dense", 512, 32, 1, 1408, True),  # key/value width 16
    ("dense", 512, 64, 1, None, False),  # key/value width 8
    ("dense", 520, 8, None, None, False),
    ("dense", 512, 8, None, 1400, False),
    ("moe", 512, 8, 2, 1400, True),  # a dense MLP width that no MoE layer uses; experts stay bf16
    ("moe", 512, 64, 1, None, False),
]


@pytest.mark.parametrize("family, hidden, heads, kv, intermediate, accepted", FP8_SHAPES)
def test_fp8_reaches_the_trainer_and_both_sides_refuse_the_same_widths(family, hidden, heads, kv, intermediate,
                                                                       accepted):
    ft, trainer = _bare(family)
    spec = ft.model_dump(mode="json", by_alias=True, exclude_none=True)
    arch = {"hiddenSize": hidden, "numAttentionHeads": heads, "numKeyValueHeads": kv, "intermediateSize": intermediate}
    spec["spec"]["model"]["architecture"] |= {k: v for k, v in arch.items() if v is not None}
    spec["spec"]["training"]["precision"] = "fp8"
    raw = trainer.model_dump(mode="json")
    raw["model"]["architecture"] |= {"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv,
                                     "intermediate_size": intermediate or shared.intermediate_size(hidden),
                                     "moe_intermediate_size": None}
    raw["training"]["precision"] = "fp8"
    verdicts = []
    for model, data in ((ForgeTraining, spec), (TrainerConfig, raw)):
        try:
            model.model_validate(data)
            verdicts.append(None)
        except ValueError as e:
            verdicts.append(str(e))
    assert [v is None for v in verdicts] == [accepted, accepted], verdicts
    if accepted:
        assert trainer_config(ForgeTraining.model_validate(spec)).training.precision == "fp8"
    else:
        assert all("training.precision fp8 needs the widths of the transformer blocks' linear layers to be multiples "
                   "of 16" in v for v in verdicts), verdicts
