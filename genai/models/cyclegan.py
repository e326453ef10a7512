"""CycleGAN (Zhu et al. 2017) for small images: ResNet-style generators, PatchGAN discriminators, the LSGAN,
cycle-consistency and identity losses, and the history pool of generated images. Pure torch.

Images are float tensors in [-1, 1]; domain A has `channels_a` channels, domain B `channels_b`. As in the paper's
code, one optimiser covers both generators and one both discriminators: CycleGenerators and
CycleDiscriminators hold each pair as one module (one engine each), while Generator / PatchDiscriminator stay
usable alone (one engine per network).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CycleGANConfig:
    image_size: int = 28  # a multiple of 4: the generators downsample twice
    channels_a: int = 1
    channels_b: int = 1
    ngf: int = 32  # generator width (x2, x4 after each downsampling)
    ndf: int = 32  # discriminator width
    blocks: int = 6  # residual blocks in each generator (the paper: 6 at 128x128, 9 at 256x256)
    d_layers: int = 2  # strided convolutions of the PatchGAN (3: the paper's 70x70 PatchGAN)
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # a fraction of lambda_cycle, as in the paper's code; 0: no identity loss
    pool_size: int = 50  # generated images each discriminator's history pool holds; 0: no pool

    def __post_init__(self) -> None:
        if self.image_size < 4 or self.image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4, got {self.image_size}")
        for name in ("channels_a", "channels_b", "ngf", "ndf", "d_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {self.blocks}")
        if self.image_size >> self.d_layers < 3:
            raise ValueError(f"d_layers {self.d_layers} halves {self.image_size}x{self.image_size} images below "
                             f"3x3 (at most {max(1, (self.image_size // 3).bit_length() - 1)} for this size)")
        if self.lambda_cycle < 0 or self.lambda_identity < 0:
            raise ValueError("lambda_cycle and lambda_identity must be >= 0")
        if self.lambda_identity and self.channels_a != self.channels_b:
            raise ValueError(f"lambda_identity must be 0 when the domains' channels differ "
                             f"({self.channels_a} vs {self.channels_b}): G_AB(b) cannot take a B image")
        if self.pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {self.pool_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    """x + IN(conv(ReLU(IN(conv(x))))), 3x3 convolutions with reflection padding."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), _norm(c), nn.ReLU(True),
                                  nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), _norm(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """The paper's ResNet generator: c7s1-ngf, two stride-2 downsamplings, `blocks` residual blocks, two
    stride-2 transposed convolutions, c7s1 to the output channels and tanh. [B, c_in, S, S] -> [B, c_out, S, S]."""

    def __init__(self, c_in: int, c_out: int, ngf: int = 32, blocks: int = 6):
        super().__init__()
        self.c_in = c_in
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(c_in, ngf, 7), _norm(ngf), nn.ReLU(True)]
        for mult in (1, 2):  # S -> S/2 -> S/4
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, 2, 1), _norm(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4) for _ in range(blocks)]
        for mult in (4, 2):  # S/4 -> S/2 -> S
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, 2, 1, output_padding=1),
                       _norm(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, c_out, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.c_in or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"expected images [B, {self.c_in}, H, W] with H and W multiples of 4, "
                             f"got {list(x.shape)}")
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: one realism score per overlapping patch, [B, C, S, S] -> [B, 1, h, w] (LSGAN targets 1 / 0).
    c4s2-ndf (no norm), then `layers - 1` more stride-2 and one stride-1 4x4 conv with instance norm, widths
    doubling up to 8 ndf, and a stride-1 4x4 conv to one channel."""

    def __init__(self, channels: int, ndf: int = 32, layers: int = 2):
        super().__init__()
        seq = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for i in range(1, layers + 1):
            c_next = ndf * min(2 ** i, 8)
            seq += [nn.Conv2d(c, c_next, 4, 2 if i < layers else 1, 1), _norm(c_next), nn.LeakyReLU(0.2, True)]
            c = c_next
        seq += [nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CycleOutputs(NamedTuple):
    fake_b: torch.Tensor  # G_AB(a)
    rec_a: torch.Tensor  # G_BA(G_AB(a))
    fake_a: torch.Tensor  # G_BA(b)
    rec_b: torch.Tensor  # G_AB(G_BA(b))
    idt_a: torch.Tensor | None  # G_BA(a): should be a (None without the identity loss)
    idt_b: torch.Tensor | None  # G_AB(b): should be b


class CycleGenerators(nn.Module):
    """Both generators: ab (A -> B) and ba (B -> A); forward runs the full cycle of both domains."""

    def __init__(self, cfg: CycleGANConfig):
        super().__init__()
        self.config = cfg
        self.ab = Generator(cfg.channels_a, cfg.channels_b, cfg.ngf, cfg.blocks)
        self.ba = Generator(cfg.channels_b, cfg.channels_a, cfg.ngf, cfg.blocks)

    def forward(self, real_a: torch.Tensor, real_b: torch.Tensor) -> CycleOutputs:
        fake_b, fake_a = self.ab(real_a), self.ba(real_b)
        identity = self.config.lambda_identity > 0
        return CycleOutputs(fake_b, self.ba(fake_b), fake_a, self.ab(fake_a),
                            self.ba(real_a) if identity else None, self.ab(real_b) if identity else None)

    @torch.no_grad()
    def translate(self, x: torch.Tensor, direction: str = "a2b") -> torch.Tensor:
        """Inference: images of one domain translated into the other ("a2b" or "b2a")."""
        if direction not in ("a2b", "b2a"):
            raise ValueError(f"direction must be a2b or b2a, got {direction!r}")
        return (self.ab if direction == "a2b" else self.ba)(x)


class CycleDiscriminators(nn.Module):
    """Both discriminators: a judges A images, b judges B images."""

    def __init__(self, cfg: CycleGANConfig):
        super().__init__()
        self.config = cfg
        self.a = PatchDiscriminator(cfg.channels_a, cfg.ndf, cfg.d_layers)
        self.b = PatchDiscriminator(cfg.channels_b, cfg.ndf, cfg.d_layers)

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x_a), self.b(x_b)


@torch.no_grad()
def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """The paper's init: conv weights N(0, std), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def lsgan_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[(D(real) - 1)^2] + E[D(fake)^2]): halved as in the paper, slowing D relative to G."""
    real_scores, fake_scores = real_scores.float(), fake_scores.float()
    return 0.5 * ((real_scores - 1).pow(2).mean() + fake_scores.pow(2).mean())


