"""One resume policy: every recipe field is fixed by a checkpoint or may change; a resumed run that changes a fixed
field (or its dataset) is refused in one line naming the field, its saved and its new value; PBT varies only what a
checkpoint can continue with. No Ray: the run folder is a temporary folder and check_run_matches is called directly."""

from __future__ import annotations

import json

import pytest
import yaml

from cluster.storage import resolve
from genai import resume_policy, run as run_folder
from genai.config import RECIPE_KINDS, ConfigError, load_recipe, load_sweep, recipe_to_yaml
from genai.data.shards import dataset_fingerprint
from genai.resume_policy import DATASET, FIXED, FREE, HPARAM, POLICY


MANIFEST = {"kind": "text-tokens", "format_version": 1, "created_at": "2026-01-01T00:00:00Z", "source": "a.txt",
            "tokenizer": {"kind": "char", "sha256": "t0k"},
            "splits": {"train": {"shards": [{"path": "train/part-00000.parquet", "rows": 10, "sha256": "aaa"}]},
                       "val": {"shards": [{"path": "val/part-00000.parquet", "rows": 2, "sha256": "bbb"}]}}}


def identity(uri: str = "/data/corpus", **changes) -> dict:
    return resume_policy.dataset_identity(uri, {**MANIFEST, **changes})


@pytest.mark.parametrize("kind", sorted(RECIPE_KINDS))
def test_every_recipe_field_is_classified_once(kind):
    fields = resume_policy.recipe_field_paths(RECIPE_KINDS[kind])
    unclassified = [f for f in fields if f not in POLICY[kind]]
    assert unclassified == [], f"classify {unclassified} in genai/resume_policy.py POLICY[{kind!r}]"
    stale = [f for f in POLICY[kind] if f not in fields]
    assert stale == [], f"POLICY[{kind!r}] names fields the recipe no longer has: {stale}"
    assert set(POLICY[kind].values()) <= {FIXED, DATASET, HPARAM, FREE}


@pytest.mark.parametrize("kind", sorted(RECIPE_KINDS))
def test_pbt_varies_only_fields_a_resume_may_change(kind):
    pbt, mutable = set(resume_policy.pbt_fields(kind)), set(resume_policy.mutable_fields(kind))
    assert pbt and pbt <= mutable
    assert not mutable & set(resume_policy.fixed_fields(kind))
    assert "train.max_steps" in mutable - pbt  # every trial of a sweep keeps the same step budget


def test_what_a_gpt_checkpoint_fixes_and_what_may_change():
    fixed = set(resume_policy.fixed_fields("gpt"))
    assert {"model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.vocab_size",
            "deepspeed.zero_stage", "train.micro_batch_size", "train.grad_accum",
            "train.seq_len", "train.seed", "train.precision", "data.shuffle_buffer_tokens"} <= fixed
    assert {"data.uri", "data.source", "data.tokenizer"} <= set(resume_policy.fields("gpt", DATASET))
    assert {"train.lr", "train.min_lr", "train.warmup_steps", "train.lr_decay_steps", "train.max_steps",
            "train.log_interval", "train.eval_interval", "train.checkpoint_interval",
            "train.keep_checkpoints", "cluster.num_workers"} <= set(resume_policy.mutable_fields("gpt"))
    assert "cluster.num_workers" not in resume_policy.pbt_fields("gpt")  # resharded on resume, not a PBT knob


def test_what_a_gan_checkpoint_fixes():
    fixed = set(resume_policy.fixed_fields("gan"))
    assert {"model.z_dim", "model.ngf", "model.ndf", "train.batch_size", "train.n_critic", "train.seed",
            "data.shuffle_buffer", "deepspeed.generator.zero_stage", "deepspeed.discriminator.zero_stage"} <= fixed
    assert "cluster.num_workers" in set(resume_policy.mutable_fields("gan")) - set(resume_policy.pbt_fields("gan"))
    assert {"train.lr_g", "train.lr_d", "train.ema_decay"} <= set(resume_policy.pbt_fields("gan"))


def test_the_fingerprint_is_the_content_not_the_place_or_time():
    moved = {**MANIFEST, "created_at": "2027-05-05T00:00:00Z", "source": "/elsewhere/a.txt"}
    assert dataset_fingerprint(moved) == dataset_fingerprint(MANIFEST)
    other = json.loads(json.dumps(MANIFEST))
    other["splits"]["train"]["shards"][0]["sha256"] = "ccc"
    assert dataset_fingerprint(other) != dataset_fingerprint(MANIFEST)
    assert dataset_fingerprint({**MANIFEST, "tokenizer": {"sha256": "other"}}) != dataset_fingerprint(MANIFEST)


