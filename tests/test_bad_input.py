"""Bad input to every job: one line on stderr naming the problem, exit code 2, no traceback, nothing written.

The cases tried, with the error each gave, are printed as a table at the end of the test run.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from cluster.names import check_name
from cluster.storage import StorageError, check_access, resolve
from conftest import BAD_INPUT, run_job
from genai.data.shards import output_location


def make_inputs(tmp: Path, char_dataset: str, digits_dataset: str) -> dict[str, str]:
    """Broken inputs, written fresh for each case."""
    (tmp / "in").mkdir()
    paths = {"char": char_dataset, "digits": digits_dataset, "runs": str(tmp / "runs"), "out": str(tmp / "out"),
             "missing": str(tmp / "in" / "missing"), "empty_dir": str(tmp / "in" / "empty_dir")}
    Path(paths["empty_dir"]).mkdir()
    files = {
        "empty_txt": "   \n\n",
        "bad_yaml": "model: [1, 2\n",
        "list_yaml": "- 1\n- 2\n",
        "unknown_yaml": "model:\n  n_layer: 2\n  n_layerz: 3\n",
        "wrong_type_yaml": "train:\n  max_steps: lots\n",
        "bad_sweep": "name: s\nparameters: {}\n",
        "good_sweep": "name: s\nbase_recipe: tiny\nparameters:\n  train.lr: {choice: [0.001]}\n",
        "escaping_sweep": "name: ../s\nbase_recipe: tiny\nparameters:\n  train.lr: {choice: [0.001]}\n",
        "dup_sweep": "name: s\nbase_recipe: tiny\nparameters:\n  train.lr: {choice: [0.001]}\nname: t\n",
        "dup_section_yaml": "model:\n  n_layer: 2\ntrain:\n  max_steps: 3\nmodel:\n  n_head: 2\n",
        "dup_field_yaml": "train:\n  max_steps: 3\n  lr: 0.1\n  max_steps: 4\n",
        "dup_gan_yaml": "kind: gan\nmodel:\n  z_dim: 8\n  z_dim: 16\n",
        "hidden_run_yaml": "cluster:\n  run_name: .hidden\n",
        "a_file": "not a folder\n",
    }
    for name, text in files.items():
        suffix = ".yaml" if name.endswith(("yaml", "sweep")) else "" if name == "a_file" else ".txt"
        paths[name] = str(tmp / "in" / f"{name}{suffix}")
        Path(paths[name]).write_text(text)
    mnist = tmp / "in" / "mnist"
    mnist.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (mnist / f"{stem}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 7))  # truncated header
    paths["bad_mnist"] = str(mnist)
    write_bad_corpora(tmp / "in", paths)
    write_photos(tmp / "in", paths)
    return paths


def write_photos(folder: Path, paths: dict[str, str]) -> None:
    """Two small photos (48x40), the dataset they make, a folder of one photo and a folder holding a broken one."""
    import numpy as np
    from PIL import Image

    from genai.data.photo_dataset import prepare_photo_dataset

    for name, count in (("small_photos", 2), ("one_photo", 1)):
        (folder / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(folder / name / f"p{i}.png")
        paths[name] = str(folder / name)
    prepare_photo_dataset(f"images:{paths['small_photos']}", str(folder / "photos"), log=lambda *_: None)
    paths["photos"] = str(folder / "photos")
    (folder / "broken_photos").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "broken_photos" / "a.png")
    (folder / "broken_photos" / "b.png").write_bytes(b"not a png")
    paths["broken_photos"] = str(folder / "broken_photos")


def write_bad_corpora(folder: Path, paths: dict[str, str]) -> None:
    """Corpora whose records or files cannot be read as documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = {"no_text_jsonl.jsonl": '{"body": "a"}\n', "bad_json.jsonl": '{"text": "a"}\n{"text": "b"\n'}
    for name, text in records.items():
        (folder / name).write_text(text)
        paths[name.split(".")[0]] = str(folder / name)
    pq.write_table(pa.table({"body": ["a"]}), folder / "no_text.parquet")
    paths["no_text_parquet"] = str(folder / "no_text.parquet")
    (folder / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    paths["binary_txt"] = str(folder / "binary.txt")
    mixed = folder / "mixed"  # the bad line comes after good files: still found before anything is written
    mixed.mkdir()
    (mixed / "a.txt").write_text("a good document\n")
    (mixed / "b.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    paths["mixed"] = str(mixed)
    csv_only = folder / "tables"
    csv_only.mkdir()
    (csv_only / "a.csv").write_text("a,b\n")
    paths["csv_only"] = str(csv_only)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, str]:
    """Hugging Face model folders for --init-from: a tiny random GPT-2 as our export writes it (config.json,
    model.safetensors, tokenizer files), and copies with a part missing or wrong."""
    import json

    from safetensors.torch import load_file, save_file

    from cluster.storage import resolve
    from genai.data.tokenizers import CharTokenizer
    from genai.export import write_hf_export
    from genai.models import GPT, GPTConfig

    root = tmp_path_factory.mktemp("hf-models")
    tok = CharTokenizer(sorted([chr(c) for c in range(32, 127)] + ["\n"]), eot=True)  # not {char}'s tokenizer
    paths = {}

    def model(name: str, vocab_size: int = 128) -> Path:
        cfg = GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16, bias=True)
        write_hf_export(resolve(str(root / name)), GPT(cfg).state_dict(), cfg, tok)
        paths[f"hf_{name}"] = str(root / name)
        return root / name

    model("gpt2")
    model("small_vocab", vocab_size=32)
    (model("no_config") / "config.json").unlink()
    (model("no_weights") / "model.safetensors").unlink()
    config = model("bert") / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "bert"}))
    weights = load_file(root / "gpt2" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "transformer.h.1.mlp.c_fc.weight"},
              model("missing_tensor") / "model.safetensors", metadata={"format": "pt"})
    qkv = "transformer.h.0.attn.c_attn.weight"
    save_file({**weights, qkv: weights[qkv][:, :32].contiguous()}, model("wrong_shape") / "model.safetensors",
              metadata={"format": "pt"})
    return paths


