"""Super-resolution: SRResNet and its discriminator at x2 and x4, the pixel / adversarial / feature losses, the
training pairs made on the fly (bicubic, antialiased, deterministic under a seed), the builtin photographs,
PSNR and SSIM with the bicubic baseline, and a short training run in which SRResNet beats bicubic."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genai.data.photos import PHOTOS, SPLITS, builtin_photos, load_photo
from genai.data.sr_pairs import (
    SRPairSampler,
    bicubic_downscale,
    bicubic_upscale,
    crop_to_multiple,
    seed_for,
    to_float_image,
)
from genai.eval.digits import DigitClassifier
from genai.eval.image_quality import evaluate_super_resolution, image_quality, psnr, ssim, to_uint8_hwc
from genai.models.sr import (
    ADVERSARIAL_LOSSES,
    FeatureLoss,
    SRConfig,
    SRDiscriminator,
    SRResNet,
    adversarial_d_loss,
    adversarial_g_loss,
    features_of,
    generator_loss_terms,
    num_params,
    pixel_loss,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**kw) -> SRConfig:
    return SRConfig(**{"features": 8, "blocks": 1, "ndf": 4, **kw})


@pytest.fixture(scope="module")
def train_photos() -> list[torch.Tensor]:
    return [to_float_image(a) for a in builtin_photos("train").values()]


# --- models --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("skip", [True, False])
def test_srresnet_multiplies_any_size_by_its_scale(scale, channels, skip):
    torch.manual_seed(0)
    g = SRResNet(tiny(scale=scale, channels=channels, bicubic_skip=skip))
    for h, w in ((8, 8), (7, 11)):
        sr = g(torch.rand(2, channels, h, w) * 2 - 1)
        assert sr.shape == (2, channels, scale * h, scale * w) and torch.isfinite(sr).all()
    up = g.upscale(torch.rand(1, channels, 5, 5) * 4 - 2)
    assert up.min() >= -1 and up.max() <= 1 and not up.requires_grad
    with pytest.raises(ValueError, match=f"expected low-resolution images \\[B, {channels}, h, w\\]"):
        g(torch.zeros(1, channels + 1, 8, 8))


@pytest.mark.parametrize("scale", [2, 4])
def test_an_untrained_srresnet_is_exactly_bicubic(scale):
    g = SRResNet(tiny(scale=scale))
    lr = torch.rand(2, 3, 6, 6) * 2 - 1
    assert torch.allclose(g(lr), F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False))
    assert not torch.allclose(SRResNet(tiny(scale=scale, bicubic_skip=False))(lr), g(lr))


@pytest.mark.parametrize("size", [16, 24, 96])
def test_the_discriminator_scores_any_patch_size_per_image(size):
    torch.manual_seed(0)
    d = SRDiscriminator(tiny(channels=3))
    x = torch.rand(3, 3, size, size) * 2 - 1
    scores = d(x)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert torch.allclose(d(x[1:2]), scores[1:2], atol=1e-6)  # no batch norm: each score depends on its image


@pytest.mark.parametrize("kw,field", [({"scale": 3}, "scale"), ({"features": 0}, "features"),
                                      ({"blocks": -1}, "blocks"), ({"channels": 0}, "channels")])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SRConfig(**kw)


def test_config_round_trips_and_the_default_is_srresnet_sized():
    cfg = SRConfig(scale=2, channels=1, features=32, blocks=4, bicubic_skip=False, ndf=16)
    assert SRConfig(**cfg.to_dict()) == cfg
    assert 1.4e6 < num_params(SRResNet(SRConfig(scale=4))) < 1.6e6  # SRResNet: about 1.5M parameters at x4


# --- losses --------------------------------------------------------------------------------------------------------

def test_pixel_losses_match_hand_computed_values():
    a, b = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 1.0, 1.0])
    assert pixel_loss(a, b, "l1").item() == pytest.approx((0.5 + 0 + 2) / 3)
    assert pixel_loss(a, b, "mse").item() == pytest.approx((0.25 + 0 + 4) / 3)
    assert pixel_loss(a, b).item() == pixel_loss(a, b, "l1").item()  # L1 is the default
    with pytest.raises(ValueError, match="huber"):
        pixel_loss(a, b, "huber")


def sp(v: float) -> float:  # softplus
    return math.log1p(math.exp(v))


REAL, FAKE = torch.tensor([1.0, 3.0]), torch.tensor([0.0, -2.0])  # means 2 and -1


def test_relativistic_losses_match_hand_computed_values():
    d_expected = (sp(-(1 + 1)) + sp(-(3 + 1))) / 2 + (sp(0 - 2) + sp(-2 - 2)) / 2
    g_expected = (sp(1 + 1) + sp(3 + 1)) / 2 + (sp(-(0 - 2)) + sp(-(-2 - 2))) / 2
    assert adversarial_d_loss(REAL, FAKE, "relativistic").item() == pytest.approx(d_expected, rel=1e-6)
    assert adversarial_g_loss(FAKE, REAL, "relativistic").item() == pytest.approx(g_expected, rel=1e-6)
    # SRGAN's: -log D(real) - log(1 - D(fake)) for D, -log D(fake) for G.
    assert adversarial_d_loss(REAL, FAKE, "nonsaturating").item() == pytest.approx(
        (sp(-1) + sp(-3)) / 2 + (sp(0) + sp(-2)) / 2, rel=1e-6)
    assert adversarial_g_loss(FAKE, kind="nonsaturating").item() == pytest.approx((sp(0) + sp(2)) / 2, rel=1e-6)
    assert set(ADVERSARIAL_LOSSES) == {"nonsaturating", "relativistic"}


def test_adversarial_losses_reject_unknown_kinds_and_missing_real_scores():
    with pytest.raises(ValueError, match="lsgan"):
        adversarial_d_loss(REAL, FAKE, "lsgan")
    with pytest.raises(ValueError, match="lsgan"):
        adversarial_g_loss(FAKE, REAL, "lsgan")
    with pytest.raises(ValueError, match="scores of real images"):
        adversarial_g_loss(FAKE, None, "relativistic")


def test_feature_loss_through_the_digit_classifier_reaches_the_image_not_the_extractor():
    torch.manual_seed(0)
    clf = DigitClassifier().train()
    loss_fn = FeatureLoss(features_of(clf, "features")).train()  # .train() keeps the extractor in eval mode
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    hr = torch.rand(4, 1, 28, 28) * 2 - 1
    assert loss_fn(hr, hr).item() == 0.0
    sr = (hr + 0.3 * torch.randn_like(hr)).requires_grad_(True)
    loss = loss_fn(sr, hr)
    assert loss.item() > 0
    loss.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.parameters())
    assert loss_fn(sr, hr).item() == loss.item()  # eval mode: dropout off, the loss is deterministic


def test_feature_loss_with_several_layers_weights_and_without_an_extractor():
    class TwoLayers(nn.Module):
        def forward(self, x):
            return [x, 2 * x]

    a, b = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    assert FeatureLoss(TwoLayers())(a, b).item() == pytest.approx(0.5 * 1 + 0.5 * 2)
    assert FeatureLoss(TwoLayers(), kind="mse", weights=[1.0, 0.25])(a, b).item() == pytest.approx(1 + 0.25 * 4)
    with pytest.raises(ValueError, match="2 feature maps but 1 weights"):
        FeatureLoss(TwoLayers(), weights=[1.0])(a, b)
    assert FeatureLoss(None)(a, b).item() == 0.0
    with pytest.raises(ValueError, match="no method 'embed'"):
        features_of(DigitClassifier(), "embed")


def test_generator_terms_default_to_pixel_only_and_weight_the_fine_tune():
    torch.manual_seed(0)
    sr, hr = torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    terms = generator_loss_terms(sr, hr)
    assert set(terms) == {"loss", "pixel", "feature", "adversarial"}
    assert terms["loss"].item() == terms["pixel"].item() == pixel_loss(sr, hr).item()
    fake_s, real_s = torch.randn(2), torch.randn(2)
    feat = FeatureLoss(features_of(DigitClassifier(), "features"))
    tuned = generator_loss_terms(sr, hr, fake_s, real_s, feat, pixel_weight=1e-2, feature_weight=1.0,
                                 adversarial_weight=5e-3)
    expected = 1e-2 * tuned["pixel"] + tuned["feature"] + 5e-3 * adversarial_g_loss(fake_s, real_s)
    assert tuned["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="scores of the generated images"):
        generator_loss_terms(sr, hr, adversarial_weight=1.0)


def test_one_adversarial_fine_tune_step_moves_both_networks():
    torch.manual_seed(0)
    cfg = tiny(scale=2, channels=3)
    g, d = SRResNet(cfg), SRDiscriminator(cfg)
    lr, hr = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    sr = g(lr)
    d_loss = adversarial_d_loss(d(hr), d(sr.detach()))
    d_loss.backward()
    assert all(p.grad is not None for p in d.parameters()) and not any(p.grad is not None for p in g.parameters())
    d.zero_grad()
    d.requires_grad_(False)
    terms = generator_loss_terms(sr, hr, d(sr), d(hr), adversarial_weight=5e-3)
    terms["loss"].backward()
    assert g.tail.weight.grad.abs().sum() > 0 and all(p.grad is None for p in d.parameters())


# --- training pairs ------------------------------------------------------------------------------------------------

def test_to_float_image_maps_uint8_to_unit_range_channels_first():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 1] = (0, 255, 128)
    t = to_float_image(rgb)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[:, 0, 1].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    assert to_float_image(np.zeros((4, 5), dtype=np.uint8)).shape == (1, 4, 5)
    with pytest.raises(ValueError, match="uint8"):
        to_float_image(np.zeros((4, 5)))


@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_resampling_shapes_constants_and_antialiasing(scale):
    flat = torch.full((1, 3, 16, 16), 0.25)
    assert torch.allclose(bicubic_downscale(flat, scale), torch.full((1, 3, 16 // scale, 16 // scale), 0.25))
    assert bicubic_upscale(bicubic_downscale(flat, scale), scale).shape == flat.shape
    stripes = torch.ones(1, 1, 16, 16)
    stripes[..., 1::2] = -1  # the highest frequency there is: antialiasing averages it away
    assert bicubic_downscale(stripes, scale)[..., 1:-1].abs().max() < 0.05  # inside the clamped border
    assert crop_to_multiple(torch.zeros(3, 17, 19), scale).shape == (3, 16, 16 if scale == 4 else 18)
    with pytest.raises(ValueError, match="smaller than the scale"):
        bicubic_downscale(torch.zeros(1, 1, 1, 8), scale)


def test_pairs_are_deterministic_under_a_seed_and_independent_of_order(train_photos):
    a = SRPairSampler(train_photos, 32, 4, 6, seed=7)
    b = SRPairSampler(train_photos, 32, 4, 6, seed=7)
    lr, hr = a.batch(3)
    assert lr.shape == (6, 3, 8, 8) and hr.shape == (6, 3, 32, 32)
    b.batch(0)
    assert torch.equal(b.batch(3)[1], hr) and torch.equal(b.batch(3)[0], lr)  # batch i depends on (seed, i) only
    assert not torch.equal(a.batch(4)[1], hr)
    assert not torch.equal(SRPairSampler(train_photos, 32, 4, 6, seed=8).batch(3)[1], hr)
    assert torch.equal(lr, bicubic_downscale(hr, 4))
    first = next(iter(a))
    assert torch.equal(first[1], a.batch(0)[1])
    assert seed_for(7, 3) != seed_for(7, 4) != seed_for(8, 3)


def test_pairs_are_crops_of_the_images_up_to_the_square_symmetries(train_photos):
    image = train_photos[0][:, :40, :48]
    plain = SRPairSampler([image], 16, 2, 8, seed=0, augment=False)
    windows = image.unfold(1, 16, 1).unfold(2, 16, 1)  # [C, 25, 33, 16, 16]: every 16x16 window
    for crop in plain.batch(0)[1]:
        match = (windows - crop[:, None, None]).abs().amax(dim=(0, 3, 4)) == 0
        assert match.any()
    augmented = SRPairSampler([image], 16, 2, 32, seed=0).batch(0)[1]
    for crop in augmented:
        variants = [torch.rot90(c, k, dims=(-2, -1)) for c in (crop, crop.flip(-1)) for k in range(4)]
        assert any(((windows - v[:, None, None]).abs().amax(dim=(0, 3, 4)) == 0).any() for v in variants)


def test_bad_pair_settings_are_one_line_errors(train_photos):
    with pytest.raises(ValueError, match="image 0 is 20x20, smaller than the 32x32 training patch"):
        SRPairSampler([torch.zeros(3, 20, 20)], 32, 4, 2)
    with pytest.raises(ValueError, match="patch_size 30 must be a positive multiple of the scale 4"):
        SRPairSampler(train_photos, 30, 4, 2)
    with pytest.raises(ValueError, match="different channel counts"):
        SRPairSampler([torch.zeros(3, 40, 40), torch.zeros(1, 40, 40)], 32, 4, 2)
    with pytest.raises(ValueError, match="no images"):
        SRPairSampler([], 32, 4, 2)


def test_builtin_photos_are_bundled_split_and_colour_or_grey():
    train, val = builtin_photos("train"), builtin_photos("val")
    assert set(train) | set(val) == set(PHOTOS) and not set(train) & set(val)
    assert tuple(val) == SPLITS["val"]
    for image in (*train.values(), *val.values()):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 300
    grey = load_photo("chelsea", channels=1)
    assert grey.shape == val["chelsea"].shape[:2] + (1,)
    luma = val["chelsea"].astype(float) @ [0.299, 0.587, 0.114]
    assert np.abs(grey[..., 0] - luma).max() <= 0.5 + 1e-9
    with pytest.raises(ValueError, match="no builtin photo 'lena'"):
        load_photo("lena")
    with pytest.raises(ValueError, match="no split 'test'"):
        builtin_photos("test")


# --- image quality -------------------------------------------------------------------------------------------------

def test_identical_images_have_infinite_psnr_and_unit_ssim():
    x = torch.rand(3, 3, 24, 24) * 2 - 1
    assert np.isinf(psnr(x, x)).all() and np.allclose(ssim(x, x), 1.0)
    q = image_quality(x, x, crop_border=2, luma=True)
    assert math.isinf(q["psnr"]) and q["ssim"] == pytest.approx(1.0)
    small = torch.rand(2, 1, 8, 8) * 2 - 1  # below the 11x11 Gaussian window: a uniform window that fits
    assert np.allclose(ssim(small, small), 1.0) and ssim(small, -small).max() < 0.5


def test_psnr_matches_the_formula_on_8_bit_levels():
    target = np.zeros((1, 1, 16, 16), dtype=np.uint8)
    pred = np.full((1, 1, 16, 16), 10, dtype=np.uint8)
    assert psnr(pred, target)[0] == pytest.approx(10 * math.log10(255 ** 2 / 100))
    # floats in [-1, 1] are quantised to the same levels first
    as_float = torch.from_numpy(pred.astype(np.float32)) / 127.5 - 1
    assert psnr(as_float, torch.full((1, 1, 16, 16), -1.0))[0] == pytest.approx(psnr(pred, target)[0])
    assert to_uint8_hwc(as_float).shape == (1, 16, 16, 1)
    noisy = np.clip(target.astype(int) + np.random.default_rng(0).integers(0, 60, target.shape), 0, 255)
    assert ssim(noisy.astype(np.uint8), target)[0] < 1.0


def test_metrics_reject_mismatched_or_too_small_images():
    with pytest.raises(ValueError, match="different shapes"):
        psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="too small for a 4-pixel border crop"):
        psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), crop_border=4)
    with pytest.raises(ValueError, match="too small for SSIM"):
        ssim(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("scale", [2, 4])
def test_the_bicubic_baseline_is_computed_beside_the_model(scale):
    val = [to_float_image(a) for a in builtin_photos("val").values()]
    res = evaluate_super_resolution(lambda lr: bicubic_upscale(lr, scale), val, scale, max_size=96)
    assert set(res) == {"psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "psnr_gain"}
    assert res["psnr"] == res["bicubic_psnr"] and res["psnr_gain"] == 0.0
    assert 18 < res["bicubic_psnr"] < 40 and 0.3 < res["bicubic_ssim"] < 1.0
    untrained = evaluate_super_resolution(SRResNet(tiny(scale=scale)).upscale, val, scale, max_size=96)
    assert untrained["psnr"] == pytest.approx(res["bicubic_psnr"], abs=0.05)  # it starts as bicubic
    nearest = evaluate_super_resolution(lambda lr: F.interpolate(lr, scale_factor=scale), val, scale, max_size=96)
    assert nearest["psnr_gain"] < 0 and nearest["ssim"] < nearest["bicubic_ssim"]
    with pytest.raises(ValueError, match="expected"):
        evaluate_super_resolution(lambda lr: lr, val, scale, max_size=96)


def test_a_few_hundred_steps_beat_bicubic_on_training_crops(train_photos):
    torch.manual_seed(0)
    g = SRResNet(tiny(scale=2, features=12, blocks=1))
    opt = torch.optim.Adam(g.parameters(), lr=2e-3)
    pairs = SRPairSampler(train_photos, 16, 2, 16, seed=0)
    crops = [pairs.batch(i) for i in range(8)]  # a fixed set of 128 training crops
    for step in range(200):
        lr, hr = crops[step % len(crops)]
        loss = pixel_loss(g(lr), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    lr = torch.cat([c[0] for c in crops])
    hr = torch.cat([c[1] for c in crops])
    # The PSNR of the whole set (crops stacked into one tall image): a flat crop's own PSNR can be inf.
    tall = lambda x: x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[-1])
    model_psnr = psnr(tall(g.upscale(lr)), tall(hr))[0]
    bicubic_psnr = psnr(tall(bicubic_upscale(lr, 2)), tall(hr))[0]
    assert model_psnr > bicubic_psnr + 0.3, (model_psnr, bicubic_psnr)
