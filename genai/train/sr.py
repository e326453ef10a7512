"""Super-resolution training: the plan made on the driver (no Ray) and the family the training skeleton
(genai/train/loop.py) runs in every Ray Train worker.

SRResNet on one DeepSpeed engine with the pixel loss; with model.adversarial an SRGAN-style discriminator on a
second engine, its adversarial term and optionally a perceptual term on its own features. The training pairs are
random crops of the training photos, which every worker holds in memory (no row stream): the pairs of step s on
rank r are batch s * world + r of a seeded sampler (genai/data/sr_pairs.py), so a resumed run draws exactly the
pairs it would have drawn. As in gan_step, the generator's update runs through the discriminator's bare module with
its parameters frozen, so that the discriminator's ZeRO gradient hooks do not fire for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.deepspeed_config import gan_engine_config, resolve_precision
from genai.config import ConfigError, SRRecipe
from genai.data.photo_dataset import (PhotoManifest, ensure_photo_dataset, load_photo_manifest, load_photos,
                                     verify_photo_shards)
from genai.data.sr_pairs import SRPairSampler, bicubic_downscale, bicubic_upscale, to_float_image
from genai.eval.image_quality import evaluate_super_resolution
from genai.export import write_image_export
from genai.models.sr import (SRConfig, SRDiscriminator, SRResNet, adversarial_d_loss, generator_loss_terms, num_params,
                             pixel_loss)
from genai.run import SAMPLES_DIR, export_location
from genai.train.checkpoint import master_weights
from genai.train.family import Family
from genai.train.images import (ENDLESS, BatchIndices, adam_engine, check_replicas, engine_dtype, interleave,
                                log_grid, mean_stats, set_adam)
from genai.train.tracking import say

STATS = ("loss", "pixel", "feature", "adversarial", "d_loss")
SAMPLE_CROPS = 4  # held-out photos shown (bicubic, SR, original) in each sample grid
INIT_FIELDS = ("scale", "channels", "features", "blocks", "bicubic_skip")


@dataclass
class SRPlan:
    """Everything the workers need, checked on the driver before any cluster time is spent."""

    recipe: SRRecipe
    data_uri: str
    manifest: PhotoManifest
    model_config: SRConfig
    ds_configs: dict[str, dict]

    def loop_config(self, run_uri: str) -> dict:
        return {"recipe": self.recipe.model_dump(mode="json"), "model_config": self.model_config.to_dict(),
                "ds_configs": self.ds_configs, "data_uri": self.data_uri, "run_uri": run_uri}

    def dataset_uris(self) -> dict[str, list[str]]:
        return {}  # every worker reads the photos itself (few, and cropped at random)

    def verify_data(self) -> None:
        verify_photo_shards(self.manifest)


def check_init_from(uri: str, cfg: SRConfig) -> None:
    """train.init_from names an SR model whose generator has this recipe's shape."""
    from genai.run import CheckpointError
    from genai.sampling import load_image_model

    try:
        loaded = load_image_model(uri)
    except CheckpointError as exc:
        raise ConfigError(f"train.init_from={uri}: {exc}") from None
    if loaded.kind != "sr":
        raise ConfigError(f"train.init_from={uri}: a {loaded.kind} model, not a super-resolution one")
    diff = [f"model.{k}={getattr(cfg, k)} (it has {getattr(loaded.config, k)})" for k in INIT_FIELDS
            if getattr(cfg, k) != getattr(loaded.config, k)]
    if diff:
        raise ConfigError(f"train.init_from={uri}: its generator does not fit this recipe's {', '.join(diff)}")


def plan_sr_run(recipe: SRRecipe, log=print) -> SRPlan:
    """Resolve the photo dataset (preparing it into the cache if needed) and check it fits the recipe."""
    d, t, c, m = recipe.data, recipe.train, recipe.cluster, recipe.model
    data_uri = d.uri or ensure_photo_dataset(d.source, d.cache_dir, m.channels, d.val_fraction, log=log)
    manifest = load_photo_manifest(data_uri)
    verify_photo_shards(manifest)
    if manifest.channels != m.channels:
        raise ConfigError(f"model.channels={m.channels}, but {data_uri} holds {manifest.channels}-channel photos")
    for what, small in (("training", manifest.min_train_image), ("held-out", manifest.min_val_image)):
        if min(small["height"], small["width"]) < t.patch_size:  # held-out ones: the sample grids' crops
            raise ConfigError(f"train.patch_size={t.patch_size}: {data_uri} holds a {small['width']}x"
                              f"{small['height']} {what} image ({small['name']}), smaller than the patch (lower "
                              "train.patch_size)")
    model_config = SRConfig(scale=m.scale, channels=m.channels, features=m.features, blocks=m.blocks,
                            bicubic_skip=m.bicubic_skip, ndf=m.ndf)
    if t.init_from:
        check_init_from(t.init_from, model_config)
    ds = recipe.deepspeed
    ds_configs = {"generator": gan_engine_config(ds.generator, t, t.lr, c.num_workers, c.use_gpu)}
    if m.adversarial:
        ds_configs["discriminator"] = gan_engine_config(ds.discriminator, t, t.lr_d, c.num_workers, c.use_gpu)
    return SRPlan(recipe, data_uri, manifest, model_config, ds_configs)