CASES = [
    # (id, job, args with {placeholders}, text the error line must contain)
    ("prepare_data: empty corpus", "prepare_data.py", ["--source", "{empty_txt}", "--out", "{out}"], "corpus is empty"),
    ("prepare_data: missing corpus file", "prepare_data.py", ["--source", "{missing}", "--out", "{out}"],
     "no such file or folder"),
    ("prepare_data: folder without text", "prepare_data.py", ["--source", "{empty_dir}", "--out", "{out}"],
     "holds no text files"),
    ("prepare_data: truncated MNIST IDX file", "prepare_data.py", ["--source", "mnist:{bad_mnist}", "--out", "{out}"],
     "-idx"),
    ("prepare_data: missing MNIST folder", "prepare_data.py", ["--source", "mnist:{missing}", "--out", "{out}"],
     "missing"),
    ("prepare_data: JSON line without the text field", "prepare_data.py",
     ["--source", "{no_text_jsonl}", "--out", "{out}"],
     "{no_text_jsonl}: line 1 has no 'text' field (choose the field with --text-column)"),
    ("prepare_data: JSON line that is not JSON", "prepare_data.py", ["--source", "{bad_json}", "--out", "{out}"],
     "{bad_json}: line 2 is not valid JSON"),
    ("prepare_data: parquet without the text column", "prepare_data.py",
     ["--source", "{no_text_parquet}", "--out", "{out}", "--tokenizer", "bpe"],
     "{no_text_parquet}: no column 'text' (columns: body; choose one with --text-column)"),
    ("prepare_data: wrong --text-column", "prepare_data.py",
     ["--source", "{no_text_parquet}", "--out", "{out}", "--text-column", "content"], "no column 'content'"),
    ("prepare_data: text file that is not UTF-8", "prepare_data.py", ["--source", "{binary_txt}", "--out", "{out}"],
     "{binary_txt}: not UTF-8 text"),
    ("prepare_data: bad record deep in a folder", "prepare_data.py", ["--source", "{mixed}", "--out", "{out}"],
     "{mixed}/b.jsonl: line 2 has no 'text' field"),
    ("prepare_data: folder of unsupported files", "prepare_data.py", ["--source", "{csv_only}", "--out", "{out}"],
     "holds no text files (.txt, .md, .rst, .jsonl, .jsonl.gz, .parquet) (skipped 1 .csv file)"),
    ("prepare_data: negative --workers", "prepare_data.py",
     ["--source", "builtin:pydoc", "--out", "{out}", "--workers", "-1"], "--workers -1: must be 0"),
    ("prepare_data: unknown builtin", "prepare_data.py", ["--source", "builtin:poems", "--out", "{out}"],
     "builtin:poems"),
    ("prepare_data: val fraction out of range", "prepare_data.py",
     ["--source", "{empty_txt}", "--out", "{out}", "--val-fraction", "0.9"], "--val-fraction"),
    ("prepare_data: unsupported URI scheme", "prepare_data.py", ["--source", "builtin:digits", "--out", "ftp://x/y"],
     "unsupported scheme 'ftp'"),
    ("train_nlg: malformed recipe YAML", "train_nlg.py", ["--recipe", "{bad_yaml}", "--storage", "{runs}"],
     "is not valid YAML"),
    ("train_nlg: recipe is not a mapping", "train_nlg.py", ["--recipe", "{list_yaml}", "--storage", "{runs}"],
     "a recipe is a mapping"),
    ("train_nlg: unknown field", "train_nlg.py", ["--recipe", "{unknown_yaml}", "--storage", "{runs}"],
     "model.n_layerz: unknown field"),
    ("train_nlg: wrong type", "train_nlg.py", ["--recipe", "{wrong_type_yaml}", "--storage", "{runs}"],
     "train.max_steps: Input should be a valid integer"),
    ("train_nlg: missing recipe file", "train_nlg.py", ["--recipe", "{missing}.yaml", "--storage", "{runs}"],
     "does not exist"),
    ("train_nlg: bad --set", "train_nlg.py", ["--recipe", "tiny", "--set", "train.lr", "--storage", "{runs}"],
     "expected key.path=value"),
    ("train_nlg: dataset folder without manifest", "train_nlg.py",
     ["--recipe", "tiny", "--data", "{empty_dir}", "--storage", "{runs}"], "no manifest.json"),
    ("train_nlg: image dataset for a GPT", "train_nlg.py",
     ["--recipe", "tiny", "--data", "{digits}", "--storage", "{runs}"], "is not 'text-tokens'"),
    ("train_nlg: S3 URI without bucket", "train_nlg.py", ["--recipe", "tiny", "--storage", "s3://"],
     "needs a bucket"),
    ("train_nlg: GAN recipe", "train_nlg.py", ["--recipe", "tiny-gan", "--storage", "{runs}"],
     "train it with jobs/train_gan.py"),
    ("train_gan: images of the wrong size", "train_gan.py",
     ["--recipe", "tiny-gan", "--data", "{digits}", "--set", "model.image_size=32", "--storage", "{runs}"],
     "holds 28x28 images"),
    ("train_gan: images of the wrong channels", "train_gan.py",
     ["--recipe", "tiny-gan", "--data", "{digits}", "--set", "model.channels=3", "--storage", "{runs}"],
     "1-channel images"),
    ("train_gan: text dataset for a GAN", "train_gan.py",
     ["--recipe", "tiny-gan", "--data", "{char}", "--storage", "{runs}"], "is not 'images'"),
    ("train_gan: unknown loss", "train_gan.py", ["--recipe", "tiny-gan", "--set", "model.loss=lsgan",
                                                 "--storage", "{runs}"], "model.loss: Input should be"),
    ("generate: missing checkpoint", "generate.py", ["--checkpoint", "{missing}"], "does not exist"),
    ("generate: folder that is not a run", "generate.py", ["--checkpoint", "{empty_dir}"], "not a run folder"),
    ("generate: negative temperature", "generate.py", ["--checkpoint", "{empty_dir}", "--temperature", "-1"],
     "--temperature"),
    ("eval_gan: missing run", "eval_gan.py", ["--checkpoint", "{missing}", "--classifier", "{missing}"],
     "does not exist"),
    ("train_classifier: text dataset", "train_classifier.py", ["--data", "{char}", "--out", "{out}"],
     "is not 'images'"),
    ("tune: sweep without parameters", "tune.py", ["--sweep", "{bad_sweep}"], "give at least one field"),
    ("tune: missing sweep file", "tune.py", ["--sweep", "{missing}.yaml"], "does not exist"),
    # Names that become a folder or object key under storage: a run, a recipe (the default run name), a sweep.
    ("train_nlg: run name climbing out of storage", "train_nlg.py",
     ["--recipe", "tiny", "--name", "../escaped", "--storage", "{runs}"], "cluster.run_name: '../escaped' contains '/'"),
    ("train_nlg: run name '..' on S3", "train_nlg.py", ["--recipe", "tiny", "--name", "..", "--storage", "s3://runs/r"],
     "cluster.run_name: '..' starts with '.'"),
    ("train_gan: run name with a backslash", "train_gan.py",
     ["--recipe", "tiny-gan", "--name", "a\\b", "--storage", "{runs}"], "cluster.run_name: 'a\\\\b' contains '\\\\'"),
    ("train_nlg: run name with a control character", "train_nlg.py",
     ["--recipe", "tiny", "--set", "cluster.run_name=a\x01b", "--storage", "{runs}"], "contains '\\x01'"),
    ("train_nlg: empty run name", "train_nlg.py", ["--recipe", "tiny", "--set", "cluster.run_name=", "--storage", "{runs}"],
     "cluster.run_name: '' is empty"),
    ("train_nlg: over-long run name", "train_nlg.py", ["--recipe", "tiny", "--name", "r" * 129, "--storage", "{runs}"],
     "is 129 characters long (a name is 1-128 of the characters A-Z a-z 0-9 . _ -"),
    ("train_nlg: hidden run name in the recipe", "train_nlg.py", ["--recipe", "{hidden_run_yaml}", "--storage", "{runs}"],
     "{hidden_run_yaml}: cluster.run_name: '.hidden' starts with '.'"),
    ("train_nlg: recipe name with a slash", "train_nlg.py", ["--recipe", "tiny", "--set", "name=a/b", "--storage", "{runs}"],
     "name: 'a/b' contains '/'"),
    ("tune: sweep name climbing out of storage", "tune.py", ["--sweep", "{escaping_sweep}", "--storage", "{runs}"],
     "{escaping_sweep}: name: '../s' contains '/'"),
    ("train_nlg: S3 storage with a '..' part", "train_nlg.py", ["--recipe", "tiny", "--storage", "s3://runs/../other"],
     "s3://runs/../other: an S3 key cannot have empty, '.' or '..' parts"),
    # A key given twice: PyYAML would keep the last one silently.
    ("train_nlg: duplicated section", "train_nlg.py", ["--recipe", "{dup_section_yaml}", "--storage", "{runs}"],
     "{dup_section_yaml}: line 5 is not valid YAML (duplicate key 'model', first given on line 1)"),
    ("train_nlg: duplicated field", "train_nlg.py", ["--recipe", "{dup_field_yaml}", "--storage", "{runs}"],
     "{dup_field_yaml}: line 4 is not valid YAML (duplicate key 'max_steps', first given on line 2)"),
    ("train_gan: duplicated field", "train_gan.py", ["--recipe", "{dup_gan_yaml}", "--storage", "{runs}"],
     "{dup_gan_yaml}: line 4 is not valid YAML (duplicate key 'z_dim', first given on line 3)"),
    ("train_nlg: duplicated key in --set", "train_nlg.py",
     ["--recipe", "tiny", "--set", "model={{n_layer: 1, n_layer: 2}}", "--storage", "{runs}"],
     "duplicate key 'n_layer', first given on line 1"),
    ("tune: duplicated sweep field", "tune.py", ["--sweep", "{dup_sweep}"],
     "{dup_sweep}: line 5 is not valid YAML (duplicate key 'name', first given on line 1)"),
    # A file where a folder is expected, a folder where a file is expected, a folder inside a file.
    ("prepare_data: --out is a file", "prepare_data.py", ["--source", "builtin:digits", "--out", "{a_file}"],
     "{a_file} is a file, not a folder"),
    ("prepare_data: --out inside a file", "prepare_data.py", ["--source", "builtin:shakespeare", "--out", "{a_file}/d"],
     "{a_file}/d: {a_file} is a file, not a folder"),
    ("train_nlg: --storage is a file", "train_nlg.py", ["--recipe", "tiny", "--data", "{char}", "--storage", "{a_file}"],
     "{a_file} is a file, not a folder"),
    ("train_gan: --storage inside a file", "train_gan.py",
     ["--recipe", "tiny-gan", "--data", "{digits}", "--storage", "{a_file}/runs"], "{a_file} is a file, not a folder"),
    ("train_nlg: --data is a file", "train_nlg.py", ["--recipe", "tiny", "--data", "{a_file}", "--storage", "{runs}"],
     "{a_file} is a file, not a dataset folder"),
    ("train_gan: --data is a file", "train_gan.py", ["--recipe", "tiny-gan", "--data", "{a_file}", "--storage", "{runs}"],
     "{a_file} is a file, not a dataset folder"),
    ("train_nlg: dataset cache is a file", "train_nlg.py",
     ["--recipe", "tiny", "--set", "data.cache_dir={a_file}", "--storage", "{runs}"], "{a_file} is a file, not a folder"),
    ("train_gan: dataset cache is a file", "train_gan.py",
     ["--recipe", "tiny-gan", "--set", "data.cache_dir={a_file}", "--storage", "{runs}"], "{a_file} is a file, not a folder"),
    ("train_nlg: recipe is a folder", "train_nlg.py", ["--recipe", "{empty_dir}", "--storage", "{runs}"],
     "recipe file {empty_dir} is a folder, not a YAML file"),
    ("generate: --checkpoint is a file", "generate.py", ["--checkpoint", "{a_file}"],
     "{a_file} is a file, not a run, export or checkpoint folder"),
    ("generate: --out is a folder", "generate.py", ["--checkpoint", "{empty_dir}", "--out", "{empty_dir}"],
     "{empty_dir} is a folder, not a file"),
    ("generate: --out inside a file", "generate.py", ["--checkpoint", "{empty_dir}", "--out", "{a_file}/grid.png"],
     "{a_file}/grid.png: {a_file} is a file, not a folder"),
    ("eval_gan: --checkpoint is a file", "eval_gan.py", ["--checkpoint", "{a_file}", "--classifier", "{empty_dir}"],
     "{a_file} is a file, not a run, export or checkpoint folder"),
    ("eval_gan: --classifier is a file", "eval_gan.py", ["--checkpoint", "{empty_dir}", "--classifier", "{a_file}"],
     "{a_file} is a file, not a folder"),
    ("eval_gan: --data is a file", "eval_gan.py",
     ["--checkpoint", "{empty_dir}", "--classifier", "{empty_dir}", "--data", "{a_file}"], "{a_file} is a file, not a folder"),
    ("train_classifier: --out is a file", "train_classifier.py", ["--data", "{digits}", "--out", "{a_file}"],
     "{a_file} is a file, not a folder"),
    ("train_classifier: --data is a file", "train_classifier.py", ["--data", "{a_file}", "--out", "{out}"],
     "{a_file} is a file, not a folder"),
    ("tune: --storage is a file", "tune.py", ["--sweep", "{good_sweep}", "--storage", "{a_file}"],
     "{a_file} is a file, not a folder"),
    ("tune: sweep file is a folder", "tune.py", ["--sweep", "{empty_dir}"], "sweep file {empty_dir} is a folder"),
    # The image families' recipes against the data they are given.
    ("train: VAE image size not the data's", "train.py",
     ["--recipe", "tiny-vae", "--data", "{digits}", "--set", "model.image_size=32", "--storage", "{runs}"],
     "model.image_size=32, but {digits} holds 28x28 images"),
    ("train: VAE channels not the data's", "train.py",
     ["--recipe", "tiny-vae", "--data", "{digits}", "--set", "model.channels=3", "--storage", "{runs}"],
     "model.channels=3, but {digits} holds 1-channel images"),
    ("train: VAE under ZeRO-3", "train.py",
     ["--recipe", "tiny-vae", "--set", "deepspeed.zero_stage=3", "--storage", "{runs}"],
     "deepspeed.zero_stage=3 is not supported for vae recipes"),
    ("train: VAE batch larger than the data", "train.py",
     ["--recipe", "tiny-vae", "--data", "{digits}", "--set", "train.batch_size=100000", "--storage", "{runs}"],
     "too few for train.batch_size=100000"),
    ("train: VAE on a text dataset", "train.py", ["--recipe", "tiny-vae", "--data", "{char}", "--storage", "{runs}"],
     "is not 'images'"),
    ("train: VAE classifier missing", "train.py",
     ["--recipe", "tiny-vae", "--data", "{digits}", "--set", "train.classifier={missing}", "--storage", "{runs}"],
     "train.classifier={missing}: no classifier.json"),
    ("train: SR patch larger than the photos", "train.py",
     ["--recipe", "tiny-sr", "--data", "{photos}", "--set", "train.patch_size=64", "--storage", "{runs}"],
     "train.patch_size=64: {photos} holds a 48x40 training image (p"),
    ("train: SR channels not the photos'", "train.py",
     ["--recipe", "tiny-sr", "--data", "{photos}", "--set", "model.channels=1", "--storage", "{runs}"],
     "model.channels=1, but {photos} holds 3-channel photos"),
    ("train: SR patch not a multiple of the scale", "train.py",
     ["--recipe", "tiny-sr", "--set", "train.patch_size=33", "--storage", "{runs}"],
     "train.patch_size=33 is not a multiple of model.scale=2"),
    ("train: SR perceptual term without a discriminator", "train.py",
     ["--recipe", "tiny-sr", "--set", "model.perceptual=discriminator", "--storage", "{runs}"],
     "model.perceptual=discriminator needs model.adversarial=true"),
    ("train: SR init_from nothing", "train.py",
     ["--recipe", "tiny-sr", "--data", "{photos}", "--set", "train.init_from={missing}", "--storage", "{runs}"],
     "train.init_from={missing}: {missing} does not exist"),
    ("train: SR on digits", "train.py", ["--recipe", "tiny-sr", "--data", "{digits}", "--storage", "{runs}"],
     "dataset kind 'images' is not 'photos'"),
    ("train: translation given one domain", "train.py",
     ["--recipe", "tiny-translate", "--set", "data.domain_a={digits}", "--storage", "{runs}"],
     "data.domain_a is set but data.domain_b is not: translation needs two domains"),
    ("train: translation image size not the domains'", "train.py",
     ["--recipe", "tiny-translate", "--set", "model.image_size=32", "--storage", "{runs}"],
     "model.image_size=32, but data.domain_a (the builtin digits) holds 28x28 images"),
    ("train: translation channels not domain B's", "train.py",
     ["--recipe", "tiny-translate", "--set", "model.channels_b=3", "--set", "model.lambda_identity=0",
      "--storage", "{runs}"], "model.channels_b=3, but data.domain_b (the builtin bold digits) holds 1-channel images"),
    ("train: translation identity loss across channels", "train.py",
     ["--recipe", "tiny-translate", "--set", "model.channels_a=3", "--storage", "{runs}"],
     "model.lambda_identity must be 0 when the domains' channels differ"),
    ("train: translation domain B is text", "train.py",
     ["--recipe", "tiny-translate", "--set", "data.domain_a={digits}", "--set", "data.domain_b={char}",
      "--storage", "{runs}"], "dataset kind 'text-tokens' is not 'images'"),
    ("prepare_data: one photo", "prepare_data.py", ["--source", "images:{one_photo}", "--out", "{out}"],
     "images:{one_photo}: 1 PNG/JPEG file(s) there; a train and a val split need at least 2"),
    ("prepare_data: missing photo folder", "prepare_data.py", ["--source", "images:{missing}", "--out", "{out}"],
     "{missing} does not exist (expected a folder of PNG/JPEG files)"),
    ("prepare_data: broken photo", "prepare_data.py", ["--source", "images:{broken_photos}", "--out", "{out}"],
     "{broken_photos}/b.png: not a readable PNG or JPEG image"),
    # Fine-tuning a pretrained Hugging Face model: the folder against the recipe and the dataset.
    ("prepare_data: --tokenizer folder missing", "prepare_data.py",
     ["--source", "builtin:shakespeare", "--tokenizer", "{missing}", "--out", "{out}"],
     "{missing} does not exist (a tokenizer is char, bpe, or a Hugging Face model or tokenizer folder"),
    ("prepare_data: --tokenizer folder without tokenizer.json", "prepare_data.py",
     ["--source", "builtin:shakespeare", "--tokenizer", "{empty_dir}", "--out", "{out}"],
     "{empty_dir}: no tokenizer.json"),
    ("train_nlg: finetune without --init-from", "train_nlg.py",
     ["--recipe", "finetune", "--data", "{char}", "--storage", "{runs}"],
     "model.init_from=REPLACE_ME: this recipe starts from a pretrained model"),
    ("train_nlg: --init-from a missing folder", "train_nlg.py",
     ["--recipe", "finetune", "--init-from", "{missing}", "--data", "{char}", "--storage", "{runs}"],
     "model.init_from={missing}: {missing} does not exist"),
    ("train_nlg: --init-from without config.json", "train_nlg.py",
     ["--recipe", "finetune", "--init-from", "{hf_no_config}", "--data", "{char}", "--storage", "{runs}"],
     "model.init_from={hf_no_config}: no config.json"),
    ("train_nlg: --init-from an unsupported model_type", "train_nlg.py",
     ["--recipe", "finetune", "--init-from", "{hf_bert}", "--data", "{char}", "--storage", "{runs}"],
     "model.init_from={hf_bert}: config.json has model_type='bert'; supported: gpt2, llama"),
    ("train_nlg: dataset vocabulary larger than the model's", "train_nlg.py",
     ["--recipe", "finetune", "--init-from", "{hf_small_vocab}", "--data", "{char}", "--storage", "{runs}"],
     "model.init_from={hf_small_vocab}: its config.json has vocab_size=32, smaller than the vocabulary of the dataset"),
    ("train_nlg: --init-from without weights", "train_nlg.py",
     ["--recipe", "finetune", "--init-from", "{hf_no_weights}", "--data", "{char}", "--storage", "{runs}"],
     "model.init_from={hf_no_weights}: no model.safetensors"),
    ("train_nlg: --init-from with a tensor missing", "train_nlg.py",
     ["--recipe", "finetune", "--init-from", "{hf_missing_tensor}", "--data", "{char}", "--storage", "{runs}"],
     "model.init_from={hf_missing_tensor}: transformer.h.1.mlp.c_fc.weight is missing from its weights"),
    ("train_nlg: --init-from with a tensor of the wrong shape", "train_nlg.py",
     ["--recipe", "finetune", "--init-from", "{hf_wrong_shape}", "--data", "{char}", "--storage", "{runs}"],
     "model.init_from={hf_wrong_shape}: transformer.h.0.attn.c_attn.weight in model.safetensors has shape (16, 32); "
     "its config.json needs (16, 48)"),
    ("train_nlg: dataset of another tokenizer than the model's", "train_nlg.py",
     ["--recipe", "finetune", "--init-from", "{hf_gpt2}", "--data", "{char}", "--storage", "{runs}"],
     "model.init_from={hf_gpt2}: the dataset {char} was tokenized with another tokenizer"),
    ("train_nlg: model shape set beside --init-from", "train_nlg.py",
     ["--recipe", "finetune", "--init-from", "{hf_gpt2}", "--data", "{char}", "--set", "model.n_layer=3",
      "--storage", "{runs}"], "model.n_layer=3: the model's shape comes from model.init_from={hf_gpt2}"),
]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under a folder with its content (None for folders)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("job_name, args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(char_dataset, digits_dataset, hf_models, tmp_path, job_name,
                                                         args, message, request):
    paths = {**make_inputs(tmp_path, char_dataset, digits_dataset), **hf_models}
    before = snapshot(tmp_path)
    # An address nobody listens on: a case that got past the checks fails instead of starting a local Ray.
    r = run_job(job_name, *[a.format(**paths) for a in args], timeout=120, env={"RAY_ADDRESS": "127.0.0.1:9"})
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message.format(**paths) in lines[0], lines[0]
    assert not Path(paths["out"]).exists() and not Path(paths["runs"]).exists()
    assert snapshot(tmp_path) == before  # nor anywhere else under the test's folder (a run name climbing out of it)
    BAD_INPUT.append(f"{job_name:<20} {request.node.callspec.id:<40} exit 2: {lines[0][:150]}")


