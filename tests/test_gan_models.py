"""The GAN models: shapes, conditioning, losses against hand-computed values, the gradient penalty, the EMA,
config validation, spectral norm and a short training smoke test."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from genai.models.gan import (
    EMA, LOSSES, Discriminator, GANConfig, Generator, d_loss, g_loss, gradient_penalty, init_weights, num_params,
)


def small(**kw) -> GANConfig:
    return GANConfig(**{"z_dim": 16, "ngf": 8, "ndf": 8, **kw})


def models(cfg: GANConfig, seed: int = 0) -> tuple[Generator, Discriminator]:
    torch.manual_seed(seed)
    g, d = Generator(cfg), Discriminator(cfg)
    init_weights(g)
    init_weights(d)
    return g, d


@pytest.mark.parametrize("size,channels,classes", [(28, 1, 0), (32, 3, 0), (28, 1, 10), (32, 3, 5)])
def test_shapes_and_ranges(size, channels, classes):
    g, d = models(small(image_size=size, channels=channels, num_classes=classes))
    z = torch.randn(4, 16)
    labels = torch.arange(4) % classes if classes else None
    x = g(z, labels)
    assert x.shape == (4, channels, size, size)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
    scores = d(x, labels)
    assert scores.shape == (4,) and torch.isfinite(scores).all()


def test_conditioning_changes_images_and_labels_are_checked():
    g, d = models(small(num_classes=10))
    g.eval()  # batch norm on running statistics: each image depends on its own (z, label) only
    z = torch.randn(1, 16).repeat(3, 1)
    x = g(z, torch.tensor([0, 1, 0]))
    assert torch.equal(x[0], x[2]) and not torch.allclose(x[0], x[1])
    with pytest.raises(ValueError, match="labels are required: the generator is class-conditional"):
        g(z)
    with pytest.raises(ValueError, match="labels are required: the discriminator is class-conditional"):
        d(x)
    g_plain, d_plain = models(small())
    with pytest.raises(ValueError, match="unconditional generator"):
        g_plain(z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional discriminator"):
        d_plain(x, torch.zeros(3, dtype=torch.long))


def test_discriminator_scores_are_per_sample():
    _, d = models(small(num_classes=3))
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(d(x, y)[1:2], d(x[1:2], y[1:2]), atol=1e-6)  # no batch norm in D


REAL, FAKE = torch.tensor([1.0, -2.0]), torch.tensor([0.5, -1.0])


def sp(v: float) -> float:  # softplus
    return math.log1p(math.exp(v))


@pytest.mark.parametrize("kind,d_expected,g_expected", [
    ("nonsaturating", (sp(-1.0) + sp(2.0)) / 2 + (sp(0.5) + sp(-1.0)) / 2, (sp(-0.5) + sp(1.0)) / 2),
    ("hinge", (0.0 + 3.0) / 2 + (1.5 + 0.0) / 2, 0.25),
    ("wgan-gp", -0.25 - (-0.5), 0.25),
])
def test_losses_match_hand_computed_values(kind, d_expected, g_expected):
    assert d_loss(REAL, FAKE, kind).item() == pytest.approx(d_expected, rel=1e-6)
    assert g_loss(FAKE, kind).item() == pytest.approx(g_expected, rel=1e-6)


def test_unknown_loss_kind_is_rejected():
    with pytest.raises(ValueError, match="lsgan"):
        d_loss(REAL, FAKE, "lsgan")
    with pytest.raises(ValueError, match="lsgan"):
        g_loss(FAKE, "lsgan")


class LinearCritic(nn.Module):
    """D(x) = (w * x).sum() per sample: its input gradient is w everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x, labels=None):
        return (self.w * x).flatten(1).sum(1)


def test_gradient_penalty_on_a_linear_critic_and_its_backward():
    torch.manual_seed(0)
    critic = LinearCritic(torch.randn(1, 2, 4, 4) * 0.5)
    real, fake = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4, requires_grad=True)
    gp = gradient_penalty(critic, real, fake)
    norm = critic.w.detach().norm()
    assert gp.item() == pytest.approx(((norm - 1) ** 2).item(), rel=1e-5)
    gp.backward()  # create_graph: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    assert torch.allclose(critic.w.grad, 2 * (norm - 1) * critic.w.detach() / norm, atol=1e-5)
    assert fake.grad is None  # the penalty does not reach the generator


def test_gradient_penalty_draws_from_the_given_generator():
    critic = LinearCritic(torch.ones(1, 1, 2, 2))
    square = lambda x, labels=None: critic(x * x)  # input gradient 2wx: depends on the interpolation point
    real, fake = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2)
    state = torch.get_rng_state()
    a = gradient_penalty(square, real, fake, generator=torch.Generator().manual_seed(1))
    b = gradient_penalty(square, real, fake, generator=torch.Generator().manual_seed(1))
    c = gradient_penalty(square, real, fake, generator=torch.Generator().manual_seed(2))
    assert a.item() == b.item() != c.item()
    assert torch.equal(state, torch.get_rng_state())