def centre_crops(images: list[torch.Tensor], side: int) -> torch.Tensor:
    """Centre crops of one side from images [C, H, W] of any size at least that big, stacked."""
    out = []
    for im in images:
        top, left = (im.shape[-2] - side) // 2, (im.shape[-1] - side) // 2
        out.append(im[:, top:top + side, left:left + side])
    return torch.stack(out)


class SRFamily(Family):
    """SRResNet (and an SRGAN discriminator) on DeepSpeed engines: random crops of in-memory photos, PSNR/SSIM on
    held-out photos beside bicubic, bicubic / SR / original grids, the generator's export."""

    kind, job, counter = "sr", "jobs/train.py", "images"
    rows_per_fetch, prefetch_batches, batches_per_step = 0, 0, 1  # no row stream: the family makes its pairs
    plan = staticmethod(plan_sr_run)

    @staticmethod
    def summary(run, metrics: dict) -> tuple[str, list[str]]:
        parts = [f"{key} {metrics[key]:.{digits}f}" for key, digits in
                 (("psnr", 2), ("bicubic_psnr", 2), ("ssim", 4), ("bicubic_ssim", 4), ("pixel", 4))
                 if isinstance(metrics.get(key), float)]
        return ("".join(f", {p}" for p in parts),
                [f"samples:     {run.join(SAMPLES_DIR).uri}",
                 f"generate:    python jobs/generate.py --checkpoint {run.uri} --input low.png --out high.png"])

    def build(self) -> dict:
        t, m = self.t, self.recipe.model
        self.model_config = cfg = SRConfig(**self.cfg["model_config"])
        G = SRResNet(cfg)
        if t.init_from:  # a fresh run starts from these weights; a resumed one's checkpoint replaces them
            from genai.sampling import load_image_model

            G.load_state_dict(load_image_model(t.init_from).model.state_dict())
        nets = {"generator": (G, t.lr)}
        if m.adversarial:
            nets["discriminator"] = (SRDiscriminator(cfg), t.lr_d)
        self.n_params = {name: num_params(net) for name, (net, _) in nets.items()}
        engines = {name: adam_engine(net, self.cfg["ds_configs"][name], lr, (t.beta1, t.beta2))
                   for name, (net, lr) in nets.items()}
        self.g_engine, self.d_engine = engines["generator"], engines.get("discriminator")
        self.dtype = engine_dtype(self.cfg["ds_configs"]["generator"])
        return engines

    def new_state(self) -> dict:
        return {"kind": "sr", "step": 0, "epoch": 0, "epoch_step": 0, "images": 0}

    def rebase(self) -> None:
        t = self.t
        set_adam([self.g_engine], t.lr, (t.beta1, t.beta2))
        if self.d_engine is not None:
            set_adam([self.d_engine], t.lr_d, (t.beta1, t.beta2))

    def describe(self) -> str:
        t, w, cfg, m = self.t, self.worker, self.model_config, self.recipe.model
        d = (f", discriminator {self.n_params['discriminator'] / 1e6:.2f}M ({m.adversarial_loss}, perceptual "
             f"{m.perceptual})" if m.adversarial else "")
        return (f"models: SRResNet x{cfg.scale} {self.n_params['generator'] / 1e6:.2f}M parameters{d}; "
                f"{w.world} worker(s), ZeRO-{self.recipe.deepspeed.generator.zero_stage}, "
                f"{resolve_precision(t.precision, self.recipe.cluster.use_gpu)}, device {w.device.type}")

    def prepare(self) -> None:
        t, w, cfg = self.t, self.worker, self.model_config
        manifest = load_photo_manifest(self.cfg["data_uri"])
        train = [to_float_image(a) for a in load_photos(manifest, "train")]
        self.sampler = SRPairSampler(train, t.patch_size, cfg.scale, t.batch_size, t.seed, t.augment)
        self.val = self.crops = None
        if w.rank == 0:
            self.val = [to_float_image(a) for a in load_photos(manifest, "val", limit=t.eval_samples)]
            shown = self.val[:SAMPLE_CROPS]
            side = min(2 * t.patch_size, *(min(im.shape[-2:]) for im in shown)) // cfg.scale * cfg.scale
            self.crops = centre_crops(shown, side)
        self.sums = torch.zeros(len(STATS), dtype=torch.float64, device=w.device)
        self.counted = 0
        self.images_per_step = t.batch_size * w.world

    def epoch_steps(self, epoch: int) -> int:
        return ENDLESS

    def open_epoch(self, epoch: int, rows) -> BatchIndices:
        return BatchIndices(self.worker.rank, self.worker.world)

    def step(self, batches, state: dict) -> None:
        t, m, device = self.t, self.recipe.model, self.worker.device
        lr, hr = (x.to(device, self.dtype) for x in self.sampler.batch(next(batches)))
        stats = torch.zeros(len(STATS), dtype=torch.float64, device=device)
        if self.d_engine is None:
            terms = generator_loss_terms(self.g_engine(lr), hr, pixel=m.pixel_loss, pixel_weight=t.pixel_weight)
        else:
            with torch.no_grad():
                fake = self.g_engine.module(lr)
            scores = self.d_engine(torch.cat([hr, fake])).float()
            d_loss = adversarial_d_loss(scores[:len(hr)], scores[len(hr):], m.adversarial_loss)
            self.d_engine.backward(d_loss)
            self.d_engine.step()
            stats[4] = d_loss.detach().double()
            terms = self._generator_terms(lr, hr)
        self.g_engine.backward(terms["loss"])
        self.g_engine.step()
        stats[:4] += torch.stack([terms[k].detach() for k in STATS[:4]]).double()
        self.sums += stats
        self.counted += 1
        state["images"] += self.images_per_step

    def _generator_terms(self, lr: torch.Tensor, hr: torch.Tensor) -> dict:
        """The generator's terms through the discriminator's bare module, its parameters frozen."""
        t, m, D = self.t, self.recipe.model, self.d_engine.module
        D.requires_grad_(False)
        try:
            sr = self.g_engine(lr)
            real = D(hr).detach() if m.adversarial_loss == "relativistic" else None
            feature = ((lambda a, b: pixel_loss(D.features(a), D.features(b).detach(), m.pixel_loss))
                       if m.perceptual == "discriminator" else None)
            return generator_loss_terms(sr, hr, D(sr), real, feature, m.pixel_loss, m.adversarial_loss,
                                        t.pixel_weight, t.feature_weight, t.adversarial_weight)
        finally:
            D.requires_grad_(True)

    def log_train(self, step: int, seconds_per_step: float) -> dict:
        w, dt, adversarial = self.worker, seconds_per_step, self.d_engine is not None
        loss, pixel, feature, adv, d_loss = mean_stats(self.sums, self.counted, w.world, step, STATS,
                                                       "lower train.lr / train.lr_d")
        w.logger.scalars(step, {"train/loss": loss, "train/pixel": pixel,
                                "train/feature": feature if adversarial else None,
                                "train/adversarial": adv if adversarial else None,
                                "train/d_loss": d_loss if adversarial else None,
                                "perf/images_per_s": self.images_per_step / dt, "perf/step_time_s": dt})
        parts = {"pixel": f"{pixel:.4f}"}
        if adversarial:
            parts.update(adv=f"{adv:.4f}", d_loss=f"{d_loss:.4f}")
        w.logger.progress(step, {**parts, "img/s": f"{self.images_per_step / dt:,.0f}"})
        self.sums, self.counted = torch.zeros_like(self.sums), 0
        out = {"loss": loss, "pixel": pixel, "images_per_s": self.images_per_step / dt}
        return dict(out, d_loss=d_loss, adversarial=adv) if adversarial else out

    def samples(self, step: int) -> None:
        if self.worker.rank != 0:
            return
        scale, hr = self.model_config.scale, self.crops
        lr = bicubic_downscale(hr, scale)
        with torch.no_grad():
            sr = self.g_engine.module(lr.to(self.worker.device, self.dtype)).float().clamp(-1, 1).cpu()
        log_grid(self.worker, step, "samples/bicubic_sr_original", interleave(bicubic_upscale(lr, scale), sr, hr),
                 nrow=3, png=f"step_{step:08d}.png")

    def evaluate(self) -> dict:
        """Rank 0: PSNR and SSIM (luma, border cropped) on the held-out photos beside bicubic upscaling."""
        if self.val is None:
            return {}
        return evaluate_super_resolution(self.g_engine.module, self.val, self.model_config.scale,
                                         max_size=self.t.eval_size, device=self.worker.device, dtype=self.dtype)

    def log_eval(self, step: int, metrics: dict) -> None:
        if not metrics:
            return
        self.worker.logger.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        say(f"step {step}: PSNR {metrics['psnr']:.2f} dB (bicubic {metrics['bicubic_psnr']:.2f}), SSIM "
            f"{metrics['ssim']:.4f} (bicubic {metrics['bicubic_ssim']:.4f}) on {len(self.val)} held-out photo(s)")

    def export(self, state: dict) -> str:
        """Check the replicas' weights are equal, then rank 0 writes the generator's fp32 weights."""
        w = self.worker
        modules = {"generator": self.g_engine.module}
        if self.d_engine is not None:
            modules["discriminator"] = self.d_engine.module
        check_replicas(modules, w.device, w.world, w.rank)
        weights = master_weights(self.g_engine, w.rank)
        if w.rank == 0:
            write_image_export(export_location(w.run_uri), "sr", weights, self.model_config, self.recipe_yaml,
                               state["step"])
        return "the SRResNet generator"
