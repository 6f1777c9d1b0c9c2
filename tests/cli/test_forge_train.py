"""`forge train FILE.yaml`: the ForgeTraining a cluster accepts, run on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from forge_operator.cli.local import local_config, parse_volumes

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "trainer"))
from trainer_helpers import write_corpus  # noqa: E402

TINY = {
    "apiVersion": "forge.dev/v1alpha1", "kind": "ForgeTraining", "metadata": {"name": "tiny"},
    "spec": {
        "method": "pretrain",
        "model": {"architecture": {"numLayers": 2, "hiddenSize": 64, "intermediateSize": 128,
                                   "numAttentionHeads": 4, "numKeyValueHeads": 2, "contextLength": 128}},
        "tokenizer": {"train": {"vocabSize": 320}},
        "data": {"sources": [{"name": "toy", "location": {"pvc": {"claimName": "data"}}}],
                 "validation": {"fraction": 0.05}},
        "training": {"sequenceLength": 64, "globalBatch": {"sequences": 16}, "microBatchSize": 4,
                     "learningRate": 0.003, "warmupSteps": 5, "evalIntervalSteps": 10, "budget": {"maxSteps": 20}},
        "resources": {"numNodes": 2, "gpusPerNode": 8},  # ignored locally: one process
        "checkpoint": {"location": {"pvc": {"claimName": "runs", "path": "tiny/ckpt"}}, "intervalSteps": 10},
        "output": {"location": {"pvc": {"claimName": "runs", "path": "tiny/model"}}},
    },
}


def forge(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forge_operator", *args], cwd=cwd, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT / "operator") + os.pathsep
                                            + str(ROOT / "trainer-image")} | (env or {}), timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`forge train` of the tiny file to its budget: (its folder, the command, what it printed)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(tmp_path / "corpus")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    args = ("train", str(spec), "--volume", f"data={corpus}", "--volume", f"runs={tmp_path / 'runs'}", "--prompt", "alice has")
    return tmp_path, args, forge(*args, cwd=tmp_path)


def test_forge_train_runs_a_forgetraining_file_locally(trained):
    tmp_path, _, out = trained
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 20," in out.stdout and "validation loss" in out.stdout and "perplexity" in out.stdout
    assert "sample ('alice has' ->)" in out.stdout
    model = tmp_path / "runs" / "tiny" / "model"
    assert (model / "config.json").exists() and (model / "provenance.json").exists()
    assert (tmp_path / "runs" / "tiny" / "ckpt").is_dir()
    # the progress bar reports step, loss and tokens/s
    assert "20/20" in out.stderr and "loss=" in out.stderr and "tok/s=" in out.stderr
    assert "already complete" not in out.stdout


def test_forge_train_again_after_the_training_finished(trained):
    """Nothing left to train: it says so, and reports the final numbers and a sample as the first run did."""
    tmp_path, args, first = trained
    assert first.returncode == 0, first.stderr[-3000:]
    out = forge(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tiny is already complete at step 20" in out.stdout
    lines = lambda text, start: [line for line in text.splitlines() if line.startswith(start)]  # noqa: E731
    assert lines(out.stdout, "step 20,") == lines(first.stdout, "step 20,")  # with the train loss
    assert lines(out.stdout, "validation loss") == lines(first.stdout, "validation loss") != []
    assert "sample ('alice has' ->)" in out.stdout


def test_forge_train_reports_what_it_cannot_run(tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(TINY))
    bad["spec"]["data"]["sources"][0]["location"] = {"s3": {"uri": "s3://bucket/corpus"}}
    bad["spec"]["output"]["location"] = {"s3": {"uri": "s3://bucket/model", "region": "eu-west-1"}}
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(bad))
    out = forge("train", str(spec), cwd=tmp_path)
    assert out.returncode == 78
    assert "spec.output.location.s3: every S3 location of a training must use the same endpoint" in out.stderr

    bad["spec"]["training"]["learningRate"] = "fast"
    spec.write_text(yaml.safe_dump(bad))
    out = forge("train", str(spec), cwd=tmp_path)
    assert out.returncode == 78 and "spec.training.learningRate" in out.stderr


def test_empty_data_folder_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    out = forge("train", str(spec), "--volume", f"data={tmp_path / 'empty'}", "--volume", f"runs={tmp_path / 'r'}",
                cwd=tmp_path)
    assert out.returncode == 65, out.stderr[-2000:]
    assert "data" in out.stderr and "no files" in out.stderr.lower()


def test_volumes_are_claim_to_folder():
    assert parse_volumes(["a=/x", "b=rel"]) == {"a": Path("/x"), "b": Path("rel").resolve()}


def test_quickstart_file_trains_on_the_standard_library(tmp_path):
    """The quickstart's own file, cut to 2 steps: the data is there on every machine, and it trains."""
    import json
    import math
    import sysconfig

    import forge_trainer

    _, cfg = local_config(str(ROOT / "examples" / "quickstart.yaml"),
                          [f"stdlib={sysconfig.get_paths()['stdlib']}", f"runs={tmp_path}"])
    cfg.training.budget.max_steps = 2
    summary = forge_trainer.run(cfg)
    assert summary.step == 2 and math.isfinite(summary.val_loss)
    manifest = json.loads(next(Path(cfg.cache_dir).glob("tokens/*/manifest.json")).read_text())
    assert len(manifest["sources"][0]["files"]) > 100 and manifest["vocab_size"] == 4096
    assert forge_trainer.sample(cfg.output.dir, "def ", max_new_tokens=4)


