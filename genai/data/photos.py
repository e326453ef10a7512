"""A builtin offline set of photographs: the colour sample images bundled with scikit-image (no download), split
into train and val by name, for super-resolution demos and tests.

Every image here ships inside the scikit-image wheel (skimage/data/*.png, *.jpg); the datasets that scikit-image
fetches on first use (e.g. `lily`, `skin`, `eagle`) are left out on purpose.
"""

from __future__ import annotations

import numpy as np

# name -> (skimage.data function, index into its result when it returns several arrays)
PHOTOS = {
    "astronaut": ("astronaut", None),  # 512x512
    "coffee": ("coffee", None),  # 400x600
    "rocket": ("rocket", None),  # 427x640
    "hubble_deep_field": ("hubble_deep_field", None),  # 872x1000
    "immunohistochemistry": ("immunohistochemistry", None),  # 512x512
    "chelsea": ("chelsea", None),  # 300x451
    "motorcycle": ("stereo_motorcycle", 0),  # 500x741, the left view
}
SPLITS = {
    "train": ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"),
    "val": ("chelsea", "motorcycle"),
}


def _skimage_data():
    try:
        import skimage.data
    except ImportError:
        raise ImportError("builtin photos need the package `scikit-image` (pip install scikit-image)") from None
    return skimage.data


def load_photo(name: str, channels: int = 3) -> np.ndarray:
    """One bundled photograph as uint8 [H, W, channels]; channels=1 gives its luma (ITU-R BT.601)."""
    if name not in PHOTOS:
        raise ValueError(f"no builtin photo {name!r} (there are {', '.join(PHOTOS)})")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    func, index = PHOTOS[name]
    image = getattr(_skimage_data(), func)()
    if index is not None:
        image = image[index]
    image = np.asarray(image)[..., :3]
    if channels == 1:
        luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        image = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    return np.ascontiguousarray(image)


def builtin_photos(split: str = "train", channels: int = 3) -> dict[str, np.ndarray]:
    """The split's photographs by name, each uint8 [H, W, channels] (sizes differ)."""
    if split not in SPLITS:
        raise ValueError(f"no split {split!r} of the builtin photos (there are {', '.join(SPLITS)})")
    return {name: load_photo(name, channels) for name in SPLITS[split]}
