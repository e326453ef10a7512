"""Full-reference image quality: PSNR and SSIM through scikit-image (skimage.metrics), and the super-resolution
evaluation that logs a model beside bicubic upscaling of the same held-out images.

Why scikit-image: it is already the source of the builtin photographs (genai/data/photos.py), so the metrics cost
no further dependency (torchmetrics would add itself and lightning-utilities), and its SSIM with
gaussian_weights=True, sigma=1.5, use_sample_covariance=False is the reference formulation of Wang et al. (2004).

Conventions of SR benchmarks, followed here: both images are first quantised to 8 bits (as if saved as PNG);
`luma` measures colour images on the Y channel of YCbCr (ITU-R BT.601, values 16-235, data range 255);
`crop_border` pixels are cut from every side (by default the scale: the border a network cannot reconstruct).
Identical images have a PSNR of inf (no error) and an SSIM of 1.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from genai.data.sr_pairs import bicubic_downscale, bicubic_upscale, crop_to_multiple

GAUSSIAN_WINDOW = 11  # the 11-tap Gaussian (sigma 1.5) of the SSIM paper


def to_uint8_hwc(images) -> np.ndarray:
    """Images [N, C, H, W] (or one [C, H, W]) as uint8 [N, H, W, C]: float tensors/arrays are taken as in
    [-1, 1] and rounded to the nearest of 256 levels; uint8 is kept."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        images = images.numpy() if images.dtype == torch.uint8 else images.float().numpy()
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.rint((a.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _prepare(pred, target, crop_border: int, luma: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Both sets as [N, H, W, C] arrays ready for skimage, and their data range."""
    p, t = to_uint8_hwc(pred), to_uint8_hwc(target)
    if p.shape != t.shape:
        raise ValueError(f"images of different shapes: {list(p.shape)} vs {list(t.shape)} (as [N, H, W, C])")
    if crop_border:
        if min(p.shape[1:3]) <= 2 * crop_border:
            raise ValueError(f"images {p.shape[1]}x{p.shape[2]} are too small for a {crop_border}-pixel border crop")
        p, t = (a[:, crop_border:-crop_border, crop_border:-crop_border] for a in (p, t))
    if luma and p.shape[-1] == 3:
        from skimage.color import rgb2ycbcr

        p, t = (np.stack([rgb2ycbcr(im)[..., :1] for im in a]) for a in (p, t))
    return p, t, 255.0  # uint8 levels, and Y in 16-235 on the same 0-255 scale


def psnr(pred, target, crop_border: int = 0, luma: bool = False) -> np.ndarray:
    """PSNR in dB of each image [N] (inf where the images are identical)."""
    from skimage.metrics import peak_signal_noise_ratio

    p, t, data_range = _prepare(pred, target, crop_border, luma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # log10 of x / 0 for identical images: inf, as meant
        return np.array([peak_signal_noise_ratio(b.astype(np.float64), a.astype(np.float64), data_range=data_range)
                         for a, b in zip(p, t)])


def ssim(pred, target, crop_border: int = 0, luma: bool = False) -> np.ndarray:
    """SSIM of each image [N], averaged over channels. Images smaller than the 11x11 Gaussian window (e.g. the
    8x8 digits) use the largest odd uniform window that fits instead."""
    from skimage.metrics import structural_similarity

    p, t, data_range = _prepare(pred, target, crop_border, luma)
    side = min(p.shape[1:3])
    if side >= GAUSSIAN_WINDOW:
        kw = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
    elif side >= 3:
        kw = {"win_size": side if side % 2 else side - 1}
    else:
        raise ValueError(f"images {p.shape[1]}x{p.shape[2]} are too small for SSIM (at least 3x3)")
    channel_axis = -1 if p.shape[-1] > 1 else None
    out = []
    for a, b in zip(p, t):
        a, b = a.astype(np.float64), b.astype(np.float64)
        if channel_axis is None:
            a, b = a[..., 0], b[..., 0]
        out.append(structural_similarity(b, a, data_range=data_range, channel_axis=channel_axis, **kw))
    return np.array(out)


def image_quality(pred, target, crop_border: int = 0, luma: bool = False) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over a set of images of one size."""
    return {"psnr": float(np.mean(psnr(pred, target, crop_border, luma))),
            "ssim": float(np.mean(ssim(pred, target, crop_border, luma)))}


@torch.no_grad()
def evaluate_super_resolution(upscale: Callable[[torch.Tensor], torch.Tensor], hr_images: Sequence[torch.Tensor],
                              scale: int, crop_border: int | None = None, luma: bool = True,
                              max_size: int | None = None, device: torch.device | str = "cpu",
                              dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """PSNR and SSIM of `upscale(lr)` against each held-out image, beside the bicubic upscaling of the same lr.

    Each high-resolution image [C, H, W] in [-1, 1] is centre-cropped to `max_size` (if given; bounds the cost)
    and to multiples of `scale`, downscaled with bicubic_downscale (as the training pairs are), and upscaled
    both ways. Returns the means over images: psnr, ssim, bicubic_psnr, bicubic_ssim, and psnr_gain
    (psnr - bicubic_psnr, dB)."""
    crop = scale if crop_border is None else crop_border
    scores = {k: [] for k in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")}
    for hr in hr_images:
        if max_size is not None:
            top = max(0, (hr.shape[-2] - max_size) // 2)
            left = max(0, (hr.shape[-1] - max_size) // 2)
            hr = hr[..., top:top + max_size, left:left + max_size]
        hr = crop_to_multiple(hr.float(), scale)[None]
        lr = bicubic_downscale(hr, scale)
        sr = upscale(lr.to(device=device, dtype=dtype)).float().clamp(-1, 1).cpu()
        if sr.shape != hr.shape:
            raise ValueError(f"the model upscaled {list(lr.shape)} to {list(sr.shape)}, expected {list(hr.shape)}")
        base = bicubic_upscale(lr, scale)
        scores["psnr"].append(psnr(sr, hr, crop, luma)[0])
        scores["ssim"].append(ssim(sr, hr, crop, luma)[0])
        scores["bicubic_psnr"].append(psnr(base, hr, crop, luma)[0])
        scores["bicubic_ssim"].append(ssim(base, hr, crop, luma)[0])
    if not scores["psnr"]:
        raise ValueError("no held-out images to evaluate")
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    out["psnr_gain"] = out["psnr"] - out["bicubic_psnr"]
    return out