def test_forge_train_fine_tunes_a_base_model_like_the_sft_example(tmp_path):
    """examples/sft.yaml, cut to a tiny base made here and a few steps: prompt/response records in the
    example's volumes, the base model's tokenizer, a separate validation source."""
    import json

    from sft_helpers import make_base, write_records

    spec = yaml.safe_load((ROOT / "examples" / "sft.yaml").read_text())
    spec["spec"]["training"] = {"sequenceLength": 128, "globalBatch": {"sequences": 8}, "microBatchSize": 4,
                                "learningRate": 0.003, "warmupSteps": 1, "evalIntervalSteps": 3,
                                "budget": {"maxSteps": 6}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(spec))
    models, data = tmp_path / "models", tmp_path / "sft-data"
    models.mkdir()
    make_base(tmp_path, "llama").rename(models / "legal-continued-1b")  # where the example's spec.model.base is
    for part, n, seed in (("train", 64, 0), ("validation", 8, 1)):
        records = [json.loads(x) for x in write_records(tmp_path / f"{part}.jsonl", "pairs", n, seed).read_text().splitlines()]
        (data / part).mkdir(parents=True)
        (data / part / "records.jsonl").write_text(
            "".join(json.dumps({"prompt": r["prompt"], "response": r["completion"]}) + "\n" for r in records))
    out = forge("train", "sft.yaml", "--volume", f"forge-models={models}", "--volume", f"sft-data={data}",
                "--volume", f"forge-checkpoints={tmp_path / 'ckpt'}", "--prompt", "what does bob like?\n", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(sft)" in out.stderr and "step 6," in out.stdout and "validation loss" in out.stdout
    assert "sample ('what does bob like?\\n' ->)" in out.stdout
    model = models / "sft-assistant-1b"
    provenance = json.loads((model / "provenance.json").read_text())
    assert provenance["method"] == "sft" and [s["name"] for s in provenance["data"]["sources"]] == [
        "instructions", "instructions-val"]
    assert (model / "chat_template.jinja").exists()  # the default template: the base's tokenizer has none
    generation = json.loads((model / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"]  # its turns end with the end-of-text token


def test_forge_train_aligns_a_model_like_the_dpo_example(tmp_path):
    """examples/dpo.yaml, cut to a tiny base made here and a few steps: prompt/chosen/rejected records in
    the example's volumes, the base's tokenizer, the example's beta and loss type."""
    import json

    from sft_helpers import make_base, write_preferences

    spec = yaml.safe_load((ROOT / "examples" / "dpo.yaml").read_text())
    spec["spec"]["training"] |= {"sequenceLength": 128, "globalBatch": {"sequences": 8}, "microBatchSize": 4,
                                 "learningRate": 0.001, "warmupSteps": 1, "evalIntervalSteps": 3,
                                 "budget": {"maxSteps": 6}}
    spec["spec"]["data"]["validation"] = {"fraction": 0.1}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(spec))
    models, data = tmp_path / "models", tmp_path / "preference-data"
    models.mkdir()
    make_base(tmp_path, "llama").rename(models / "sft-assistant-1b")  # where the example's spec.model.base is
    write_preferences(data / "pairs.jsonl", 80)
    out = forge("train", "dpo.yaml", "--volume", f"forge-models={models}", "--volume", f"preference-data={data}",
                "--volume", f"forge-checkpoints={tmp_path / 'ckpt'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(dpo)" in out.stderr and "step 6," in out.stdout and "validation loss" in out.stdout
    assert "reward acc=" in out.stderr  # the progress bar shows dpo's reward accuracy
    provenance = json.loads((models / "dpo-assistant-1b" / "provenance.json").read_text())
    assert provenance["method"] == "dpo" and provenance["config"]["method"] == {
        "kind": "dpo", "beta": 0.1, "loss_type": "sigmoid"}
    assert provenance["data"]["sources"][0]["records"] == "preference"


@pytest.mark.slow
def test_the_examples_chain_continued_pretraining_sft_and_dpo(tmp_path):
    """examples/continued-pretrain.yaml -> sft.yaml -> dpo.yaml, cut to a few steps each, in one
    forge-models volume: each starts from the model the one before exported (the paths the examples
    name), and dpo trains LoRA adapters (the example's training.lora) and exports them merged."""
    import json

    from sft_helpers import make_base, write_preferences, write_records

    models = tmp_path / "models"
    (models / "base").mkdir(parents=True)
    make_base(tmp_path, "llama").rename(models / "base" / "model-1b")
    volumes = {"forge-models": models, "legal-corpus": write_corpus(tmp_path / "corpus", files=8),
               "sft-data": tmp_path / "sft-data", "preference-data": tmp_path / "preference-data",
               "forge-checkpoints": tmp_path / "ckpt"}
    for part, n, seed in (("train", 48, 0), ("validation", 8, 1)):
        records = [json.loads(x) for x in write_records(tmp_path / f"{part}.jsonl", "pairs", n, seed).read_text().splitlines()]
        (volumes["sft-data"] / part).mkdir(parents=True)
        (volumes["sft-data"] / part / "records.jsonl").write_text(
            "".join(json.dumps({"prompt": r["prompt"], "response": r["completion"]}) + "\n" for r in records))
    write_preferences(volumes["preference-data"] / "pairs.jsonl", 48)
    tiny = {"sequenceLength": 128, "globalBatch": {"sequences": 4}, "microBatchSize": 4, "warmupSteps": 1,
            "evalIntervalSteps": 3, "budget": {"maxSteps": 3}}
    chain = [("continued-pretrain", "base/model-1b", "legal-continued-1b"),
             ("sft", "legal-continued-1b", "sft-assistant-1b"), ("dpo", "sft-assistant-1b", "dpo-assistant-1b")]
    for name, base, output in chain:
        spec = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
        assert (spec["spec"]["model"]["base"]["pvc"]["path"], spec["spec"]["output"]["location"]["pvc"]["path"]) == \
            (base, output)
        spec["spec"]["training"] = {k: v for k, v in spec["spec"]["training"].items()
                                    if k in ("learningRate", "schedule", "dpoBeta", "dpoLossType", "lora")} | tiny
        if name == "continued-pretrain":
            spec["spec"]["training"]["learningRate"] = 0.003
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        out = forge("train", f"{name}.yaml", *[a for c, d in volumes.items() for a in ("--volume", f"{c}={d}")],
                    cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        provenance = json.loads((models / output / "provenance.json").read_text())
        assert provenance["method"] == name and provenance["config"]["model"]["base_path"].endswith("/" + base)
    assert provenance["config"]["training"]["lora"]["export"] == "merged"
    assert (models / "dpo-assistant-1b" / "model.safetensors").exists()


def test_a_reward_configmap_is_read_from_the_volume_folder_of_its_name(tmp_path):
    """forge train runs examples/grpo.yaml with the reward ConfigMap as a local folder (--volume NAME=DIR)."""
    _, cfg = local_config(str(ROOT / "examples" / "grpo.yaml"),
                          [f"arithmetic-rewards={ROOT / 'examples' / 'grpo'}", f"rl-data={tmp_path}"])
    assert cfg.method.kind == "grpo"
    digits = next(r for r in cfg.method.rewards if r.name == "digits")
    assert digits.function == f"{ROOT / 'examples' / 'grpo' / 'arithmetic_reward.py'}:digits"
    assert Path(digits.function.rpartition(":")[0]).is_file()


@pytest.mark.slow  # a whole forge train (and a refused one): about a minute on 2 busy cores
def test_forge_train_with_data_checkpoints_and_model_on_an_s3_compatible_store(s3server, bucket, tmp_path):
    """The same file with S3 locations, against a real server; credentials from the environment."""
    client = s3server.client()
    for path in sorted(write_corpus(tmp_path / "corpus", files=20).iterdir()):
        client.upload_file(str(path), bucket, f"toy/{path.name}")
    store = {"endpoint": s3server.endpoint, "pathStyle": True, "secretRef": {"name": "ignored-locally"}}
    manifest = yaml.safe_load(yaml.safe_dump(TINY))
    manifest["spec"]["data"]["sources"][0]["location"] = {"s3": {"uri": f"s3://{bucket}/toy", **store}}
    manifest["spec"]["checkpoint"]["location"] = {"s3": {"uri": f"s3://{bucket}/tiny/ckpt", **store}}
    manifest["spec"]["output"]["location"] = {"s3": {"uri": f"s3://{bucket}/tiny/model", **store}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(manifest))
    out = forge("train", "tiny.yaml", cwd=tmp_path, env=s3server.env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 20," in out.stdout and "sample (" in out.stdout
    assert f"model: s3://{bucket}/tiny/model" in out.stdout
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="tiny/")["Contents"]}
    assert {"tiny/model/provenance.json", "tiny/model/model.safetensors", "tiny/ckpt/latest",
            "tiny/ckpt/step-00000020/trainer_state.json"} <= keys
    assert not [p for p in tmp_path.rglob("*.distcp")]  # nothing of the checkpoints stays here

    wrong = forge("train", "tiny.yaml", cwd=tmp_path, env=s3server.env() | {"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert wrong.returncode == 78
    assert (f"forge: storage error: spec.data.sources[0].location s3://{bucket}/toy: the S3 credentials were refused"
            in wrong.stderr) and "check the Secret of spec.data.sources[0].location.s3.secretRef" in wrong.stderr
