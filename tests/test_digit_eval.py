"""The digit classifier behind the GAN quality metrics: the Frechet distance against its closed form, the
classifier's shapes, real training on the builtin digits, save/load, and jobs/train_classifier.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_job
from genai.eval.digits import (ClassifierError, DigitClassifier, accuracy, extract_features, feature_stats,
                               frechet_distance, label_agreement, load_classifier, save_classifier,
                               to_model_input, train_classifier)


@pytest.fixture(scope="module")
def digits(digits_dataset) -> str:
    return digits_dataset


@pytest.fixture(scope="module")
def trained(digits):
    from genai.data.image_dataset import load_image_arrays

    train_x, train_y = load_image_arrays(digits, "train")
    val_x, val_y = load_image_arrays(digits, "val")
    model = train_classifier(train_x, train_y, epochs=3, batch_size=64, log=lambda *_: None)
    return model, val_x, val_y


def test_frechet_distance_identical_symmetric_and_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 6)), rng.normal(1.0, 2.0, size=(500, 6)) @ rng.normal(size=(6, 6))
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-6)
    # Diagonal Gaussians: sum over dimensions of (mu1 - mu2)^2 + s1 + s2 - 2 sqrt(s1 s2).
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    by_hand = ((m1 - m2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()  # 9.25 + 4 + 1 = 14.25
    assert by_hand == pytest.approx(14.25)
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(by_hand, rel=1e-9)
    assert frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(9 + 1 + 4 - 4)  # 1-D
    # A singular covariance (a constant feature) still gives a finite distance.
    s_sing = np.diag([1.0, 0.0, 2.0])
    assert np.isfinite(frechet_distance(m1, s_sing, m2, s_sing))


def test_frechet_distance_separates_shifted_samples():
    rng = np.random.default_rng(1)
    cov = rng.normal(size=(16, 16)) / 4
    draw = lambda shift: rng.normal(size=(2000, 16)) @ cov + shift  # noqa: E731
    ref = feature_stats(draw(0.0))
    same, shifted = frechet_distance(*ref, *feature_stats(draw(0.0))), frechet_distance(*ref, *feature_stats(draw(0.5)))
    assert same < 0.1 * shifted and shifted == pytest.approx(16 * 0.25, rel=0.2)


def test_classifier_shapes_and_input_conversion():
    model = DigitClassifier().eval()
    grey28 = np.random.default_rng(0).integers(0, 256, size=(5, 1, 28, 28), dtype=np.uint8)
    x = to_model_input(grey28)
    assert x.dtype == torch.float32 and x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert to_model_input(grey28[:, 0]).shape == (5, 1, 28, 28)
    rgb32 = np.random.default_rng(1).integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    x3 = to_model_input(rgb32)
    assert x3.shape == (3, 1, 32, 32)
    assert torch.allclose(x3, torch.from_numpy(rgb32).float().mean(1, keepdim=True) / 127.5 - 1, atol=1e-5)
    floats = torch.rand(2, 1, 28, 28) * 2 - 1
    assert torch.equal(to_model_input(floats), floats)  # float input is taken as already in [-1, 1]
    with torch.no_grad():
        assert model(x).shape == (5, 10) and model.features(x).shape == (5, 128)
        assert model(x3).shape == (3, 10) and model.features(x3).shape == (3, 128)  # 32x32 resized to 28
        assert (model.features(x) >= 0).all()  # after ReLU
    feats = extract_features(model, rgb32, batch_size=2)
    assert feats.dtype == np.float64 and feats.shape == (3, 128)


def test_training_reaches_real_accuracy(trained):
    model, val_x, val_y = trained
    acc = accuracy(model, val_x, val_y)
    assert acc > 0.85, acc
    assert label_agreement(model, val_x, val_y) == acc
    shuffled = np.random.default_rng(0).permutation(val_y)
    assert label_agreement(model, val_x, torch.from_numpy(shuffled)) < 0.3
    # Real digits are closer to other real digits than to noise in the classifier's feature space.
    half = len(val_x) // 2
    ref = feature_stats(extract_features(model, val_x[:half]))
    noise = np.random.default_rng(0).integers(0, 256, size=val_x[half:].shape, dtype=np.uint8)
    real_fd = frechet_distance(*ref, *feature_stats(extract_features(model, val_x[half:])))
    noise_fd = frechet_distance(*ref, *feature_stats(extract_features(model, noise)))
    assert real_fd < 0.2 * noise_fd


def test_save_load_round_trip_and_errors(trained, tmp_path):
    model, val_x, _ = trained
    save_classifier(model, str(tmp_path / "clf"), {"accuracy": 0.9, "dataset": "builtin:digits", "epochs": 3})
    info = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert info["feature_dim"] == 128 and info["dataset"] == "builtin:digits"
    loaded = load_classifier(str(tmp_path / "clf"))
    x = to_model_input(val_x[:16])
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClassifierError, match=str(tmp_path / "empty")):
        load_classifier(str(tmp_path / "empty"))
    (tmp_path / "clf" / "classifier.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ClassifierError, match="classifier.pt"):
        load_classifier(str(tmp_path / "clf"))


def test_train_classifier_job(digits, tmp_path):
    out = tmp_path / "clf"
    r = run_job("train_classifier.py", "--data", digits, "--out", str(out), "--epochs", "1", "--limit", "400")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "val accuracy" in r.stdout and (out / "classifier.json").is_file()
    assert json.loads((out / "classifier.json").read_text())["epochs"] == 1
    for args in (["--data", "/nonexistent", "--out", str(tmp_path / "x")],
                 ["--data", digits, "--out", str(tmp_path / "missing" / "clf")]):
        r = run_job("train_classifier.py", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