def lsgan_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """E[(D(G(x)) - 1)^2]."""
    return (fake_scores.float() - 1).pow(2).mean()


def cycle_loss(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of F(G(x)) against x."""
    return F.l1_loss(reconstructed.float(), original.float())


def identity_loss(mapped: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of G(y) against y for y already in G's target domain."""
    return F.l1_loss(mapped.float(), original.float())


def generator_loss_terms(out: CycleOutputs, real_a: torch.Tensor, real_b: torch.Tensor,
                         d_a_fake: torch.Tensor, d_b_fake: torch.Tensor,
                         cfg: CycleGANConfig) -> dict[str, torch.Tensor]:
    """The generators' terms (float32 scalars): adv_ab, adv_ba (LSGAN, from D_B(fake_b) and D_A(fake_a)),
    cycle_a, cycle_b, identity_a, identity_b, and
    loss = adv_ab + adv_ba + lambda_cycle * (cycle_a + cycle_b) + lambda_cycle * lambda_identity * (identity_a +
    identity_b)."""
    zero = torch.zeros((), device=real_a.device)
    terms = {"adv_ab": lsgan_g_loss(d_b_fake), "adv_ba": lsgan_g_loss(d_a_fake),
             "cycle_a": cycle_loss(out.rec_a, real_a), "cycle_b": cycle_loss(out.rec_b, real_b),
             "identity_a": identity_loss(out.idt_a, real_a) if out.idt_a is not None else zero,
             "identity_b": identity_loss(out.idt_b, real_b) if out.idt_b is not None else zero}
    lam_c, lam_i = cfg.lambda_cycle, cfg.lambda_cycle * cfg.lambda_identity
    terms["loss"] = (terms["adv_ab"] + terms["adv_ba"] + lam_c * (terms["cycle_a"] + terms["cycle_b"])
                     + lam_i * (terms["identity_a"] + terms["identity_b"]))
    return terms


def discriminator_loss_terms(d_a_real: torch.Tensor, d_a_fake: torch.Tensor, d_b_real: torch.Tensor,
                             d_b_fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """The discriminators' LSGAN terms d_a, d_b and their sum `loss`; the fakes should come from ImagePool."""
    terms = {"d_a": lsgan_d_loss(d_a_real, d_a_fake), "d_b": lsgan_d_loss(d_b_real, d_b_fake)}
    terms["loss"] = terms["d_a"] + terms["d_b"]
    return terms


class ImagePool:
    """The history of generated images a discriminator trains on (Shrivastava et al. 2017, used by CycleGAN).

    query(images): while fewer than `size` are stored, each image is stored and returned; then each is, with
    probability 1/2, swapped for a random stored image (which is returned in its place), else returned as is.
    Draws come from the pool's own seeded generator; state_dict() holds the images and that generator's state,
    so a resumed run continues the same sequence."""

    def __init__(self, size: int = 50, seed: int = 0):
        if size < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        self.size = size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach()
        if self.size == 0:
            return images
        out = []
        for im in images:
            if len(self.images) < self.size:
                self.images.append(im.clone())
                out.append(im)
            elif torch.rand((), generator=self.generator).item() < 0.5:
                i = int(torch.randint(self.size, (), generator=self.generator))
                out.append(self.images[i].to(device=im.device, dtype=im.dtype))
                self.images[i] = im.clone()
            else:
                out.append(im)
        return torch.stack(out)

    def state_dict(self) -> dict:
        stored = torch.stack([im.cpu() for im in self.images]) if self.images else torch.zeros(0)
        return {"size": self.size, "images": stored, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        self.images = [im.clone() for im in state["images"]] if len(state["images"]) else []
        self.generator.set_state(state["generator"])


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
