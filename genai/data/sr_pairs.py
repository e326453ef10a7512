"""Super-resolution training pairs made on the fly: random high-resolution crops of a set of images, each
downscaled bicubically (antialiased) into its low-resolution input. Torch only.

Images are float tensors [C, H, W] in [-1, 1] (see to_float_image for uint8 input). The pairs of batch i depend
only on (seed, i), so a resumed run or another worker that knows i draws the same pairs without replaying the
earlier ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_float_image(image) -> torch.Tensor:
    """A uint8 image, HWC (as decoded from PNG/JPEG) or HW (grey), as a float tensor [C, H, W] in [-1, 1]."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image [H, W] or [H, W, C], got shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float() / 127.5 - 1.0


def bicubic_downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H // scale, W // scale]: bicubic with antialiasing (as MATLAB's imresize, the usual
    way SR benchmarks make their inputs), clamped to [-1, 1]. H and W should be multiples of scale."""
    if hr.shape[-2] < scale or hr.shape[-1] < scale:
        raise ValueError(f"image {hr.shape[-2]}x{hr.shape[-1]} is smaller than the scale {scale}")
    size = (hr.shape[-2] // scale, hr.shape[-1] // scale)
    return F.interpolate(hr.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def bicubic_upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, scale * h, scale * w], bicubic, clamped to [-1, 1]: the baseline SR is measured by."""
    return F.interpolate(lr.float(), scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


def crop_to_multiple(image: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop [.., H, W] at the bottom and right to multiples of scale, so that downscaling is exact."""
    return image[..., :image.shape[-2] // scale * scale, :image.shape[-1] // scale * scale]


def seed_for(seed: int, index: int) -> int:
    """A 63-bit seed mixed from (seed, index), so that nearby indices give unrelated streams."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]) >> 1


class SRPairSampler:
    """Random (lr, hr) training pairs from a fixed set of high-resolution images.

    batch(i) draws `batch_size` crops of `patch_size` (high-resolution pixels, a multiple of scale): an image
    chosen uniformly, a uniform position, and with `augment` a random horizontal flip and a quarter turn (the
    eight symmetries of the square, as EDSR trains); then lr = bicubic_downscale(hr, scale)."""

    def __init__(self, images: Sequence[torch.Tensor], patch_size: int, scale: int, batch_size: int, seed: int = 0,
                 augment: bool = True):
        if patch_size < scale or patch_size % scale:
            raise ValueError(f"patch_size {patch_size} must be a positive multiple of the scale {scale}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not images:
            raise ValueError("no images to crop training pairs from")
        channels = {int(im.shape[0]) for im in images}
        if len(channels) != 1:
            raise ValueError(f"images with different channel counts {sorted(channels)}")
        for i, im in enumerate(images):
            if im.dim() != 3:
                raise ValueError(f"image {i} has shape {list(im.shape)}, expected [C, H, W]")
            if min(im.shape[-2:]) < patch_size:
                raise ValueError(f"image {i} is {im.shape[-2]}x{im.shape[-1]}, smaller than the "
                                 f"{patch_size}x{patch_size} training patch")
        self.images = [im.float() for im in images]
        self.patch_size, self.scale, self.batch_size = patch_size, scale, batch_size
        self.seed, self.augment = seed, augment

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The index-th batch: (lr [B, C, p/scale, p/scale], hr [B, C, p, p]), float32 in [-1, 1], on the CPU."""
        gen = torch.Generator().manual_seed(seed_for(self.seed, index))
        p, n = self.patch_size, self.batch_size
        which = torch.randint(len(self.images), (n,), generator=gen).tolist()
        u = torch.rand(n, 2, generator=gen)
        flips = torch.randint(2, (n,), generator=gen).tolist()
        turns = torch.randint(4, (n,), generator=gen).tolist()
        crops = []
        for k, i in enumerate(which):
            im = self.images[i]
            top = int(u[k, 0] * (im.shape[-2] - p + 1))
            left = int(u[k, 1] * (im.shape[-1] - p + 1))
            crop = im[:, top:top + p, left:left + p]
            if self.augment:
                if flips[k]:
                    crop = crop.flip(-1)
                crop = torch.rot90(crop, turns[k], dims=(-2, -1))
            crops.append(crop)
        hr = torch.stack(crops).contiguous()
        return bicubic_downscale(hr, self.scale), hr

    def __iter__(self):
        """batch(0), batch(1), ... without end."""
        i = 0
        while True:
            yield self.batch(i)
            i += 1