# The storage layer under the jobs: what a run, a sweep or a dataset folder may be called and where it may go.

@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a\\b", "a\x00b", "a\nb", "a b", "é", "x" * 129])
def test_a_name_that_would_leave_its_folder_is_refused(name):
    with pytest.raises(ValueError) as err:
        check_name(name, "--name")
    assert str(err.value).startswith(f"--name: {name!r} ") and "\n" not in str(err.value)


@pytest.mark.parametrize("part", ["../x", "a/../../x", "/etc", "..", "a\\..\\x"])
def test_a_location_does_not_join_a_path_that_leaves_it(tmp_path, part):
    for root in (str(tmp_path), "s3://bucket/runs"):
        with pytest.raises(StorageError, match="is not a path inside it"):
            resolve(root).join(part)
    assert resolve(str(tmp_path)).join("run-1", "checkpoint_000001").path == f"{tmp_path}/run-1/checkpoint_000001"


@pytest.mark.parametrize("uri", ["s3://bucket/../other", "s3://bucket/a/./b", "s3://bucket/a//b"])
def test_an_s3_key_with_dot_or_empty_parts_is_refused(uri):
    with pytest.raises(StorageError, match="an S3 key cannot have empty, '.' or '..' parts"):
        resolve(uri)


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path / "ro") and real_access(path, mode))
    with pytest.raises(StorageError, match=f"{tmp_path}/ro/runs: cannot write in {tmp_path}/ro"):
        check_access(str(tmp_path / "ro" / "runs"), expect="folder")
    with pytest.raises(StorageError, match="cannot write in"):
        output_location(str(tmp_path / "ro" / "dataset"), overwrite=False)
    assert check_access(str(tmp_path / "rw" / "runs"), expect="folder").path == str(tmp_path / "rw" / "runs")
    assert list(tmp_path.iterdir()) == [tmp_path / "ro"]
