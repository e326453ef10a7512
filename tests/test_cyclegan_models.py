"""CycleGAN: generator and PatchGAN shapes at every size, the LSGAN / cycle / identity losses against hand-computed
values, the history pool (its rule, its seed, its resume), the builtin unpaired digit domains, determinism under a
seed, and a short training run in which the cycle loss falls."""

import numpy as np
import pytest
import torch

from genai.data.digit_domains import STYLES, builtin_digit_domains, stylize, unpaired_domains
from genai.models.cyclegan import (
    CycleDiscriminators,
    CycleGANConfig,
    CycleGenerators,
    CycleOutputs,
    Generator,
    ImagePool,
    PatchDiscriminator,
    cycle_loss,
    discriminator_loss_terms,
    generator_loss_terms,
    identity_loss,
    init_weights,
    lsgan_d_loss,
    lsgan_g_loss,
    num_params,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**kw) -> CycleGANConfig:
    return CycleGANConfig(**{"ngf": 4, "ndf": 4, "blocks": 1, **kw})


def nets(cfg: CycleGANConfig, seed: int = 0) -> tuple[CycleGenerators, CycleDiscriminators]:
    torch.manual_seed(seed)
    g, d = CycleGenerators(cfg), CycleDiscriminators(cfg)
    init_weights(g)
    init_weights(d)
    return g, d


@pytest.mark.parametrize("size,ca,cb,d_layers,patches", [
    (8, 1, 1, 1, 2), (28, 1, 1, 2, 5), (28, 1, 3, 3, 1), (32, 3, 3, 2, 6), (32, 3, 1, 3, 2),
])
def test_shapes_at_every_size_and_channel_pairing(size, ca, cb, d_layers, patches):
    cfg = tiny(image_size=size, channels_a=ca, channels_b=cb, d_layers=d_layers,
               lambda_identity=0.5 if ca == cb else 0.0)
    g, d = nets(cfg)
    a, b = torch.rand(3, ca, size, size) * 2 - 1, torch.rand(3, cb, size, size) * 2 - 1
    out = g(a, b)
    assert out.fake_b.shape == b.shape and out.rec_a.shape == a.shape
    assert out.fake_a.shape == a.shape and out.rec_b.shape == b.shape
    assert (out.idt_a is None) == (ca != cb) == (out.idt_b is None)
    assert out.fake_b.min() >= -1 and out.fake_b.max() <= 1  # tanh
    sa, sb = d(a, b)
    assert sa.shape == sb.shape == (3, 1, patches, patches)
    assert g.translate(a, "a2b").shape == b.shape and g.translate(b, "b2a").shape == a.shape


def test_wrong_inputs_are_one_line_errors():
    g, _ = nets(tiny())
    with pytest.raises(ValueError, match=r"expected images \[B, 1, H, W\] with H and W multiples of 4"):
        g.ab(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="multiples of 4"):
        g.ab(torch.zeros(1, 1, 30, 30))
    with pytest.raises(ValueError, match="direction must be a2b or b2a"):
        g.translate(torch.zeros(1, 1, 28, 28), "ab")


@pytest.mark.parametrize("kw,match", [
    ({"image_size": 30}, "image_size"), ({"ngf": 0}, "ngf"), ({"blocks": -1}, "blocks"),
    ({"d_layers": 4}, "at most 3 for this size"), ({"channels_b": 3}, "lambda_identity must be 0"),
    ({"lambda_cycle": -1.0}, "lambda_cycle"), ({"pool_size": -1}, "pool_size"),
])
def test_config_validation_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        CycleGANConfig(**kw)


def test_config_round_trips_and_sizes():
    cfg = CycleGANConfig(image_size=32, channels_a=1, channels_b=3, lambda_identity=0.0, pool_size=10)
    assert CycleGANConfig(**cfg.to_dict()) == cfg
    g, d = nets(CycleGANConfig())
    assert num_params(g) == 2 * num_params(g.ab) and num_params(d) == 2 * num_params(d.a)
    assert isinstance(g.ab, Generator) and isinstance(d.b, PatchDiscriminator)
    assert g.ab.net[1].weight.std().item() == pytest.approx(0.02, rel=0.1)  # the paper's N(0, 0.02) init


def test_discriminator_scores_are_per_image():
    _, d = nets(tiny())
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(d.a(x)[1:2], d.a(x[1:2]), atol=1e-6)  # instance norm: no batch statistics


def test_lsgan_cycle_and_identity_losses_match_hand_computed_values():
    real, fake = torch.tensor([1.0, 0.0]), torch.tensor([0.5, -1.0])
    assert lsgan_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 1) / 2 + (0.25 + 1) / 2))
    assert lsgan_g_loss(fake).item() == pytest.approx((0.25 + 4) / 2)
    assert lsgan_d_loss(torch.ones(3), torch.zeros(3)).item() == 0.0 and lsgan_g_loss(torch.ones(3)).item() == 0.0
    x, y = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    assert cycle_loss(x, y).item() == pytest.approx(0.5) and identity_loss(y, y).item() == 0.0


