"""Single-image super-resolution: SRResNet (residual blocks, PixelShuffle upsampling, x2 / x4) and an
SRGAN-style discriminator, with the pixel, adversarial and perceptual (feature) losses. Pure torch.

Images are float tensors in [-1, 1]. Choices, and why:
- No batch norm in the generator (as EDSR and ESRGAN): it costs PSNR and ties each output to its batch.
- `bicubic_skip`: the network predicts a correction added to the bicubic upscaling of its input, and its last
  layer starts at zero, so an untrained model is exactly bicubic and training starts from that baseline.
- Pixel loss L1 by default (EDSR and ESRGAN train with it: it converges better than MSE); "mse" is available.
- The discriminator pools its features globally, so it takes any patch size (SRGAN's flattens a 96x96 patch).
- Perceptual loss: distances between features of any frozen nn.Module the caller brings (e.g. the project's own
  digit classifier through features_of(model, "features")); nothing is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genai.models.gan import d_loss as gan_d_loss
from genai.models.gan import g_loss as gan_g_loss

SCALES = (2, 4)
PIXEL_LOSSES = ("l1", "mse")
ADVERSARIAL_LOSSES = ("nonsaturating", "relativistic")


@dataclass
class SRConfig:
    scale: int = 4
    channels: int = 3
    features: int = 64  # SRResNet's width
    blocks: int = 16  # residual blocks
    bicubic_skip: bool = True
    ndf: int = 32  # discriminator width (doubles every second conv up to 8 * ndf)

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(map(str, SCALES))}, got {self.scale}")
        for name in ("channels", "features", "ndf"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {self.blocks}")

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualBlock(nn.Module):
    """x + conv(prelu(conv(x))), 3x3 convolutions at constant width."""

    def __init__(self, features: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(features, features, 3, 1, 1), nn.PReLU(features),
                                  nn.Conv2d(features, features, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    """Low-resolution images [B, C, h, w] in [-1, 1] -> [B, C, scale * h, scale * w] (not clamped)."""

    def __init__(self, cfg: SRConfig):
        super().__init__()
        self.config = cfg
        f = cfg.features
        self.head = nn.Sequential(nn.Conv2d(cfg.channels, f, 9, 1, 4), nn.PReLU(f))
        self.body = nn.Sequential(*[ResidualBlock(f) for _ in range(cfg.blocks)], nn.Conv2d(f, f, 3, 1, 1))
        # Each x2 stage: conv to 4f channels, then PixelShuffle folds them into a twice-as-large f-channel map.
        ups = []
        for _ in range(int(math.log2(cfg.scale))):
            ups += [nn.Conv2d(f, 4 * f, 3, 1, 1), nn.PixelShuffle(2), nn.PReLU(f)]
        self.upsample = nn.Sequential(*ups)
        self.tail = nn.Conv2d(f, cfg.channels, 9, 1, 4)
        if cfg.bicubic_skip:
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        if lr.dim() != 4 or lr.shape[1] != self.config.channels:
            raise ValueError(f"expected low-resolution images [B, {self.config.channels}, h, w], got {list(lr.shape)}")
        h = self.head(lr)
        out = self.tail(self.upsample(h + self.body(h)))
        if self.config.bicubic_skip:
            out = out + F.interpolate(lr, scale_factor=self.config.scale, mode="bicubic", align_corners=False)
        return out

    @torch.no_grad()
    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        """Inference: the super-resolved images clamped to [-1, 1]."""
        return self(lr).clamp(-1, 1)


class SRDiscriminator(nn.Module):
    """High-resolution images [B, C, H, W] (any H, W) -> scores [B] (logits).

    SRGAN's eight 3x3 convolutions (every second one strided, widths ndf .. 8 ndf) with LeakyReLU and no batch
    norm (each score depends on its own image), global average pooling, then a two-layer head."""

    def __init__(self, cfg: SRConfig):
        super().__init__()
        self.config = cfg
        widths = [cfg.ndf, cfg.ndf, 2 * cfg.ndf, 2 * cfg.ndf, 4 * cfg.ndf, 4 * cfg.ndf, 8 * cfg.ndf, 8 * cfg.ndf]
        layers, c_in = [], cfg.channels
        for i, c_out in enumerate(widths):
            layers += [nn.Conv2d(c_in, c_out, 3, 2 if i % 2 else 1, 1), nn.LeakyReLU(0.2, True)]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.LeakyReLU(0.2, True), nn.Linear(2 * c_in, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


def pixel_loss(sr: torch.Tensor, hr: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (l1) or squared (mse) error per pixel, in float32."""
    if kind == "l1":
        return F.l1_loss(sr.float(), hr.float())
    if kind == "mse":
        return F.mse_loss(sr.float(), hr.float())
    raise ValueError(f"unknown pixel loss {kind!r}: expected one of {', '.join(PIXEL_LOSSES)}")


