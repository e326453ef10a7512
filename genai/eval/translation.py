"""Metrics of unpaired image-to-image translation between two digit domains: label preservation (the digit
classifier gives x and G(x) the same label) in each direction, and the cycle reconstruction error."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from genai.eval.digits import DigitClassifier, predict

Translate = Callable[[torch.Tensor], torch.Tensor]


def _as_float(images) -> torch.Tensor:
    """uint8 [N, C, H, W] (array or tensor) -> float [-1, 1]; float input is taken as already in [-1, 1]."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def _map(fn: Translate, x: torch.Tensor, batch_size: int, device, dtype) -> torch.Tensor:
    out = [fn(x[i:i + batch_size].to(device=device, dtype=dtype)).float().clamp(-1, 1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else x[:0]


@torch.no_grad()
def translation_metrics(ab: Translate, ba: Translate, a_images, b_images, classifier: DigitClassifier | None,
                        batch_size: int = 256, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """For generators ab (A -> B) and ba (B -> A) (modules, or a DeepSpeed engine's .module) on held-out images
    of each domain (uint8 [N, C, H, W] or float in [-1, 1]):
    label_preservation_ab / _ba: share of x whose predicted label equals that of the translated x;
    cycle_l1_a / _b: mean absolute error of ba(ab(a)) against a (and ab(ba(b)) against b), in [-1, 1] units.
    Without a classifier, the cycle errors only."""
    out = {}
    for name, x, there, back in (("a", _as_float(a_images), ab, ba), ("b", _as_float(b_images), ba, ab)):
        if len(x) == 0:
            raise ValueError(f"no held-out images of domain {name.upper()}")
        moved = _map(there, x, batch_size, device, dtype)
        returned = _map(back, moved, batch_size, device, dtype)
        direction = "ab" if name == "a" else "ba"
        if classifier is not None:
            out[f"label_preservation_{direction}"] = float(np.mean(predict(classifier, x) == predict(classifier,
                                                                                               moved)))
        out[f"cycle_l1_{name}"] = float((returned - x).abs().mean())
    return out