def started(tmp_path, recipe, dataset: dict | None = None):
    """A run folder as the driver leaves it after starting `recipe` (recipe.yaml, and dataset.json if given)."""
    run = resolve(str(tmp_path / "run"))
    run.join(run_folder.RECIPE_FILE).write_text(recipe_to_yaml(recipe))
    if dataset is not None:
        run.join(run_folder.DATASET_FILE).write_text(json.dumps(dataset))
    return run


def refusal(run, recipe, dataset=None) -> str:
    with pytest.raises(ConfigError) as err:
        run_folder.check_run_matches(run, recipe, dataset)
    message = str(err.value)
    assert "\n" not in message and "use another --name" in message
    return message


def test_the_same_command_line_resumes(tmp_path):
    recipe = load_recipe("tiny", ["cluster.num_workers=2", "deepspeed.zero_stage=3"])
    run = started(tmp_path, recipe, identity())
    run_folder.check_run_matches(run, recipe, identity())
    run_folder.check_run_matches(run, load_recipe("tiny", ["cluster.num_workers=2", "deepspeed.zero_stage=3"]),
                                 identity())


def test_a_new_run_folder_takes_any_recipe(tmp_path):
    run_folder.check_run_matches(resolve(str(tmp_path / "fresh")), load_recipe("tiny"), identity())


@pytest.mark.parametrize("override, saved, new", [
    ("train.micro_batch_size=4", "train.micro_batch_size=8", "train.micro_batch_size=4"),
    ("train.grad_accum=2", "train.grad_accum=1", "train.grad_accum=2"),
    ("train.seq_len=16", "train.seq_len=32", "train.seq_len=16"),  # null seq_len is model.block_size (32)
    ("train.seed=7", "train.seed=1337", "train.seed=7"),
    ("data.shuffle_buffer_tokens=64", "data.shuffle_buffer_tokens=16384", "data.shuffle_buffer_tokens=64"),
    ("deepspeed.zero_stage=2", "deepspeed.zero_stage=0", "deepspeed.zero_stage=2"),
    ("model.n_embd=64", "model.n_embd=32", "model.n_embd=64"),
    ("train.precision=bf16", "train.precision=fp32", "train.precision=bf16"),  # auto on CPU is fp32
])
def test_changing_a_fixed_field_is_refused_with_both_values(tmp_path, override, saved, new):
    run = started(tmp_path, load_recipe("tiny"), identity())
    message = refusal(run, load_recipe("tiny", [override]), identity())
    assert f"exists with {saved}, this recipe has {new}:" in message


@pytest.mark.parametrize("override", [
    "train.lr=1e-4", "train.min_lr=1e-5", "train.warmup_steps=2", "train.lr_decay_steps=100", "train.max_steps=90",
    "train.log_interval=1", "train.eval_interval=5", "train.checkpoint_interval=5", "train.keep_checkpoints=4",
    "train.grad_clip=0.5", "train.weight_decay=0.0", "model.dropout=0.1", "train.peak_flops=1e12",
    "cluster.max_failures=0", "train.seq_len=32", "train.precision=fp32", "name=renamed",
    "cluster.num_workers=2",  # the checkpoint is resharded (genai/train/reshard.py)
])
def test_changing_what_a_checkpoint_does_not_fix_resumes(tmp_path, override):
    run = started(tmp_path, load_recipe("tiny"), identity())
    run_folder.check_run_matches(run, load_recipe("tiny", [override]), identity())


def test_every_conflict_is_named_on_one_line(tmp_path):
    run = started(tmp_path, load_recipe("tiny"), identity())
    message = refusal(run, load_recipe("tiny", ["train.seed=1", "train.grad_accum=3"]), identity())
    assert "exists with train.grad_accum=1 and train.seed=1337, this recipe has train.grad_accum=3 and train.seed=1:" \
        in message


