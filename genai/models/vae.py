"""A convolutional variational autoencoder for small images (8x8, 28x28, 32x32; 1 or 3 channels), optionally
class-conditional (a label embedding into the encoder and the decoder), with a standard Gaussian prior, the ELBO
terms as a loss, and sampling / reconstruction helpers. Pure torch.

Images are float tensors in [-1, 1]. Likelihoods:
    bernoulli  decoder logits; targets (x + 1) / 2 in [0, 1]; binary cross-entropy summed over pixels, as in the
               pytorch/examples MNIST VAE, so negative ELBOs (nats per image) compare with it
    gaussian   decoder means; N(mean, sigma^2) with a fixed sigma (config), summed over pixels
Numerical stability: the encoder's log-variance is clamped to [LOGVAR_MIN, LOGVAR_MAX] before use, so exp() can
neither overflow nor collapse to zero; the Bernoulli term goes through binary_cross_entropy_with_logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

LIKELIHOODS = ("bernoulli", "gaussian")
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class VAEConfig:
    image_size: int = 28  # a multiple of 4: two stride-2 stages (8 -> 2, 28 -> 7, 32 -> 8)
    channels: int = 1
    z_dim: int = 16
    width: int = 32  # channels of the first conv stage; the second has twice as many
    hidden: int = 256  # the fully connected layer between the conv features and the latent
    num_classes: int = 0  # 0: unconditional; >0: class-conditional encoder and decoder
    beta: float = 1.0  # weight of the KL term in the training loss (beta-VAE); the ELBO itself uses 1
    likelihood: str = "bernoulli"
    sigma: float = 0.1  # the gaussian likelihood's fixed standard deviation, in [-1, 1] pixel units

    def __post_init__(self) -> None:
        if self.image_size < 4 or self.image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4, got {self.image_size}")
        for name in ("channels", "z_dim", "width", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {self.num_classes}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")

    def to_dict(self) -> dict:
        return asdict(self)


class VAEOutput(NamedTuple):
    decoded: torch.Tensor  # [B, C, S, S]: logits (bernoulli) or means (gaussian)
    mu: torch.Tensor  # [B, z_dim]
    logvar: torch.Tensor  # [B, z_dim], clamped


class VAE(nn.Module):
    """x [B, C, S, S] in [-1, 1] (and labels [B] when conditional) -> VAEOutput, via one reparameterised z."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        w, base = cfg.width, cfg.image_size // 4
        self.base = base
        features = 2 * w * base * base
        label_dim = cfg.hidden // 4 if cfg.num_classes else 0
        self.enc_embed = nn.Embedding(cfg.num_classes, label_dim) if cfg.num_classes else None
        self.dec_embed = nn.Embedding(cfg.num_classes, label_dim) if cfg.num_classes else None
        self.encoder = nn.Sequential(
            nn.Conv2d(cfg.channels, w, 4, 2, 1), nn.SiLU(),  # S -> S/2
            nn.Conv2d(w, w, 3, 1, 1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.SiLU(),  # S/2 -> S/4
            nn.Flatten(),
        )
        self.enc_fc = nn.Sequential(nn.Linear(features + label_dim, cfg.hidden), nn.SiLU(),
                                    nn.Linear(cfg.hidden, 2 * cfg.z_dim))
        self.dec_fc = nn.Sequential(nn.Linear(cfg.z_dim + label_dim, cfg.hidden), nn.SiLU(),
                                    nn.Linear(cfg.hidden, features), nn.SiLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.SiLU(),  # S/4 -> S/2
            nn.Conv2d(w, w, 3, 1, 1), nn.SiLU(),
            nn.ConvTranspose2d(w, w, 4, 2, 1), nn.SiLU(),  # S/2 -> S
            nn.Conv2d(w, cfg.channels, 3, 1, 1),
        )

    def _labels(self, labels: torch.Tensor | None) -> None:
        if self.enc_embed is not None and labels is None:
            raise ValueError("labels are required: the VAE is class-conditional")
        if self.enc_embed is None and labels is not None:
            raise ValueError("labels given to an unconditional VAE")

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior q(z | x, y): (mu, clamped log-variance), each [B, z_dim]."""
        self._labels(labels)
        cfg = self.config
        if tuple(x.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected images [B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}], "
                             f"got {list(x.shape)}")
        h = self.encoder(x)
        if self.enc_embed is not None:
            h = torch.cat([h, self.enc_embed(labels).to(h.dtype)], dim=1)
        mu, logvar = self.enc_fc(h).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, z_dim] -> logits (bernoulli) or means (gaussian) [B, C, S, S]."""
        self._labels(labels)
        if self.dec_embed is not None:
            z = torch.cat([z, self.dec_embed(labels).to(z.dtype)], dim=1)
        h = self.dec_fc(z).view(z.size(0), -1, self.base, self.base)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> VAEOutput:
        mu, logvar = self.encode(x, labels)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * torch.exp(0.5 * logvar)
        return VAEOutput(self.decode(z, labels), mu, logvar)

    def to_images(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoder output -> the likelihood's mean as images in [-1, 1]."""
        if self.config.likelihood == "bernoulli":
            return torch.sigmoid(decoded.float()) * 2 - 1
        return decoded.float().clamp(-1, 1)

    def default_labels(self, n: int, device) -> torch.Tensor | None:
        """Labels 0, 1, ..., num_classes - 1, 0, 1, ... (a grid with one class per column); None unconditional."""
        if not self.config.num_classes:
            return None
        return torch.arange(n, device=device) % self.config.num_classes

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n images [n, C, S, S] in [-1, 1] decoded from z ~ N(0, I) (the decoder's mean, no pixel noise).
        Conditional: `labels` [n], by default default_labels(n)."""
        p = next(self.parameters())
        if labels is None:
            labels = self.default_labels(n, p.device)
        z = torch.randn((n, self.config.z_dim), generator=generator, device=p.device, dtype=p.dtype)
        return self.to_images(self.decode(z, labels))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images decoded from the posterior mean of x (deterministic), [B, C, S, S] in [-1, 1]."""
        mu, _ = self.encode(x, labels)
        return self.to_images(self.decode(mu, labels))


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample [B], summed over latent dimensions (nats)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def reconstruction_nll(decoded: torch.Tensor, x: torch.Tensor, likelihood: str = "bernoulli",
                       sigma: float = 0.1) -> torch.Tensor:
    """-log p(x | z) per sample [B], summed over pixels (nats); x in [-1, 1]."""
    decoded, x = decoded.float(), x.float()
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(decoded, (x + 1) / 2, reduction="none")
    elif likelihood == "gaussian":
        nll = 0.5 * ((x - decoded) / sigma).pow(2) + math.log(sigma) + 0.5 * math.log(2 * math.pi)
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}: expected one of {', '.join(LIKELIHOODS)}")
    return nll.flatten(1).sum(dim=1)


def vae_loss(out: VAEOutput, x: torch.Tensor, cfg: VAEConfig, beta: float | None = None) -> dict[str, torch.Tensor]:
    """The ELBO terms, each a float32 scalar averaged over the batch (nats per image):
    recon (-log p(x|z)), kl, nelbo (recon + kl: the negative ELBO) and loss (recon + beta * kl, to minimise).
    `beta` overrides cfg.beta (e.g. a KL warm-up schedule)."""
    b = cfg.beta if beta is None else beta
    recon = reconstruction_nll(out.decoded, x, cfg.likelihood, cfg.sigma).mean()
    kl = kl_divergence(out.mu, out.logvar).mean()
    return {"loss": recon + b * kl, "recon": recon, "kl": kl, "nelbo": recon + kl}


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
