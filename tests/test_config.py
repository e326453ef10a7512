"""Recipes: shipped recipes load, every bad input names its field, overrides apply."""

import pytest

from genai.config import (ConfigError, GANRecipe, NLGRecipe, available_recipes, load_recipe, load_sweep, parse_yaml,
                          recipe_to_yaml)


BRING_YOUR_DATA = {"gpt2-small", "finetune"}  # recipes for a prepared corpus (a large one; one in the init model's tokens)
A_DATASET = "data.uri=s3://datasets/corpus-bpe"


@pytest.mark.parametrize("name", available_recipes())
def test_shipped_recipes_are_valid(name):
    recipe = load_recipe(name, [A_DATASET] if name in BRING_YOUR_DATA else [])
    assert recipe.name == name


@pytest.mark.parametrize("name", sorted(BRING_YOUR_DATA))
def test_a_recipe_without_a_corpus_requires_a_prepared_dataset(name):
    with pytest.raises(ConfigError, match="data: data.uri is required: this recipe names no corpus to prepare"):
        load_recipe(name)
    assert load_recipe(name, [A_DATASET]).data.source is None


def test_the_three_promised_recipes_ship():
    assert {"tiny", "shakespeare-char", "gpt2-small"} <= set(available_recipes())
    gpu = load_recipe("gpt2-small", [A_DATASET])
    assert (gpu.model.n_layer, gpu.model.n_head, gpu.model.n_embd) == (12, 12, 768)
    assert gpu.train.precision == "bf16" and gpu.deepspeed.zero_stage == 2 and gpu.cluster.use_gpu