def test_the_dataset_is_compared_by_content(tmp_path):
    # Started with data.uri unset: the builtin corpus was prepared into the cache, and that is what was recorded.
    run = started(tmp_path, load_recipe("tiny"), identity("/cache/shakespeare-char-abc"))
    run_folder.check_run_matches(run, load_recipe("tiny"), identity("/cache/shakespeare-char-abc"))
    # The same dataset given explicitly, or copied to object storage: the same content.
    run_folder.check_run_matches(run, load_recipe("tiny", ["data.uri=s3://datasets/sh"]), identity("s3://datasets/sh"))
    # Other data, even at the same place (re-prepared from another corpus): the data order breaks.
    message = refusal(run, load_recipe("tiny"), identity("/cache/shakespeare-char-abc", tokenizer={"sha256": "x"}))
    assert "exists with data.uri=/cache/shakespeare-char-abc (content " in message
    assert "this recipe has data.uri=/cache/shakespeare-char-abc (content " in message


def test_a_run_folder_without_a_recorded_dataset_compares_the_data_fields(tmp_path):
    run = started(tmp_path, load_recipe("tiny"))
    run_folder.check_run_matches(run, load_recipe("tiny"), identity())
    message = refusal(run, load_recipe("tiny", ["data.uri=/data/other"]), identity("/data/other"))
    assert "exists with data.uri=null, this recipe has data.uri=/data/other:" in message


def test_fields_the_saved_recipe_does_not_record_are_not_compared(tmp_path):
    run = resolve(str(tmp_path / "run"))
    run.join(run_folder.RECIPE_FILE).write_text("model: {n_layer: 9}\n")
    message = refusal(run, load_recipe("tiny"), identity())
    assert "exists with model.n_layer=9, this recipe has model.n_layer=2:" in message


def test_a_run_of_another_kind_is_refused(tmp_path):
    run = started(tmp_path, load_recipe("tiny-gan"))
    with pytest.raises(ConfigError, match="is a gan run: use another --name"):
        run_folder.check_run_matches(run, load_recipe("tiny"), identity())


@pytest.mark.parametrize("override, refused", [
    ("train.batch_size=32", True), ("train.n_critic=2", True), ("model.z_dim=8", True), ("train.seed=3", True),
    ("data.shuffle_buffer=8", True), ("deepspeed.generator.zero_stage=1", True),
    ("train.lr_g=1e-3", False), ("train.ema_decay=0.99", False), ("train.max_steps=99", False),
    ("model.loss=hinge", False),
])
def test_gan_runs_follow_the_same_policy(tmp_path, override, refused):
    run = started(tmp_path, load_recipe("tiny-gan"), identity())
    recipe = load_recipe("tiny-gan", [override])
    if refused:
        assert f"this recipe has {override}:" in refusal(run, recipe, identity())
    else:
        run_folder.check_run_matches(run, recipe, identity())


def sweep_file(tmp_path, base: str, parameters: dict, overrides: list[str]) -> str:
    path = tmp_path / "pbt.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "base_recipe": base, "overrides": overrides,
                                    "parameters": parameters, "search": "grid", "num_samples": 1,
                                    "scheduler": {"type": "pbt", "perturbation_interval": 20}}))
    return str(path)


@pytest.mark.parametrize("base, key, values, why", [
    ("tiny", "train.micro_batch_size", [4, 8], r" \(which fix it\), so"),
    ("tiny", "train.seed", [1, 2], r" \(which fix it\), so"),
    ("tiny", "train.max_steps", [60, 80], ", so"),  # may change on resume, but every trial keeps the budget
    ("tiny-gan", "train.n_critic", [1, 2], r" \(which fix it\), so"),
])
def test_pbt_may_not_vary_what_a_checkpoint_fixes(tmp_path, base, key, values, why):
    overrides = ["train.max_steps=60", "train.eval_interval=10", "train.checkpoint_interval=20"]
    with pytest.raises(ConfigError, match=rf"parameters\.{key}: PBT continues trials from other trials' "
                                          rf"checkpoints{why} it can only vary .*train\.lr"):
        load_sweep(sweep_file(tmp_path, base, {key: {"grid": values}}, overrides))


@pytest.mark.parametrize("base, key", [("tiny", "train.lr"), ("tiny", "model.dropout"), ("tiny", "train.weight_decay"),
                                       ("tiny-gan", "train.lr_d")])
def test_pbt_may_vary_hyperparameters(tmp_path, base, key):
    overrides = ["train.max_steps=60", "train.eval_interval=10", "train.checkpoint_interval=20"]
    values = [0.0, 0.1] if key in ("model.dropout", "train.weight_decay") else [1e-3, 2e-3]
    sweep, _ = load_sweep(sweep_file(tmp_path, base, {key: {"grid": values}}, overrides))
    assert set(sweep.parameters) == {key}
