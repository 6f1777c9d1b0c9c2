"""ForgeTraining -> TrainerConfig: the one translation both the operator and `forge train` use.

Pure. Where a PersistentVolumeClaim path ends up on disk is the caller's
business (in a pod: under /mnt/pvc/<claim>; locally: a folder given with
--volume), so it is passed in as ``resolve``.

It translates, it does not default: a field the spec leaves out (None) is left out of the
trainer's configuration too, which applies the default both share (``forge_trainer.defaults``),
the derived ones included (the MLP widths, the minimum learning rate, the validation fraction).
Only the representation changes (0 = off becomes None, a token batch becomes sequences, a PVC
path becomes a folder, an S3 location its s3:// URL plus the run's one ``s3`` setting).
"""

from __future__ import annotations

from typing import Any, Callable

from forge_trainer.config import (
    ArchitectureConfig, BudgetConfig, CheckpointConfig, DataConfig, DataSourceConfig, DpoMethod, EgressConfig,
    GrpoMethod, LoraConfig, MetricsConfig, ModelConfig, OnlineDpoMethod,
    OutputConfig, ProvenanceConfig, ResidencyConfig, RewardConfig, S3Config, TokenizerConfig, TokenizerTrainConfig,
    TrainerConfig,
    TrainingConfig,
    ValidationConfig,
)

from ..api.base import PvcLocation, S3Location, StorageLocation
from ..api.names import PVC_MOUNT_ROOT, SCRATCH_MOUNT, SIGNING_KEY_MOUNT
from ..api.rewards import config_map_path, reward_config
from ..api.storage import one_s3_setting
from ..api.training import ONLINE_METHODS, ArchitectureSpec, DataSource, ForgeTraining, ForgeTrainingSpec, RewardSpec

Resolve = Callable[[PvcLocation], str]


class TranslationError(ValueError):
    """The spec is valid, but this trainer cannot run it; the message names the field."""


def pod_path(loc: PvcLocation) -> str:
    """Where a PVC path is inside a worker pod."""
    return f"{PVC_MOUNT_ROOT}/{loc.claim_name}" + (f"/{loc.path.strip('/')}" if loc.path.strip("/") else "")


def signing_key_folder(secret_name: str) -> str:
    """Where the worker pods mount spec.provenance.signingKeySecret."""
    return SIGNING_KEY_MOUNT


def _given(**values: Any) -> dict[str, Any]:
    """The values the spec sets: the others are left to the trainer's configuration's defaults."""
    return {k: v for k, v in values.items() if v is not None}


def _where(location: StorageLocation, resolve: Resolve) -> str:
    """A folder (a PVC path, resolved) or an s3://bucket/prefix URL, as the trainer's configuration writes it."""
    if location.pvc is not None:
        return resolve(location.pvc)
    return location.s3.uri.rstrip("/")


def s3_locations(spec: ForgeTrainingSpec) -> dict[str, S3Location]:
    """The spec's S3 locations by field."""
    found: dict[str, StorageLocation | None] = {
        **{f"spec.data.sources[{i}].location": s.location for i, s in enumerate(spec.data.sources)},
        "spec.data.validation.source.location": (spec.data.validation.source.location
                                                 if spec.data.validation and spec.data.validation.source else None),
        "spec.model.base": spec.model.base, "spec.tokenizer.source": spec.tokenizer.source,
        "spec.checkpoint.location": spec.checkpoint.location, "spec.output.location": spec.output.location,
    }
    return {field: loc.s3 for field, loc in found.items() if loc is not None and loc.s3 is not None}


def _s3_settings(spec: ForgeTrainingSpec) -> S3Config | None:
    """The one way the trainer reaches the store: every S3 location of a training shares it."""
    return one_s3_setting(s3_locations(spec), "a training", TranslationError)


def cache_on_scratch(spec: ForgeTrainingSpec) -> bool:
    """The prepared data goes to the workers' node-local scratch when the checkpoints do not go to a claim."""
    return spec.checkpoint.location.pvc is None


