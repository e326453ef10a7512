"""Bad input to every job: one line on stderr naming the problem, exit code 2, no traceback, nothing written.

The cases tried, with the error each gave, are printed as a table at the end of the test run.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from conftest import BAD_INPUT, run_job


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
    }
    for name, text in files.items():
        suffix = ".yaml" if name.endswith(("yaml", "sweep")) else ".txt"
        paths[name] = str(tmp / "in" / f"{name}{suffix}")
        Path(paths[name]).write_text(text)
    mnist = tmp / "in" / "mnist"
    mnist.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (mnist / f"{stem}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 7))  # truncated header
    paths["bad_mnist"] = str(mnist)
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
]


@pytest.mark.parametrize("job_name, args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(char_dataset, digits_dataset, tmp_path, job_name, args,
                                                         message, request):
    paths = make_inputs(tmp_path, char_dataset, digits_dataset)
    r = run_job(job_name, *[a.format(**paths) for a in args], timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0], lines[0]
    assert not Path(paths["out"]).exists() and not Path(paths["runs"]).exists()
    BAD_INPUT.append(f"{job_name:<20} {request.node.callspec.id:<40} exit 2: {lines[0][:150]}")
