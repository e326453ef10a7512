"""GANs end to end on real Ray, DeepSpeed (two engines, ZeRO-2) and parquet: train, checkpoint, resume,
evaluate, export, generate PNG grids, TensorBoard images; bad input refused before Ray starts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import exported_weights, run_job

SLOW = pytest.mark.slow


def train(data: str, storage: Path, name: str, *sets: str, expect: int = 0):
    args = ["--recipe", "tiny-gan", "--data", data, "--storage", str(storage), "--name", name]
    for s in sets:
        args += ["--set", s]
    r = run_job("train_gan.py", *args)
    assert r.returncode == expect, r.stdout[-4000:] + r.stderr[-4000:]
    return r


@SLOW
def test_two_workers_zero2_resume_matches_uninterrupted_run(digits_dataset, tmp_path):
    two = ("cluster.num_workers=2", "train.checkpoint_interval=10")
    straight = train(digits_dataset, tmp_path, "straight", *two)
    assert "step 20/20" in straight.stdout
    # ZeRO-2 on both engines keeps every rank's weights equal; the loop checks it at the end.
    assert "generator weights identical on all 2 rank(s)" in straight.stdout
    assert "discriminator weights identical on all 2 rank(s)" in straight.stdout

    first = train(digits_dataset, tmp_path, "resumed", *two, "train.max_steps=10")
    assert "step 10/10" in first.stdout
    second = train(digits_dataset, tmp_path, "resumed", *two)
    assert re.search(r"resumed from \S+ at step 10", second.stdout), second.stdout[-3000:]
    assert "step 20/20" in second.stdout

    # Both engines, the EMA, the RNG streams and the data position came back: the resumed run ends
    # exactly where the uninterrupted one did.
    a, b = exported_weights(tmp_path / "straight", "gan"), exported_weights(tmp_path / "resumed", "gan")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k

    # Training moved the generator away from its initial weights.
    from genai.models.gan import GANConfig, Generator, init_weights

    cfg = GANConfig(**json.loads((tmp_path / "straight" / "export" / "model_config.json").read_text()))
    torch.manual_seed(1337)
    g0 = Generator(cfg)
    init_weights(g0)
    assert any(not torch.allclose(v.float(), a[k].float()) for k, v in g0.state_dict().items() if v.is_floating_point())


@SLOW
def test_conditional_wgan_gp_evaluates_logs_and_generates(digits_dataset, classifier, tmp_path):
    r = train(digits_dataset, tmp_path, "wgan", "model.conditional=true", "model.loss=wgan-gp", "train.n_critic=2",
              f"train.classifier={classifier}", "train.eval_samples=300")
    m = re.search(r"digit-feature Frechet distance ([0-9.]+) \(held-out real digits ([0-9.]+)\), "
                  r"label agreement ([0-9.]+)%", r.stdout)
    assert m, r.stdout[-3000:]
    assert float(m.group(2)) < float(m.group(1)), "20 steps of training cannot match real held-out digits"
    assert re.search(r"^done: run wgan at step 20, fd [0-9.]+, fd_real [0-9.]+, label_agreement", r.stdout, re.M)

    run = tmp_path / "wgan"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/d_loss", "train/g_loss", "train/gradient_penalty", "eval/fd", "eval/label_agreement",
            "perf/images_per_s"} <= set(tags["scalars"])
    assert "samples/ema_generator" in tags["images"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000010.png", "step_00000020.png"]

    from PIL import Image

    out = tmp_path / "sevens.png"
    g = run_job("generate.py", "--checkpoint", str(run), "--num", "16", "--label", "7", "--out", str(out))
    assert g.returncode == 0, g.stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (4 * 30 + 2, 4 * 30 + 2)  # 4x4 grid of 28 px + 2 px padding
    # The same seed gives the same grid; another label a different one.
    again, other = tmp_path / "again.png", tmp_path / "threes.png"
    assert run_job("generate.py", "--checkpoint", str(run), "--num", "16", "--label", "7", "--out",
                   str(again)).returncode == 0
    assert run_job("generate.py", "--checkpoint", str(run), "--num", "16", "--label", "3", "--out",
                   str(other)).returncode == 0
    assert again.read_bytes() == out.read_bytes() and other.read_bytes() != out.read_bytes()

    bad = run_job("generate.py", "--checkpoint", str(run), "--label", "12", "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "--label 12" in bad.stderr and "Traceback" not in bad.stderr


@SLOW
def test_divergence_stops_with_the_last_checkpoint_intact(digits_dataset, tmp_path):
    train(digits_dataset, tmp_path, "nan", "train.max_steps=5", "train.checkpoint_interval=5")
    # Resumed with absurd learning rates (a resumed GAN takes the recipe's rates): NaN at the next log.
    r = train(digits_dataset, tmp_path, "nan", "train.lr_d=1.0e+30", "train.lr_g=1.0e+30",
              "train.checkpoint_interval=5", "train.log_interval=2", "cluster.max_failures=0", expect=1)
    assert "losses are not finite by step 6" in r.stderr and "resume with: --name nan" in r.stderr
    assert [p.name for p in (tmp_path / "nan").glob("checkpoint_0*")] == ["checkpoint_00000005"]
    g = run_job("generate.py", "--checkpoint", str(tmp_path / "nan"), "--num", "4", "--out", str(tmp_path / "g.png"))
    assert g.returncode == 0 and "(step 5)" in g.stdout, g.stdout + g.stderr


@pytest.mark.parametrize("sets, message", [
    (["model.image_size=32"], "model.image_size=32, but"),
    (["model.channels=3"], "model.channels=3, but"),
    (["model.loss=lsgan"], "model.loss"),
    (["deepspeed.discriminator.zero_stage=3"], "zero_stage=3 is not supported"),
    (["train.batch_size=100000"], "too few for train.batch_size=100000"),
    (["train.classifier=/nonexistent/clf"], "train.classifier=/nonexistent/clf: no classifier.json"),
    (["model.loss=wgan-gp", "model.spectral_norm=true"], "choose one"),
])
def test_bad_gan_input_fails_before_ray_starts(digits_dataset, tmp_path, sets, message):
    r = train(digits_dataset, tmp_path, "bad", *sets, expect=2)
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "bad").exists()


def test_recipe_of_the_wrong_kind_is_refused(tmp_path):
    r = run_job("train_gan.py", "--recipe", "tiny", "--storage", str(tmp_path))
    assert r.returncode == 2 and "a gpt recipe, not a gan recipe (train it with jobs/train_nlg.py)" in r.stderr
    r = run_job("train_nlg.py", "--recipe", "tiny-gan", "--storage", str(tmp_path))
    assert r.returncode == 2 and "train it with jobs/train_gan.py" in r.stderr


def test_ema_warms_up_before_it_averages_slowly():
    from genai.train.gan import ema_decay

    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)  # follows the generator closely at first
    assert ema_decay(0.999, 100) == pytest.approx(101 / 110)
    assert ema_decay(0.999, 100_000) == 0.999