def test_overrides_are_typed_from_yaml():
    r = load_recipe("tiny", ["train.lr=3e-4", "cluster.num_workers=2", "deepspeed.zero_stage=3",
                             "cluster.use_gpu=false"])
    assert r.train.lr == pytest.approx(3e-4)
    assert r.cluster.num_workers == 2 and r.deepspeed.zero_stage == 3


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "train.lrr: unknown field"),
    ("train.lr=fast", "train.lr: Input should be a valid number"),
    ("model.n_layer=0", "model.n_layer: Input should be greater than or equal to 1"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage: Input should be less than or equal to 3"),
    ("train.seq_len=999", "train.seq_len=999 is larger than the model's context model.block_size=32"),
    ("train.global_batch_size=100", "train.global_batch_size=100 does not equal"),
    ("model.n_head=3", "model.n_embd=32 is not divisible by model.n_head=3"),
    ("deepspeed.offload_param=cpu", "deepspeed.offload_param needs deepspeed.zero_stage = 3"),
    ("train.precision=fp16", "train.precision=fp16 needs cluster.use_gpu=true"),
    ("data.uri=s3://runs/datasets/REPLACE_ME", "data.uri=s3://runs/datasets/REPLACE_ME is a placeholder"),
    ("bogus.x=1", "bogus: unknown field"),
])
def test_invalid_recipes_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe("tiny", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a shipped recipe"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(bad))


def test_recipe_round_trips_through_yaml(tmp_path):
    r = load_recipe("shakespeare-char", ["train.max_steps=700"])
    path = tmp_path / "r.yaml"
    path.write_text(recipe_to_yaml(r))
    assert load_recipe(str(path)) == r


def test_recipe_kinds():
    assert set(available_recipes("gan")) >= {"tiny-gan", "dcgan-mnist"}
    assert not set(available_recipes("gan")) & set(available_recipes("gpt"))
    gan = load_recipe("dcgan-mnist")
    assert isinstance(gan, GANRecipe) and gan.model.conditional and gan.cluster.num_workers == 2
    assert gan.deepspeed.generator.zero_stage == 2 and gan.deepspeed.discriminator.zero_stage == 2
    with pytest.raises(ConfigError, match="a gan recipe, not a gpt recipe"):
        load_recipe("tiny-gan", kind="gpt")
    with pytest.raises(ConfigError, match="kind: 'diffusion' is not a recipe kind"):  # vae is a kind now
        load_recipe("tiny", ["kind=diffusion"])


@pytest.mark.parametrize("override, message", [
    ("model.image_size=30", "model.image_size=30 must be divisible by 4"),
    ("train.n_critic=0", "train.n_critic: Input should be greater than or equal to 1"),
    ("deepspeed.generator.zero_stage=3", "deepspeed.generator.zero_stage=3 is not supported for GANs"),
    ("deepspeed.generator.offload_param=cpu", "offload_param needs deepspeed.zero_stage = 3"),
    ("train.lr=1e-3", "train.lr: unknown field"),
])
def test_invalid_gan_recipes_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe("tiny-gan", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("cls", [NLGRecipe, GANRecipe])
def test_every_field_is_documented(cls):
    def walk(model):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, NLGRecipe.__mro__[1]):
                yield from walk(ann)
            elif name != "name":
                yield name, field.description
    missing = [n for n, d in walk(cls) if not d]
    assert missing == []


@pytest.mark.parametrize("override, message", [
    ("cluster.run_name=../../x", "cluster.run_name: '../../x' contains '/'"),
    ("cluster.run_name=..", "cluster.run_name: '..' starts with '.'"),
    ("cluster.run_name=.git", "cluster.run_name: '.git' starts with '.'"),
    ("cluster.run_name=a\\b", "cluster.run_name: 'a\\\\b' contains '\\\\'"),
    ("cluster.run_name=a\tb", "cluster.run_name: 'a\\tb' contains '\\t'"),
    ("cluster.run_name=", "cluster.run_name: '' is empty"),
    (f"cluster.run_name={'x' * 129}", "is 129 characters long"),
    ("name=/etc", "name: '/etc' contains '/'"),
])
def test_names_that_become_paths_stay_inside_storage(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe("tiny", [override])
    assert message in str(err.value) and "A-Z a-z 0-9 . _ -" in str(err.value) and "\n" not in str(err.value)


def test_valid_names_are_kept():
    r = load_recipe("tiny", ["cluster.run_name=Run_2024-01.v2", "name=my.recipe", f"cluster.run_name={'x' * 128}"])
    assert (r.cluster.run_name, r.name) == ("x" * 128, "my.recipe")


def test_a_recipe_file_stem_becomes_a_valid_name(tmp_path):
    path = tmp_path / "my recipe (v2).yaml"
    path.write_text("model:\n  n_layer: 2\n")
    assert load_recipe(str(path)).name == "my-recipe-v2"


def test_sweep_name_is_a_valid_name(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: ../../elsewhere\nparameters:\n  train.lr: {choice: [0.001]}\n")
    with pytest.raises(ConfigError, match=r"s.yaml: name: '../../elsewhere' contains '/'"):
        load_sweep(str(sweep))


@pytest.mark.parametrize("text, line, key", [
    ("model:\n  n_layer: 2\ntrain:\n  max_steps: 3\nmodel:\n  n_head: 2\n", 5, "model"),
    ("model:\n  n_layer: 2\n  bias: true\n  n_layer: 3\n", 4, "n_layer"),
    ("model: {n_layer: 2, n_layer: 3}\n", 1, "n_layer"),
    ("deepspeed:\n  config_overrides:\n    a: 1\n    a: 2\n", 4, "a"),
])
def test_a_key_given_twice_is_refused_with_file_and_line(tmp_path, text, line, key):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_recipe(str(path))
    assert f"{path}: line {line} is not valid YAML (duplicate key {key!r}, first given on line" in str(err.value)


def test_yaml_merge_keys_may_still_be_overridden():
    data = parse_yaml("base: &b {n_layer: 2, n_head: 2}\nmodel:\n  <<: *b\n  n_layer: 4\n", "x.yaml")
    assert data["model"] == {"n_layer": 4, "n_head": 2}


def test_duplicate_keys_in_sweeps_and_overrides_are_refused(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("parameters:\n  train.lr: {choice: [0.001]}\nparameters:\n  train.lr: {choice: [0.01]}\n")
    with pytest.raises(ConfigError, match=r"s.yaml: line 3 is not valid YAML \(duplicate key 'parameters'"):
        load_sweep(str(sweep))
    with pytest.raises(ConfigError, match=r"--set .*: duplicate key 'n_layer'"):
        load_recipe("tiny", ["model={n_layer: 1, n_layer: 2}"])


def test_recipe_files_that_are_not_yaml_text(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_recipe(str(tmp_path))
    binary = tmp_path / "r.yaml"
    binary.write_bytes(b"model:\n  n_layer: \xff\n")
    with pytest.raises(ConfigError, match=r"r.yaml: not UTF-8 text \(byte 18\)"):
        load_recipe(str(binary))