@pytest.mark.parametrize("identity", [0.5, 0.0])
def test_generator_terms_are_weighted_as_in_the_paper(identity):
    cfg = tiny(lambda_cycle=10.0, lambda_identity=identity)
    g, d = nets(cfg)
    a, b = torch.rand(2, 1, 28, 28) * 2 - 1, torch.rand(2, 1, 28, 28) * 2 - 1
    out = g(a, b)
    terms = generator_loss_terms(out, a, b, d.a(out.fake_a), d.b(out.fake_b), cfg)
    assert set(terms) == {"loss", "adv_ab", "adv_ba", "cycle_a", "cycle_b", "identity_a", "identity_b"}
    expected = (terms["adv_ab"] + terms["adv_ba"] + 10 * (terms["cycle_a"] + terms["cycle_b"])
                + 10 * identity * (terms["identity_a"] + terms["identity_b"]))
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["cycle_a"].item() == pytest.approx(cycle_loss(g.ba(g.ab(a)), a).item(), rel=1e-6)
    if identity:
        assert terms["identity_b"].item() == pytest.approx(identity_loss(g.ab(b), b).item(), rel=1e-6)
    else:
        assert terms["identity_a"].item() == terms["identity_b"].item() == 0.0
    dt = discriminator_loss_terms(d.a(a), d.a(out.fake_a.detach()), d.b(b), d.b(out.fake_b.detach()))
    assert dt["loss"].item() == pytest.approx((dt["d_a"] + dt["d_b"]).item(), rel=1e-6)


def test_the_pool_fills_then_swaps_half_of_the_images_for_older_ones():
    pool = ImagePool(size=4, seed=0)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first) and len(pool) == 4  # while filling: stored and returned
    seen_old, seen_new = 0, 0
    for step in range(1, 40):
        batch = torch.full((4, 1, 1, 1), 100.0 + step)
        out = pool.query(batch)
        assert out.shape == batch.shape and len(pool) == 4
        for v in out.flatten().tolist():
            if v == 100.0 + step:
                seen_new += 1
            else:
                assert v < 100.0 + step  # an earlier image, never a later one
                seen_old += 1
    assert 0.35 < seen_old / (seen_old + seen_new) < 0.65
    assert not pool.query(torch.zeros(2, 1, 1, 1, requires_grad=True)).requires_grad
    passthrough = ImagePool(size=0)
    x = torch.randn(3, 1, 2, 2)
    assert torch.equal(passthrough.query(x), x) and len(passthrough) == 0


def test_the_pool_is_deterministic_under_its_seed_and_resumes_exactly():
    def run(pool, steps, start=0):
        return [pool.query(torch.full((3, 1, 2, 2), float(start + s))) for s in range(steps)]

    a, b, c = ImagePool(5, seed=1), ImagePool(5, seed=1), ImagePool(5, seed=2)
    ra, rb, rc = run(a, 10), run(b, 10), run(c, 10)
    assert all(torch.equal(x, y) for x, y in zip(ra, rb))
    assert not all(torch.equal(x, y) for x, y in zip(ra, rc))
    whole = run(ImagePool(5, seed=3), 12)
    first = ImagePool(5, seed=3)
    run(first, 6)
    resumed = ImagePool(5, seed=99)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(whole[6:], run(resumed, 6, start=6)))
    empty = ImagePool(5)
    empty.load_state_dict(ImagePool(5).state_dict())
    assert len(empty) == 0


# --- the builtin unpaired domains ----------------------------------------------------------------------------------

def test_styles_keep_shape_and_change_the_strokes():
    digits = builtin_digit_domains("val").a_images
    bold, thin, inverted = (stylize(digits, s) for s in ("bold", "thin", "invert"))
    for x in (bold, thin, inverted):
        assert x.shape == digits.shape and x.dtype == np.uint8
    assert (bold >= digits).all() and bold.mean() > digits.mean() * 1.3  # dilation only adds ink
    assert (thin <= digits).all() and thin.mean() < digits.mean()
    assert np.array_equal(stylize(inverted, "invert"), digits)
    assert set(STYLES) == {"bold", "thin", "invert"}
    with pytest.raises(ValueError, match="unknown style 'italic'"):
        stylize(digits, "italic")
    with pytest.raises(ValueError, match="uint8 images"):
        stylize(digits.astype(np.float32), "bold")


def test_domains_are_disjoint_halves_deterministic_under_a_seed():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * 20
    labels = np.arange(10)
    d = unpaired_domains(images, labels, style="invert", seed=0)
    assert len(d.a_labels) == len(d.b_labels) == 5 and not set(d.a_labels) & set(d.b_labels)
    assert np.array_equal(d.b_images, 255 - images[d.b_labels])  # B: the other half, stylised
    assert np.array_equal(d.a_images, images[d.a_labels])
    again, other = unpaired_domains(images, labels, "invert", 0), unpaired_domains(images, labels, "invert", 1)
    assert np.array_equal(again.a_labels, d.a_labels) and not np.array_equal(other.a_labels, d.a_labels)
    with pytest.raises(ValueError, match="at least two images"):
        unpaired_domains(images[:1], labels[:1])