def _architecture(a: ArchitectureSpec) -> ArchitectureConfig:
    moe = {}
    if a.experts is not None:
        e = a.experts
        moe = _given(num_experts=e.num_experts, num_experts_per_token=e.num_experts_per_token,
                     moe_intermediate_size=e.expert_intermediate_size, router_aux_loss_coef=e.router_aux_loss_coef)
    return ArchitectureConfig(
        family=a.family, num_layers=a.num_layers, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
        max_position_embeddings=a.context_length, rope_theta=a.rope_theta,
        tie_word_embeddings=a.tie_word_embeddings, **moe)


def _source(s: DataSource, field: str, resolve: Resolve, records: bool) -> DataSourceConfig:
    """``records``: the method reads records (sft, dpo), so the fields that name a record's parts go along."""
    fields = _given(prompt_field=s.prompt_field, completion_field=s.completion_field, messages_field=s.messages_field,
                    chosen_field=s.chosen_field, rejected_field=s.rejected_field) if records else {}
    return DataSourceConfig(name=s.name, path=_where(s.location, resolve), format=s.format,
                            weight=s.weight, **_given(include=s.include, text_field=s.text_field), **fields)


def _method(spec: ForgeTrainingSpec, resolve: Resolve, config_map: Callable[[str], str]):
    """The trainer's method and its settings (those the spec leaves out: the trainer's defaults)."""
    t = spec.training
    if spec.method == "dpo":
        return DpoMethod(**_given(beta=t.dpo_beta, loss_type=t.dpo_loss_type))
    if spec.method in ("pretrain", "continued-pretrain"):
        return {"kind": spec.method, "document_masking": t.document_masking}
    if spec.method not in ONLINE_METHODS:
        return spec.method
    sampling = t.sampling.model_dump(exclude_unset=True, by_alias=False) if t.sampling else {}
    rewards = [_reward(r, f"spec.rewards[{i}]", resolve, config_map) for i, r in enumerate(spec.rewards or [])]
    if spec.method == "grpo":
        return GrpoMethod(rewards=rewards, **sampling, **(t.grpo.model_dump(exclude_unset=True, by_alias=False) if t.grpo else {}))
    return OnlineDpoMethod(rewards=rewards, **sampling, **_given(beta=t.dpo_beta, loss_type=t.dpo_loss_type))


def _reward(r: RewardSpec, field: str, resolve: Resolve, config_map: Callable[[str], str]) -> RewardConfig:
    return reward_config(r, field, resolve, config_map, TranslationError)


def _provenance(spec: ForgeTrainingSpec, secret: Callable[[str], str]) -> ProvenanceConfig:
    key = spec.provenance.signing_key_secret
    return ProvenanceConfig(signing_key=f"{secret(key.name)}/{key.key}" if key is not None else None)