def test_gradient_penalty_reaches_a_conditional_discriminators_parameters():
    g, d = models(small(num_classes=4))
    y = torch.arange(6) % 4
    gp = gradient_penalty(d, torch.rand(6, 1, 28, 28) * 2 - 1, g(torch.randn(6, 16), y), y)
    gp.backward()
    for name in ("net.0.weight", "net.2.weight", "fc.weight", "embed.weight"):
        grad = d.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_ema_update_buffers_and_state_round_trip():
    cfg = small()
    g, _ = models(cfg)
    ema = EMA(g, decay=0.9)
    assert ema.module is not g and not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    old = {k: v.clone() for k, v in ema.module.state_dict().items()}

    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p))
    g.train()(torch.randn(8, 16))  # moves the batch-norm running statistics
    ema.update(g)
    for name, p in g.named_parameters():
        assert torch.allclose(ema.module.get_parameter(name), 0.9 * old[name] + 0.1 * p, atol=1e-6), name
    for name, b in g.named_buffers():
        assert torch.equal(ema.module.get_buffer(name), b), name
    assert not torch.equal(ema.module.get_buffer("net.0.running_mean"), old["net.0.running_mean"])

    ema.update(copy.deepcopy(g).bfloat16(), decay=0.0)  # a live module in another dtype, decay overridden
    assert ema.module.fc.weight.dtype == torch.float32
    assert torch.allclose(ema.module.fc.weight, g.fc.weight, atol=1e-2)

    other = EMA(Generator(cfg), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9
    for k, v in ema.module.state_dict().items():
        assert torch.equal(other.module.state_dict()[k], v), k


@pytest.mark.parametrize("kw,field", [
    ({"image_size": 30}, "image_size"), ({"loss": "foo"}, "loss"), ({"z_dim": 0}, "z_dim"), ({"ndf": 0}, "ndf"),
    ({"num_classes": -1}, "num_classes"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        GANConfig(**kw)


def test_config_round_trips_through_a_dict():
    cfg = GANConfig(image_size=32, channels=3, num_classes=10, loss="hinge", spectral_norm=True)
    assert GANConfig(**cfg.to_dict()) == cfg
    assert set(LOSSES) == {"nonsaturating", "hinge", "wgan-gp"}


def test_init_weights_and_num_params():
    g, d = models(GANConfig())
    assert num_params(g) == sum(p.numel() for p in g.parameters())
    assert g.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert d.net[2].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert g.net[0].weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert d.fc.bias.item() == 0 and torch.count_nonzero(g.net[-2].bias) == 0


def test_spectral_norm_builds_runs_and_normalises():
    cfg = small(image_size=32, channels=3, num_classes=4, spectral_norm=True, loss="hinge")
    g, d = models(cfg)
    original = d.net[2].parametrizations.weight.original
    assert original.std().item() == pytest.approx(0.02, rel=0.1)  # init_weights reached the trainable weight
    x, y = g(torch.randn(4, 16), torch.arange(4)), torch.arange(4)
    for _ in range(30):  # each training-mode forward runs one power iteration
        scores = d(x, y)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    with torch.no_grad():
        for layer in (d.net[0], d.net[2], d.fc):
            sigma = torch.linalg.matrix_norm(layer.weight.flatten(1), 2).item()
            assert sigma == pytest.approx(1.0, abs=0.05)
    d_loss(d(x, y), d(x.detach(), y), "hinge").backward()
    assert original.grad is not None


@pytest.mark.parametrize("kind,classes", [("nonsaturating", 0), ("hinge", 0), ("wgan-gp", 3)])
def test_short_training_reduces_the_discriminator_loss(kind, classes):
    cfg = small(ndf=16, num_classes=classes, loss=kind)
    g, d = models(cfg, seed=1)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    torch.manual_seed(2)
    real = (torch.rand(16, 1, 28, 28) > 0.7).float() * 2 - 1  # one fixed batch of binary "images"
    y = torch.arange(16) % classes if classes else None
    losses = []
    for _ in range(30):
        fake = g(torch.randn(16, 16), y)
        loss = d_loss(d(real, y), d(fake.detach(), y), kind)
        losses.append(loss.item())
        if kind == "wgan-gp":
            loss = loss + 10 * gradient_penalty(d, real, fake, y)
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
        lg = g_loss(d(g(torch.randn(16, 16), y), y), kind)
        opt_g.zero_grad()
        lg.backward()
        opt_g.step()
        assert math.isfinite(loss.item()) and math.isfinite(lg.item())
    assert sum(losses[-5:]) / 5 < losses[0]
