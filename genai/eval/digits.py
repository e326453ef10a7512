"""A small digit classifier trained once on MNIST (jobs/train_classifier.py), used as a download-free quality
metric for GANs: the Frechet distance between real and generated digits in its 128-d feature space (an "FID"
with our own feature extractor) and, for class-conditional GANs, the share of samples classified as their
requested label. Images are uint8 [N, C, H, W] arrays or float tensors in [-1, 1]; any size, any channels."""

from __future__ import annotations

import io
import json
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cluster.storage import StorageError, explain, resolve
from genai.config import ConfigError

FEATURE_DIM, NUM_CLASSES, SIZE = 128, 10, 28
WEIGHTS, INFO = "classifier.pt", "classifier.json"


class ClassifierError(ConfigError):
    """A classifier folder (train.classifier, --classifier) cannot be used; the message names the URI and the reason.
    A ConfigError, so that the jobs report it as bad input without importing torch to know it."""


class DigitClassifier(nn.Module):
    """conv 32 -> pool -> conv 64 -> pool -> fc 128 (the features) -> dropout -> fc 10, on 1x28x28 in [-1, 1]."""

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, FEATURE_DIM)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> [B, 128] penultimate features (after ReLU)."""
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def to_model_input(images) -> torch.Tensor:
    """uint8 [N, C, H, W] (array or tensor) -> float [N, 1, H, W] in [-1, 1]; float input is taken as already
    in [-1, 1]; [N, H, W] gains a channel; colour becomes grey by the channel mean."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))  # a copy: writable
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    else:
        x = x.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    return x.mean(dim=1, keepdim=True) if x.shape[1] != 1 else x


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation: random shifts of up to 2 px, rotations of up to 10 degrees, scale 0.9-1.1."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=gen) * 2 - 1) * (10 * np.pi / 180)
    scale = 1 + (torch.rand(b, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 * 2 / x.shape[-1])  # 2 px in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = 2, batch_size: int = 128,
                     lr: float = 1e-3, seed: int = 0, augment: bool = True, device: str = "cpu",
                     log=print) -> DigitClassifier:
    """Train a DigitClassifier with Adam on uint8 images [N, C, H, W] and labels 0-9; returns it in eval mode."""
    labels = np.asarray(labels)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (and at least one): {len(images)} images, "
                         f"{len(labels)} labels")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be 0-{NUM_CLASSES - 1}, got {labels.min()}-{labels.max()}")
    x, y = to_model_input(images), torch.as_tensor(labels, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left alone
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = DigitClassifier().to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for epoch in range(1, epochs + 1):
            t0, total, seen = time.time(), 0.0, 0
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                xb = _augment(x[idx], gen) if augment else x[idx]
                loss = F.cross_entropy(model(xb.to(device)), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, seen = total + loss.item() * len(idx), seen + len(idx)
            log(f"classifier epoch {epoch}/{epochs}: loss {total / seen:.4f} ({time.time() - t0:.1f} s)")
    return model.eval()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model: DigitClassifier, images, batch_size: int = 512) -> np.ndarray:
    """Predicted labels (int64 [N]) of uint8 images or float images in [-1, 1]."""
    model.eval()
    out = [model(to_model_input(images[i:i + batch_size]).to(_device(model))).argmax(1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def accuracy(model: DigitClassifier, images_uint8, labels, batch_size: int = 512) -> float:
    """Share of images classified as their label."""
    return label_agreement(model, images_uint8, labels, batch_size)


@torch.no_grad()
def label_agreement(model: DigitClassifier, images, requested_labels, batch_size: int = 512) -> float:
    """Share of images (e.g. a conditional GAN's samples) classified as their requested label."""
    if isinstance(requested_labels, torch.Tensor):
        requested_labels = requested_labels.cpu().numpy()
    requested = np.asarray(requested_labels).reshape(-1)
    if len(requested) != len(images) or len(images) == 0:
        raise ValueError(f"need one requested label per image: {len(images)} images, {len(requested)} labels")
    return float((predict(model, images, batch_size) == requested).mean())


@torch.no_grad()
def extract_features(model: DigitClassifier, images, batch_size: int = 512) -> np.ndarray:
    """float64 [N, 128] features of uint8 images or float images in [-1, 1]."""
    model.eval()
    out = [model.features(to_model_input(images[i:i + batch_size]).to(_device(model))).double().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) of a feature matrix."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need a [N >= 2, D] feature matrix, got shape {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), the FID formula (Heusel et al. 2017)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: means {mu1.shape} / {mu2.shape}, "
                         f"covariances {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about (nearly) singular products; handled below
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():  # singular product: nudge the diagonals
            offset = np.eye(len(sigma1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return max(float(fd), 0.0)  # rounding can leave identical statistics a hair below zero


def save_classifier(model: DigitClassifier, uri: str, info: dict) -> None:
    """Write <uri>/classifier.pt (state_dict) and then <uri>/classifier.json (info), the completion mark."""
    loc = resolve(uri)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    loc.join(WEIGHTS).write_bytes(buf.getvalue())
    loc.join(INFO).write_text(json.dumps({**info, "feature_dim": FEATURE_DIM}, indent=2) + "\n")


def load_classifier(uri: str, device: str = "cpu") -> DigitClassifier:
    """Load a classifier saved by save_classifier (eval mode, on device); ClassifierError if missing or corrupt."""
    try:
        loc = resolve(uri)
        if not loc.join(INFO).exists():
            raise ClassifierError(f"{uri}: no {INFO} there (train a classifier with jobs/train_classifier.py)")
        text, raw = loc.join(INFO).read_bytes(), loc.join(WEIGHTS).read_bytes()
    except StorageError as exc:
        raise ClassifierError(f"classifier {exc}") from None
    except OSError as exc:
        raise ClassifierError(f"classifier {explain(uri, exc)}") from None
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise ClassifierError(f"{uri}: {INFO} is not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("feature_dim", FEATURE_DIM) != FEATURE_DIM:
        raise ClassifierError(f"{uri}: {INFO} does not describe a {FEATURE_DIM}-feature digit classifier")
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's RNG stream alone
        model = DigitClassifier()
    try:
        model.load_state_dict(torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True))
    except Exception as exc:  # truncated file, not a state_dict, wrong shapes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ClassifierError(f"{uri}: {WEIGHTS} is not a readable DigitClassifier ({first})") from None
    return model.to(device).eval()
