"""DCGAN-style generator and discriminator for small images (28x28 or 32x32), optionally class-conditional
(label embedding into G, projection discriminator), with the nonsaturating, hinge and WGAN-GP losses and an EMA
of the generator for sampling. Pure torch."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

LOSSES = ("nonsaturating", "hinge", "wgan-gp")


@dataclass
class GANConfig:
    image_size: int = 28  # divisible by 4: two stride-2 stages
    channels: int = 1
    z_dim: int = 64
    ngf: int = 64  # generator width
    ndf: int = 64  # discriminator width
    num_classes: int = 0  # 0: unconditional; >0: class-conditional G and D
    loss: str = "nonsaturating"
    spectral_norm: bool = False  # on the discriminator's layers

    def __post_init__(self) -> None:
        if self.image_size < 4 or self.image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4, got {self.image_size}")
        for name in ("channels", "z_dim", "ngf", "ndf"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {self.num_classes}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class Generator(nn.Module):
    """z [B, z_dim] (and labels [B] when conditional) -> images [B, C, S, S] in [-1, 1]."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.config = cfg
        self.base = cfg.image_size // 4
        # Conditional: a label embedding at the scale of z (default N(0, 1) init), concatenated to it.
        self.embed = nn.Embedding(cfg.num_classes, cfg.z_dim) if cfg.num_classes else None
        in_dim = cfg.z_dim * (2 if cfg.num_classes else 1)
        c0, c1, c2 = cfg.ngf * 2, cfg.ngf, max(cfg.ngf // 2, 1)
        # Layers followed by batch norm need no bias.
        self.fc = nn.Linear(in_dim, c0 * self.base * self.base, bias=False)
        self.net = nn.Sequential(
            nn.BatchNorm2d(c0), nn.ReLU(True),
            nn.ConvTranspose2d(c0, c1, 4, 2, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(True),  # S/4 -> S/2
            nn.ConvTranspose2d(c1, c2, 4, 2, 1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(True),  # S/2 -> S
            nn.Conv2d(c2, cfg.channels, 3, 1, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("labels are required: the generator is class-conditional")
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)
        elif labels is not None:
            raise ValueError("labels given to an unconditional generator")
        return self.net(self.fc(z).view(z.size(0), -1, self.base, self.base))


class Discriminator(nn.Module):
    """images [B, C, S, S] (and labels [B] when conditional) -> scores [B] (logits or critic values).

    No batch norm: each score depends on its own sample only, as the gradient penalty requires.
    Conditional: a projection discriminator, score = fc(h) + <embed(y), h> over the flattened features h.
    """

    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.config = cfg
        sn = spectral_norm if cfg.spectral_norm else (lambda m: m)
        features = cfg.ndf * 2 * (cfg.image_size // 4) ** 2
        self.net = nn.Sequential(
            sn(nn.Conv2d(cfg.channels, cfg.ndf, 4, 2, 1)), nn.LeakyReLU(0.2, True),  # S -> S/2
            sn(nn.Conv2d(cfg.ndf, cfg.ndf * 2, 4, 2, 1)), nn.LeakyReLU(0.2, True),  # S/2 -> S/4
            nn.Flatten(),
        )
        self.fc = sn(nn.Linear(features, 1))
        self.embed = None
        if cfg.num_classes:
            embed = nn.Embedding(cfg.num_classes, features)
            nn.init.normal_(embed.weight, std=0.02)  # the scale of fc's weights, so neither term dominates
            self.embed = sn(embed)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if (self.embed is None) != (labels is None):
            raise ValueError("labels are required: the discriminator is class-conditional" if labels is None
                             else "labels given to an unconditional discriminator")
        h = self.net(x)
        out = self.fc(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(labels) * h).sum(dim=1)
        return out


def _weight(module: nn.Module) -> torch.Tensor:
    """The trainable weight: under spectral norm, the unnormalised original."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """DCGAN init: conv and linear weights N(0, 0.02), batch-norm weights N(1, 0.02), biases 0.

    Embeddings keep the init their model gave them."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(_weight(m), 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss; for wgan-gp without the penalty (see `gradient_penalty`)."""
    if kind == "nonsaturating":
        return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()
    if kind == "hinge":
        return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
    if kind == "wgan-gp":
        return fake_scores.mean() - real_scores.mean()
    raise ValueError(f"unknown GAN loss {kind!r}: expected one of {', '.join(LOSSES)}")


def g_loss(fake_scores: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "nonsaturating":
        return F.softplus(-fake_scores).mean()
    if kind in ("hinge", "wgan-gp"):
        return -fake_scores.mean()
    raise ValueError(f"unknown GAN loss {kind!r}: expected one of {', '.join(LOSSES)}")


def gradient_penalty(
    discriminator,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP: mean over samples of (||dD(x)/dx|| - 1)^2 at random points between real and fake images.

    The graph is kept (create_graph), so the penalty backpropagates into the discriminator. `discriminator`
    is only called (a DeepSpeed engine works); `generator` draws the interpolation weights.
    """
    eps = torch.rand((real.size(0),) + (1,) * (real.dim() - 1), generator=generator, device=real.device,
                     dtype=real.dtype)
    x = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    grads = torch.autograd.grad(discriminator(x, labels).sum(), x, create_graph=True)[0]
    return ((grads.flatten(1).float().norm(2, dim=1) - 1) ** 2).mean()


class EMA:
    """Exponential moving average of a module's parameters (buffers copied), for sampling."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float | None = None) -> None:
        """ema = decay * ema + (1 - decay) * param, matched by name (the live module may differ in dtype)."""
        d = self.decay if decay is None else decay
        params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
        for name, p in self.module.named_parameters():
            p.mul_(d).add_(params[name].detach().to(p), alpha=1 - d)
        for name, b in self.module.named_buffers():
            b.copy_(buffers[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.module.load_state_dict(state["module"])