def adversarial_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor,
                       kind: str = "relativistic") -> torch.Tensor:
    """The discriminator's loss. nonsaturating: SRGAN's; relativistic: ESRGAN's relativistic average GAN, where
    D asks whether a real image is more realistic than the average fake (and a fake less than the average real)."""
    real_scores, fake_scores = real_scores.float(), fake_scores.float()
    if kind == "nonsaturating":
        return gan_d_loss(real_scores, fake_scores, "nonsaturating")
    if kind == "relativistic":
        return (F.softplus(-(real_scores - fake_scores.mean())).mean()
                + F.softplus(fake_scores - real_scores.mean()).mean())
    raise ValueError(f"unknown adversarial loss {kind!r}: expected one of {', '.join(ADVERSARIAL_LOSSES)}")


def adversarial_g_loss(fake_scores: torch.Tensor, real_scores: torch.Tensor | None = None,
                       kind: str = "relativistic") -> torch.Tensor:
    """The generator's adversarial loss; the relativistic one also needs D's scores of the real images."""
    fake_scores = fake_scores.float()
    if kind == "nonsaturating":
        return gan_g_loss(fake_scores, "nonsaturating")
    if kind == "relativistic":
        if real_scores is None:
            raise ValueError("the relativistic generator loss needs the discriminator's scores of real images")
        real_scores = real_scores.float()
        return (F.softplus(real_scores - fake_scores.mean()).mean()
                + F.softplus(-(fake_scores - real_scores.mean())).mean())
    raise ValueError(f"unknown adversarial loss {kind!r}: expected one of {', '.join(ADVERSARIAL_LOSSES)}")


class MethodFeatures(nn.Module):
    """A module's named method as the forward of a module, e.g. DigitClassifier.features."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        if not callable(getattr(module, method, None)):
            raise ValueError(f"{type(module).__name__} has no method {method!r}")
        self.module, self.method = module, method

    def forward(self, x: torch.Tensor):
        return getattr(self.module, self.method)(x)


def features_of(module: nn.Module, method: str = "features") -> nn.Module:
    """A feature extractor for FeatureLoss that calls `module.<method>(x)`."""
    return MethodFeatures(module, method)


class FeatureLoss(nn.Module):
    """Perceptual loss: the mean distance (l1 or mse) between a frozen extractor's features of sr and hr.

    The extractor returns a tensor or a list/tuple of tensors (several layers, averaged with `weights`); it is
    put in eval mode and its parameters frozen, and it stays in eval mode under .train(). With no extractor the
    loss is zero, so a recipe can turn the term off without changing the loop."""

    def __init__(self, extractor: nn.Module | None, kind: str = "l1", weights: list[float] | None = None):
        super().__init__()
        if kind not in PIXEL_LOSSES:
            raise ValueError(f"unknown feature distance {kind!r}: expected one of {', '.join(PIXEL_LOSSES)}")
        self.extractor, self.kind, self.weights = extractor, kind, weights
        if extractor is not None:
            extractor.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureLoss:
        super().train(mode)
        if self.extractor is not None:
            self.extractor.eval()
        return self

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if self.extractor is None:
            return torch.zeros((), device=sr.device)
        fake = self.extractor(sr)
        with torch.no_grad():
            real = self.extractor(hr)
        fake = list(fake) if isinstance(fake, (list, tuple)) else [fake]
        real = list(real) if isinstance(real, (list, tuple)) else [real]
        weights = self.weights or [1.0 / len(fake)] * len(fake)
        if len(weights) != len(fake) or len(real) != len(fake):
            raise ValueError(f"the extractor gave {len(fake)} feature maps but {len(weights)} weights")
        return sum(w * pixel_loss(f, r, self.kind) for w, f, r in zip(weights, fake, real))


def generator_loss_terms(sr: torch.Tensor, hr: torch.Tensor, fake_scores: torch.Tensor | None = None,
                         real_scores: torch.Tensor | None = None, feature_loss: FeatureLoss | None = None,
                         pixel: str = "l1", adversarial: str = "relativistic", pixel_weight: float = 1.0,
                         feature_weight: float = 1.0, adversarial_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """The generator's terms as float32 scalars: pixel, feature, adversarial and their weighted sum `loss`.
    SRResNet pre-training: pixel only (the defaults). An ESRGAN-style fine-tune: pixel_weight 1e-2,
    feature_weight 1, adversarial_weight 5e-3, with D's scores of sr (and of hr, for the relativistic loss)."""
    zero = torch.zeros((), device=sr.device)
    terms = {"pixel": pixel_loss(sr, hr, pixel),
             "feature": feature_loss(sr, hr).float() if feature_loss is not None else zero,
             "adversarial": zero}
    if adversarial_weight:
        if fake_scores is None:
            raise ValueError("adversarial_weight > 0 needs the discriminator's scores of the generated images")
        terms["adversarial"] = adversarial_g_loss(fake_scores, real_scores, adversarial)
    terms["loss"] = (pixel_weight * terms["pixel"] + feature_weight * terms["feature"]
                     + adversarial_weight * terms["adversarial"])
    return terms


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
