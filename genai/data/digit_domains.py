"""Two unpaired image domains for translation (CycleGAN) made from one labelled digit set, offline.

The builtin pair: domain A is scikit-learn's bundled digits (builtin:digits, 28x28 grey) as they are, domain B a
stroke-style variant of *other* digits from the same set (by default "bold": strokes thickened by a grey
dilation). Why this pair: it needs no download and no ../shared; both domains stay readable by the project's
digit classifier, so label preservation (the classifier's label of x equals that of G(x)) measures the
translation; the style is spatial, not a per-pixel map, so the generators must learn something; and A and B are
disjoint halves of a seeded shuffle, so no image has its counterpart in the other domain (truly unpaired).
The same helpers turn any labelled digits (e.g. MNIST, via load_image_arrays) into such a pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

STYLES = ("bold", "thin", "invert")


def stylize(images: np.ndarray, style: str = "bold") -> np.ndarray:
    """uint8 [N, C, H, W] -> the same images in a style: bold (3x3 grey dilation, applied twice: strokes about 2
    px thicker on each side), thin (3x3 grey erosion, once) or invert (255 - x)."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {a.dtype} {list(a.shape)}")
    if style == "invert":
        return 255 - a
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: expected one of {', '.join(STYLES)}")
    x = torch.from_numpy(a.astype(np.float32))
    if style == "bold":
        for _ in range(2):
            x = F.max_pool2d(x, 3, stride=1, padding=1)
    else:
        x = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


@dataclass
class UnpairedDomains:
    """Images uint8 [N, C, H, W] and labels [N] of each domain (labels are for evaluation only)."""

    a_images: np.ndarray
    a_labels: np.ndarray
    b_images: np.ndarray
    b_labels: np.ndarray
    style: str


def unpaired_domains(images: np.ndarray, labels: np.ndarray, style: str = "bold", seed: int = 0) -> UnpairedDomains:
    """Split labelled images [N, C, H, W] into two disjoint halves by a seeded shuffle: A keeps its images, B gets
    stylize(style) of the other half."""
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) != len(labels) or len(images) < 2:
        raise ValueError(f"need at least two images and one label each, got {len(images)} images, "
                         f"{len(labels)} labels")
    order = np.random.default_rng(seed).permutation(len(images))
    a, b = np.sort(order[:len(order) // 2]), np.sort(order[len(order) // 2:])
    return UnpairedDomains(images[a], labels[a], stylize(images[b], style), labels[b], style)


def builtin_digit_domains(split: str = "train", style: str = "bold", val_fraction: float = 0.1,
                          seed: int = 0) -> UnpairedDomains:
    """The builtin pair from builtin:digits' train or val split (the same split as the image dataset's)."""
    from genai.data.image_dataset import load_image_source

    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    data = load_image_source("builtin:digits", val_fraction, log=lambda *_: None)[split]
    return unpaired_domains(data.images.transpose(0, 3, 1, 2), data.labels, style, seed)