def test_the_builtin_digit_domains_need_no_download():
    train, val = builtin_digit_domains("train"), builtin_digit_domains("val")
    assert train.a_images.shape[1:] == train.b_images.shape[1:] == (1, 28, 28)
    assert len(train.a_images) + len(train.b_images) + len(val.a_images) + len(val.b_images) == 1797
    assert set(np.unique(train.a_labels)) == set(range(10)) == set(np.unique(train.b_labels))
    assert train.style == "bold" and train.b_images.mean() > train.a_images.mean()
    with pytest.raises(ValueError, match="split must be train or val"):
        builtin_digit_domains("test")


# --- training ------------------------------------------------------------------------------------------------------

def digits_8x8_domains() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    raw = (load_digits().images * (255 / 16)).round().astype(np.uint8)[:, None]
    d = unpaired_domains(raw, np.zeros(len(raw)), style="bold", seed=0)
    as_float = lambda x: torch.from_numpy(x).float() / 127.5 - 1
    return as_float(d.a_images), as_float(d.b_images)


def train(cfg: CycleGANConfig, steps: int, seed: int = 0) -> tuple[list[float], CycleGenerators]:
    """The paper's step: both generators on one loss, then both discriminators on pooled fakes."""
    a_all, b_all = digits_8x8_domains()
    g, d = nets(cfg, seed)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.5, 0.999))
    pool_a, pool_b = ImagePool(cfg.pool_size, seed), ImagePool(cfg.pool_size, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    cycles = []
    for _ in range(steps):
        a = a_all[torch.randint(len(a_all), (8,), generator=gen)]
        b = b_all[torch.randint(len(b_all), (8,), generator=gen)]
        out = g(a, b)
        d.requires_grad_(False)
        terms = generator_loss_terms(out, a, b, d.a(out.fake_a), d.b(out.fake_b), cfg)
        opt_g.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt_g.step()
        d.requires_grad_(True)
        dt = discriminator_loss_terms(d.a(a), d.a(pool_a.query(out.fake_a)), d.b(b), d.b(pool_b.query(out.fake_b)))
        opt_d.zero_grad(set_to_none=True)
        dt["loss"].backward()
        opt_d.step()
        assert all(torch.isfinite(t) for t in (*terms.values(), *dt.values()))
        cycles.append((terms["cycle_a"] + terms["cycle_b"]).item())
    return cycles, g


def test_sixty_steps_lower_the_cycle_loss():
    cycles, g = train(tiny(image_size=8, d_layers=1, ngf=8, pool_size=20), steps=60)
    assert np.mean(cycles[-10:]) < 0.5 * np.mean(cycles[:3]), (cycles[:3], cycles[-10:])


def test_training_is_deterministic_under_a_seed():
    cfg = tiny(image_size=8, d_layers=1, pool_size=4)
    (c1, g1), (c2, g2), (c3, _) = train(cfg, 6, seed=0), train(cfg, 6, seed=0), train(cfg, 6, seed=1)
    assert c1 == c2 and c1 != c3
    assert all(torch.equal(p, q) for p, q in zip(g1.state_dict().values(), g2.state_dict().values()))
    assert isinstance(g1(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)), CycleOutputs)


# --- translation metrics -------------------------------------------------------------------------------------------

def test_translation_metrics_label_preservation_and_cycle_error():
    from genai.eval.digits import DigitClassifier, predict
    from genai.eval.translation import translation_metrics

    torch.manual_seed(0)
    clf = DigitClassifier().eval()
    d = builtin_digit_domains("val")
    same = translation_metrics(lambda x: x, lambda x: x, d.a_images, d.b_images, clf, batch_size=64)
    assert same == {"label_preservation_ab": 1.0, "cycle_l1_a": 0.0, "label_preservation_ba": 1.0, "cycle_l1_b": 0.0}
    flip = lambda x: x.flip(-1)  # its own inverse: perfect cycles, but mirrored digits change label
    mirrored = translation_metrics(flip, flip, d.a_images, d.b_images, clf)
    a = torch.from_numpy(d.a_images).float() / 127.5 - 1
    expected = float(np.mean(predict(clf, a) == predict(clf, a.flip(-1))))
    assert mirrored["label_preservation_ab"] == pytest.approx(expected) and expected < 1.0
    assert mirrored["cycle_l1_a"] == 0.0 and mirrored["cycle_l1_b"] == 0.0
    darker = translation_metrics(lambda x: x - 0.5, lambda x: x, d.a_images, d.b_images, clf)
    assert 0.1 < darker["cycle_l1_a"] < 0.5  # nothing undoes the shift (background stays clamped at -1)
    g, _ = nets(tiny())
    real = translation_metrics(g.ab, g.ba, d.a_images[:16], d.b_images[:16], clf)
    assert all(np.isfinite(v) for v in real.values())
    with pytest.raises(ValueError, match="no held-out images of domain B"):
        translation_metrics(g.ab, g.ba, d.a_images, d.b_images[:0], clf)
