"""The VAE: shapes at every image size, conditioning, the ELBO terms against hand-computed values, the log-variance
clamp, sampling and reconstruction, determinism under a seed, config validation and a short training run on the
builtin 8x8 digits in which the reconstruction term falls."""

import math

import numpy as np
import pytest
import torch

from genai.models.vae import (
    LIKELIHOODS,
    LOGVAR_MAX,
    LOGVAR_MIN,
    VAE,
    VAEConfig,
    VAEOutput,
    kl_divergence,
    num_params,
    reconstruction_nll,
    vae_loss,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small(**kw) -> VAEConfig:
    return VAEConfig(**{"z_dim": 4, "width": 8, "hidden": 32, **kw})


def model(cfg: VAEConfig, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(cfg)


@pytest.mark.parametrize("size,channels,classes,likelihood", [
    (8, 1, 0, "bernoulli"), (28, 1, 0, "bernoulli"), (28, 1, 10, "gaussian"), (32, 3, 0, "gaussian"),
    (32, 3, 5, "bernoulli"),
])
def test_shapes_and_ranges_at_every_size(size, channels, classes, likelihood):
    m = model(small(image_size=size, channels=channels, num_classes=classes, likelihood=likelihood))
    x = torch.rand(4, channels, size, size) * 2 - 1
    y = torch.arange(4) % classes if classes else None
    out = m(x, y)
    assert isinstance(out, VAEOutput)
    assert out.decoded.shape == x.shape and out.mu.shape == out.logvar.shape == (4, 4)
    terms = vae_loss(out, x, m.config)
    assert set(terms) == {"loss", "recon", "kl", "nelbo"}
    assert all(t.dim() == 0 and t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
    for images in (m.sample(5), m.reconstruct(x, y)):
        assert images.shape[1:] == x.shape[1:] and images.min() >= -1 and images.max() <= 1
    assert m.sample(5).shape[0] == 5


def test_kl_is_zero_at_the_prior_and_matches_the_closed_form():
    zeros = torch.zeros(3, 6)
    assert torch.equal(kl_divergence(zeros, zeros), torch.zeros(3))
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    # 0.5 (mu^2 + var - 1 - log var) per dimension: 0.5 + 0.5 (2 - 1 - log 2)
    assert kl_divergence(mu, logvar).item() == pytest.approx(0.5 + 0.5 * (1 - math.log(2.0)), rel=1e-6)
    assert (kl_divergence(torch.randn(50, 4), torch.randn(50, 4)) >= 0).all()


def test_reconstruction_terms_match_hand_computed_values():
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    # Bernoulli with logits 0: p = 1/2 for every pixel, whatever the target: log 2 nats per pixel.
    assert torch.allclose(reconstruction_nll(torch.zeros_like(x), x, "bernoulli"), torch.full((2,), 16 * math.log(2)))
    # Gaussian at its mean: log sigma + log(2 pi) / 2 per pixel.
    expected = 16 * (math.log(0.1) + 0.5 * math.log(2 * math.pi))
    assert torch.allclose(reconstruction_nll(x, x, "gaussian", 0.1), torch.full((2,), expected), atol=1e-4)
    one_off = reconstruction_nll(x + 0.1, x, "gaussian", 0.1) - reconstruction_nll(x, x, "gaussian", 0.1)
    assert torch.allclose(one_off, torch.full((2,), 16 * 0.5), atol=1e-4)  # half a squared sigma per pixel
    with pytest.raises(ValueError, match="laplace"):
        reconstruction_nll(x, x, "laplace")


def test_loss_is_recon_plus_beta_kl_and_the_elbo_ignores_beta():
    m = model(small(beta=4.0))
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    out = m(x, generator=torch.Generator().manual_seed(0))
    terms = vae_loss(out, x, m.config)
    assert terms["loss"].item() == pytest.approx((terms["recon"] + 4.0 * terms["kl"]).item(), rel=1e-6)
    assert terms["nelbo"].item() == pytest.approx((terms["recon"] + terms["kl"]).item(), rel=1e-6)
    warm = vae_loss(out, x, m.config, beta=0.0)
    assert warm["loss"].item() == pytest.approx(terms["recon"].item(), rel=1e-6)
    assert warm["nelbo"].item() == pytest.approx(terms["nelbo"].item(), rel=1e-6)


def test_log_variance_is_clamped_so_extreme_encoders_stay_finite():
    m = model(small())
    last = m.enc_fc[-1]
    with torch.no_grad():
        last.bias[4:] = 1e4  # log-variance outputs far past the clamp
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    mu, logvar = m.encode(x)
    assert torch.all(logvar == LOGVAR_MAX)
    with torch.no_grad():
        last.bias[4:] = -1e4
    _, logvar = m.encode(x)
    assert torch.all(logvar == LOGVAR_MIN)
    terms = vae_loss(m(x), x, m.config)
    assert all(torch.isfinite(t) for t in terms.values())
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_conditioning_changes_the_decoding_and_labels_are_checked():
    m = model(small(num_classes=10))
    z = torch.randn(1, 4).repeat(3, 1)
    d = m.decode(z, torch.tensor([0, 1, 0]))
    assert torch.equal(d[0], d[2]) and not torch.allclose(d[0], d[1])
    assert torch.equal(m.default_labels(12, "cpu"), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]))
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with pytest.raises(ValueError, match="labels are required: the VAE is class-conditional"):
        m(x)
    plain = model(small())
    assert plain.default_labels(4, "cpu") is None
    with pytest.raises(ValueError, match="labels given to an unconditional VAE"):
        plain(x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected images \[B, 1, 28, 28\]"):
        plain(torch.zeros(2, 3, 28, 28))


def test_reconstruct_is_deterministic_and_sample_follows_its_generator():
    m = model(small())
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.equal(m.reconstruct(x), m.reconstruct(x))
    a = m.sample(3, generator=torch.Generator().manual_seed(1))
    b = m.sample(3, generator=torch.Generator().manual_seed(1))
    c = m.sample(3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.is_grad_enabled() or not a.requires_grad


def test_same_seed_same_model_and_same_forward():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    outs = [model(small(image_size=8), seed=3)(x, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(outs[0], outs[1]))
    other = model(small(image_size=8), seed=4)(x, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(outs[0].decoded, other.decoded)


@pytest.mark.parametrize("kw,field", [
    ({"image_size": 30}, "image_size"), ({"z_dim": 0}, "z_dim"), ({"width": 0}, "width"),
    ({"num_classes": -1}, "num_classes"), ({"beta": -1.0}, "beta"), ({"likelihood": "laplace"}, "likelihood"),
    ({"sigma": 0.0}, "sigma"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        VAEConfig(**kw)


def test_config_round_trips_through_a_dict():
    cfg = VAEConfig(image_size=32, channels=3, num_classes=10, beta=0.5, likelihood="gaussian", sigma=0.2)
    assert VAEConfig(**cfg.to_dict()) == cfg
    assert set(LIKELIHOODS) == {"bernoulli", "gaussian"}
    assert num_params(VAE(cfg)) == sum(p.numel() for p in VAE(cfg).parameters())


def builtin_digits_8x8() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)  # 0..16 -> [-1, 1]
    return x, torch.from_numpy(d.target.astype(np.int64))


@pytest.mark.parametrize("classes", [0, 10])
def test_a_few_hundred_steps_on_the_builtin_digits_lower_the_reconstruction_term(classes):
    x, y = builtin_digits_8x8()
    m = model(VAEConfig(image_size=8, z_dim=8, width=16, hidden=64, num_classes=classes), seed=0)
    labels = y[:200] if classes else None
    err0 = (m.reconstruct(x[:200], labels) - x[:200]).abs().mean().item()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    recon, nelbo = [], []
    for _ in range(200):
        idx = torch.randint(len(x), (64,), generator=gen)
        terms = vae_loss(m(x[idx], y[idx] if classes else None, generator=gen), x[idx], m.config)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        recon.append(terms["recon"].item())
        nelbo.append(terms["nelbo"].item())
    assert np.mean(recon[-20:]) < 0.8 * np.mean(recon[:5])
    assert np.mean(nelbo[-20:]) < np.mean(nelbo[:5])
    err = (m.reconstruct(x[:200], labels) - x[:200]).abs().mean().item()
    assert err < 0.6 * err0, (err0, err)  # reconstructions have moved towards their inputs