def trainer_config(ft: ForgeTraining, resolve: Resolve = pod_path, *, cache_dir: str | None = None,
                   metrics: MetricsConfig | None = None, world_size: int | None = None,
                   termination_message_path: str | None = None,
                   config_map: Callable[[str], str] = config_map_path,
                   secret: Callable[[str], str] = signing_key_folder) -> TrainerConfig:
    """Build the trainer's configuration. Raises TranslationError (or pydantic's ValueError) naming the field.

    What depends on where it runs, not on the spec, is the caller's: ``resolve``, ``cache_dir`` (default:
    beside the checkpoints on their claim, or the workers' scratch when they go to S3), ``metrics`` and ``termination_message_path`` (default: the trainer's, which
    are the worker pods'), ``world_size`` (default: numNodes x gpusPerNode; one process locally), ``config_map``
    (the folder of a reward ConfigMap; default: where the worker pods mount it), ``secret`` (the folder of the
    signing key's Secret; default: where the worker pods mount it).
    """
    spec = ft.spec
    t = spec.training
    records = spec.method in ("sft", "dpo", *ONLINE_METHODS)
    method = _method(spec, resolve, config_map)

    if spec.model.architecture is not None:
        model = ModelConfig(architecture=_architecture(spec.model.architecture))
    else:
        model = ModelConfig(base_path=_where(spec.model.base, resolve))

    tok = spec.tokenizer
    if tok.train is not None:
        tokenizer = TokenizerConfig(train=TokenizerTrainConfig(vocab_size=tok.train.vocab_size))
    elif tok.from_base:
        tokenizer = TokenizerConfig(from_base=True)
    else:
        tokenizer = TokenizerConfig(path=_where(tok.source, resolve))

    sources = [_source(s, f"spec.data.sources[{i}]", resolve, records) for i, s in enumerate(spec.data.sources)]
    validation = None  # left out: the trainer's default share of the documents
    v = spec.data.validation
    if v is not None and v.fraction is not None:
        validation = ValidationConfig(fraction=v.fraction)
    elif v is not None and v.source is not None:
        sources.append(_source(v.source, "spec.data.validation.source", resolve, records))
        validation = ValidationConfig(source=v.source.name)

    gb = t.global_batch
    global_sequences = gb.sequences if gb.sequences is not None else max(1, gb.tokens // t.sequence_length)
    world = world_size or spec.resources.num_nodes * max(1, spec.resources.gpus_per_node)
    if global_sequences % (t.micro_batch_size * world):
        raise TranslationError(
            f"spec.training.globalBatch: {global_sequences} sequences is not a multiple of "
            f"microBatchSize x GPUs ({t.micro_batch_size} x {world} = {t.micro_batch_size * world})")

    training = TrainingConfig(
        seq_len=t.sequence_length, global_batch_sequences=global_sequences, micro_batch_sequences=t.micro_batch_size,
        lr=t.learning_rate, min_lr=t.min_learning_rate, schedule=t.schedule, warmup_steps=t.warmup_steps,
        decay_fraction=t.decay_fraction, weight_decay=t.weight_decay, grad_clip=t.gradient_clipping or None,
        precision=t.precision, seed=t.seed, compile=t.compile, activation_checkpointing=t.activation_checkpointing,
        sharding=t.sharding, eval_interval_steps=t.eval_interval_steps,
        lora=LoraConfig(r=t.lora.r, alpha=t.lora.alpha, dropout=t.lora.dropout, target_modules=t.lora.target_modules,
                        export=t.lora.export) if t.lora is not None else None,
        budget=BudgetConfig(max_steps=t.budget.max_steps, max_tokens=t.budget.max_tokens,
                            deadline=t.budget.deadline),
    )
    ck = spec.checkpoint
    checkpoint_dir = _where(ck.location, resolve)
    checkpoint = CheckpointConfig(
        dir=checkpoint_dir, interval_steps=ck.interval_steps or None, interval_minutes=ck.interval_minutes or None,
        keep_last=ck.keep_last, retain_after_success=ck.retain_after_success,
        **_given(resume=f"{checkpoint_dir}/{ck.resume_from.strip('/')}" if ck.resume_from else None))
    return TrainerConfig(
        run_name=f"{ft.metadata.namespace}/{ft.metadata.name}" if ft.metadata.namespace else ft.metadata.name,
        method=method, model=model, tokenizer=tokenizer,
        data=DataConfig(sources=sources, **_given(validation=validation)), training=training, checkpoint=checkpoint,
        output=OutputConfig(dir=_where(spec.output.location, resolve), file_mode=spec.output.file_mode),
        provenance=_provenance(spec, secret),
        # shared by all nodes on the checkpoints' claim: rank 0 prepares the token shards once, the others read
        # them; with checkpoints on S3, each node prepares its own on its scratch
        cache_dir=cache_dir or (f"{SCRATCH_MOUNT}/cache" if cache_on_scratch(spec) else f"{checkpoint_dir}/.forge-cache"),
        egress=EgressConfig(lock=spec.network.egress == "Restricted"),
        residency=ResidencyConfig(regions=spec.residency.regions or [], zones=spec.residency.zones or [])
        if spec.residency else None,
        **_given(metrics=metrics, termination_message_path=termination_message_path, s3=_s3_settings(spec)),
    )
