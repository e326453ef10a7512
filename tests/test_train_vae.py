"""VAEs end to end on real Ray, DeepSpeed (ZeRO-2, two workers) and parquet: train, checkpoint, resume bit-exact,
evaluate (negative ELBO, digit metrics), TensorBoard grids, export, sample grids and reconstructions."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import exported_weights, run_job

SLOW = pytest.mark.slow
TWO = ("cluster.num_workers=2", "train.checkpoint_interval=10", "model.conditional=true")


def train(data: str, storage, name: str, *sets: str, expect: int = 0):
    args = ["--recipe", "tiny-vae", "--data", data, "--storage", str(storage), "--name", name]
    for s in sets:
        args += ["--set", s]
    r = run_job("train.py", *args)
    assert r.returncode == expect, r.stdout[-4000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def runs(digits_dataset, classifier, tmp_path_factory):
    """One uninterrupted conditional run with the digit metrics, and one stopped at step 10 and resumed."""
    storage = tmp_path_factory.mktemp("vae-runs")
    evaluated = (f"train.classifier={classifier}", "train.eval_samples=200")
    straight = train(digits_dataset, storage, "straight", *TWO, *evaluated)
    first = train(digits_dataset, storage, "resumed", *TWO, *evaluated, "train.max_steps=10")
    second = train(digits_dataset, storage, "resumed", *TWO, *evaluated)
    return storage, straight, first, second


@SLOW
def test_two_workers_zero2_resume_matches_uninterrupted_run(runs):
    storage, straight, first, second = runs
    assert "step 20/20" in straight.stdout and "model weights identical on all 2 rank(s)" in straight.stdout
    assert "step 10/10" in first.stdout
    assert re.search(r"resumed from \S+ at step 10", second.stdout), second.stdout[-3000:]
    a, b = (exported_weights(storage / name, "vae", 20) for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@SLOW
def test_elbo_and_digit_metrics_are_logged(runs):
    storage, straight, _, _ = runs
    m = re.search(r"step 20: held-out negative ELBO ([0-9.]+) nats \(reconstruction ([0-9.]+), KL ([0-9.]+)\)",
                  straight.stdout)
    assert m and float(m.group(1)) == pytest.approx(float(m.group(2)) + float(m.group(3)), abs=0.02), straight.stdout
    assert re.search(r"digit-feature Frechet distance [0-9.]+ \(held-out real digits [0-9.]+\), label agreement",
                     straight.stdout)
    assert re.search(r"^done: run straight at step 20, val_nelbo [0-9.]+, fd [0-9.]+, label_agreement", straight.stdout,
                     re.M)
    assert re.search(r"step 20/20 \| elbo -[0-9.]+ \| recon [0-9.]+ \| kl [0-9.]+", straight.stdout)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(storage / "straight" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/recon", "train/kl", "train/nelbo", "eval/val_nelbo", "eval/fd",
            "eval/label_agreement"} <= set(tags["scalars"])
    assert {"samples/prior", "samples/reconstructions"} <= set(tags["images"])
    assert sorted(p.name for p in (storage / "straight" / "samples").iterdir()) == ["step_00000010.png",
                                                                                   "step_00000020.png"]


@SLOW
def test_generate_samples_a_grid_and_reconstructs_an_image(runs, digits_dataset, tmp_path):
    from PIL import Image

    from genai.data.image_dataset import load_image_arrays

    run = runs[0] / "straight"
    grid = tmp_path / "samples.png"
    g = run_job("generate.py", "--checkpoint", str(run), "--num", "64", "--out", str(grid))
    assert g.returncode == 0, g.stderr
    with Image.open(grid) as img:
        assert img.size == (8 * 30 + 2, 8 * 30 + 2)
    again = tmp_path / "again.png"
    assert run_job("generate.py", "--checkpoint", str(run), "--num", "64", "--out", str(again)).returncode == 0
    assert again.read_bytes() == grid.read_bytes()

    images, labels = load_image_arrays(digits_dataset, "val", limit=1)
    digit, recon = tmp_path / "digit.png", tmp_path / "recon.png"
    Image.fromarray(images[0, 0]).save(digit)
    r = run_job("generate.py", "--checkpoint", str(run), "--input", str(digit), "--label", str(labels[0]),
                "--out", str(recon))
    assert r.returncode == 0 and "wrote the reconstruction (28x28)" in r.stdout, r.stdout + r.stderr
    with Image.open(recon) as img:
        assert img.size == (28, 28) and img.mode == "L"

    Image.new("L", (32, 32)).save(tmp_path / "big.png")
    for args, message in ((["--input", str(digit)], "--label: this VAE is class-conditional"),
                          (["--input", str(tmp_path / "big.png"), "--label", "1"],
                           "a 32x32 image; this model takes 28x28 images")):
        bad = run_job("generate.py", "--checkpoint", str(run), *args, "--out", str(tmp_path / "x.png"))
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
