"""Super-resolution end to end on real Ray and DeepSpeed (ZeRO-2, two workers): SRResNet on random crops of the
builtin photos, checkpoint, resume bit-exact, PSNR/SSIM beside bicubic, TensorBoard grids, export, upscaling an
image; an SRGAN fine-tune from the SRResNet run (a second engine); photos prepared from a folder."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import exported_weights, run_job

SLOW = pytest.mark.slow
TWO = ("cluster.num_workers=2", "train.checkpoint_interval=10")


def train(storage, name: str, *sets: str, data: str | None = None, expect: int = 0):
    args = ["--recipe", "tiny-sr", "--storage", str(storage), "--name", name] + (["--data", data] if data else [])
    for s in sets:
        args += ["--set", s]
    r = run_job("train.py", *args)
    assert r.returncode == expect, r.stdout[-4000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    from genai.data.photo_dataset import prepare_photo_dataset

    out = tmp_path_factory.mktemp("datasets") / "photos"
    prepare_photo_dataset("builtin:photos", str(out), log=lambda *_: None)
    return str(out)


@pytest.fixture(scope="module")
def runs(photos, tmp_path_factory):
    """An uninterrupted SRResNet run, and one stopped at step 10 and resumed."""
    storage = tmp_path_factory.mktemp("sr-runs")
    straight = train(storage, "straight", *TWO, data=photos)
    first = train(storage, "resumed", *TWO, "train.max_steps=10", data=photos)
    second = train(storage, "resumed", *TWO, data=photos)
    return storage, straight, first, second


@SLOW
def test_two_workers_zero2_resume_matches_uninterrupted_run(runs):
    storage, straight, first, second = runs
    assert "step 20/20" in straight.stdout and "generator weights identical on all 2 rank(s)" in straight.stdout
    assert "step 10/10" in first.stdout
    assert re.search(r"resumed from \S+ at step 10", second.stdout), second.stdout[-3000:]
    a, b = (exported_weights(storage / name, "sr", 20) for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@SLOW
def test_psnr_and_ssim_are_measured_beside_bicubic(runs):
    storage, straight, _, _ = runs
    m = re.search(r"step 20: PSNR ([0-9.]+) dB \(bicubic ([0-9.]+)\), SSIM ([0-9.]+) \(bicubic ([0-9.]+)\) on 2 "
                  r"held-out photo\(s\)", straight.stdout)
    assert m, straight.stdout[-3000:]
    # The untrained model is exactly bicubic (bicubic_skip); 20 small steps stay close to it.
    assert abs(float(m.group(1)) - float(m.group(2))) < 1.0
    assert re.search(r"^done: run straight at step 20, psnr [0-9.]+, bicubic_psnr [0-9.]+, ssim", straight.stdout, re.M)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(storage / "straight" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/pixel", "eval/psnr", "eval/ssim", "eval/bicubic_psnr", "eval/psnr_gain"} <= set(tags["scalars"])
    assert "samples/bicubic_sr_original" in tags["images"]


@SLOW
def test_generate_upscales_an_image_by_the_scale(runs, tmp_path):
    from PIL import Image

    from genai.data.photos import load_photo

    low, high = tmp_path / "low.png", tmp_path / "high.png"
    Image.fromarray(load_photo("chelsea")[:60, :80]).save(low)
    r = run_job("generate.py", "--checkpoint", str(runs[0] / "straight"), "--input", str(low), "--out", str(high))
    assert r.returncode == 0 and "wrote the x2 upscaling (160x120)" in r.stdout, r.stdout + r.stderr
    with Image.open(high) as img:
        assert img.size == (160, 120) and img.mode == "RGB"
    Image.new("L", (20, 20)).save(tmp_path / "grey.png")
    for args, message in (([], "--input: a sr run maps an image to an image"),
                          (["--input", str(tmp_path / "grey.png")], "a 1-channel (L) image; this model takes 3-channel")):
        bad = run_job("generate.py", "--checkpoint", str(runs[0] / "straight"), *args, "--out", str(tmp_path / "x.png"))
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@SLOW
def test_srgan_fine_tunes_an_srresnet_run_on_photos_from_a_folder(runs, tmp_path):
    from PIL import Image

    from genai.data.photos import builtin_photos

    folder = tmp_path / "my-photos"
    folder.mkdir()
    for name, image in {**builtin_photos("train"), **builtin_photos("val")}.items():
        Image.fromarray(image).save(folder / f"{name}.jpg" if name == "coffee" else folder / f"{name}.png")
    prepared = run_job("prepare_data.py", "--source", f"images:{folder}", "--out", str(tmp_path / "ds"),
                       "--val-fraction", "0.3")
    assert prepared.returncode == 0 and "read 5 train and 2 val images" in prepared.stdout, prepared.stderr
    r = train(tmp_path, "srgan", "model.adversarial=true", "model.perceptual=discriminator", "cluster.num_workers=2",
              f"train.init_from={runs[0] / 'straight'}", "train.max_steps=10", data=str(tmp_path / "ds"))
    assert "discriminator weights identical on all 2 rank(s)" in r.stdout
    assert re.search(r"step 10/10 \| pixel [0-9.]+ \| adv [0-9.]+ \| d_loss [0-9.]+", r.stdout), r.stdout[-3000:]
    bad = train(tmp_path, "bad", "model.scale=4", "train.patch_size=32", f"train.init_from={runs[0] / 'straight'}",
                data=str(tmp_path / "ds"), expect=2)
    assert "model.scale=4 (it has 2)" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
