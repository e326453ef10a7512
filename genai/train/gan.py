"""GAN training: the plan made on the driver (no Ray) and the family the training skeleton (genai/train/loop.py)
runs in every Ray Train worker.

Two DeepSpeed engines, one per network, each with its own optimizer and ZeRO stage. The generator's
step runs through the discriminator with the discriminator's parameters frozen, so the generator's
backward does not fire the discriminator's ZeRO gradient hooks (which would reduce its gradients a
second time). A step is one generator update after `n_critic` discriminator updates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from cluster.deepspeed_config import gan_engine_config, resolve_precision
from genai.config import GANRecipe
from genai.data.image_dataset import ImageManifest, verify_image_shards
from genai.data.shards import DatasetError
from genai.models.gan import EMA, GANConfig, Discriminator, Generator, init_weights, num_params
from genai.export import write_gan_export
from genai.run import EMA_FILE, META_DIR, SAMPLES_DIR, export_location
from genai.train.family import Family
from genai.train.images import (QualityEval, TrainingError, adam_engine, check_classifier, check_replicas,
                                engine_dtype, image_stream, log_grid, mean_stats, plan_image_dataset, quality_line,
                                set_adam)
from genai.train.steps import gan_step
from genai.train.tracking import say

ROWS_PER_FETCH = 1024
COLLAPSE_D_LOSS = 1e-3  # a discriminator loss this close to 0 means it wins outright: the generator has failed


class GANTrainingError(TrainingError):
    """The generator collapsed; the last checkpoint is intact."""


@dataclass
class GANPlan:
    """Everything the workers need, checked on the driver before any cluster time is spent."""

    recipe: GANRecipe
    data_uri: str
    manifest: ImageManifest
    model_config: GANConfig
    ds_configs: dict[str, dict]

    def loop_config(self, run_uri: str) -> dict:
        return {
            "recipe": self.recipe.model_dump(mode="json"),
            "model_config": self.model_config.to_dict(),
            "ds_configs": self.ds_configs,
            "data_uri": self.data_uri,
            "run_uri": run_uri,
            "rows_per_worker": self.manifest.rows_per_worker("train", self.recipe.cluster.num_workers),
        }

    def dataset_uris(self) -> dict[str, list[str]]:
        return {"train": self.manifest.shard_uris("train")}

    def verify_data(self) -> None:
        """Check the shards against the manifest again (raises DatasetError naming a missing/corrupt one)."""
        verify_image_shards(self.manifest)


def steps_per_epoch(rows_per_worker: int, batch_size: int, n_critic: int) -> int:
    """Generator steps every worker takes per epoch (each takes n_critic real batches)."""
    return rows_per_worker // batch_size // n_critic


def plan_gan_run(recipe: GANRecipe, log=print) -> GANPlan:
    """Resolve the image dataset (preparing it into the cache if needed) and check it fits the recipe."""
    t, c, m = recipe.train, recipe.cluster, recipe.model
    data_uri, manifest = plan_image_dataset(recipe.data, m.image_size, m.channels, m.conditional, log=log)
    rows = manifest.rows_per_worker("train", c.num_workers)
    if steps_per_epoch(rows, t.batch_size, t.n_critic) < 1:
        raise DatasetError(f"{data_uri}: {rows} training images per worker are too few for train.batch_size="
                           f"{t.batch_size} x train.n_critic={t.n_critic}")
    check_classifier(t.classifier)
    model_config = GANConfig(image_size=m.image_size, channels=m.channels, z_dim=m.z_dim, ngf=m.ngf, ndf=m.ndf,
                             num_classes=manifest.num_classes if m.conditional else 0, loss=m.loss,
                             spectral_norm=m.spectral_norm)
    ds_configs = {
        "generator": gan_engine_config(recipe.deepspeed.generator, t, t.lr_g, c.num_workers, c.use_gpu),
        "discriminator": gan_engine_config(recipe.deepspeed.discriminator, t, t.lr_d, c.num_workers, c.use_gpu),
    }
    return GANPlan(recipe, data_uri, manifest, model_config, ds_configs)


def generator_quality(evaluator: QualityEval, generator: torch.nn.Module, cfg: GANConfig,
                      seed: int) -> dict[str, float]:
    """A QualityEval of a generator's images from seeded noise."""

    def sample(n, labels, gen):
        return generator(torch.randn(n, cfg.z_dim, generator=gen, device=evaluator.device), labels)

    return evaluator(sample, cfg.num_classes, seed)


def ema_decay(decay: float, updates: int) -> float:
    """EMA decay with warm-up, min(decay, (1 + n) / (10 + n)): early on the average follows the generator
    closely instead of mixing in its random initial weights for thousands of steps."""
    return min(decay, (1 + updates) / (10 + updates))


class GANFamily(Family):
    """A generator and a discriminator on two DeepSpeed engines: streamed images, an fp32 EMA of the generator,
    image samples from fixed noise, the digit-feature Frechet distance, the EMA generator's export."""

    kind, job, counter = "gan", "jobs/train_gan.py", "images"
    rows_per_fetch, prefetch_batches = ROWS_PER_FETCH, 2
    plan = staticmethod(plan_gan_run)

    @staticmethod
    def summary(run, metrics: dict) -> tuple[str, list[str]]:
        parts = [f"{key} {metrics[key]:.{digits}f}" for key, digits in
                 (("fd", 2), ("fd_real", 2), ("label_agreement", 3), ("d_loss", 4), ("g_loss", 4))
                 if isinstance(metrics.get(key), float)]
        return ("".join(f", {p}" for p in parts),
                [f"samples:     {run.join(SAMPLES_DIR).uri}",
                 f"generate:    python jobs/generate.py --checkpoint {run.uri} --num 64 --out grid.png"])

    def __init__(self, recipe: GANRecipe, cfg: dict, worker):
        super().__init__(recipe, cfg, worker)
        self.batches_per_step = self.t.n_critic

    def build(self) -> dict:
        t = self.t
        self.model_config = mcfg = GANConfig(**self.cfg["model_config"])
        G, D = Generator(mcfg), Discriminator(mcfg)
        init_weights(G)
        init_weights(D)
        # Counted before deepspeed.initialize, which may partition the parameters.
        self.n_g, self.n_d = num_params(G), num_params(D)
        engines = {name: adam_engine(net, self.cfg["ds_configs"][name], lr, (t.beta1, t.beta2))
                   for name, net, lr in (("generator", G, t.lr_g), ("discriminator", D, t.lr_d))}
        self.g_engine, self.d_engine = engines["generator"], engines["discriminator"]
        self.dtype = engine_dtype(self.cfg["ds_configs"]["generator"])
        self.ema = EMA(self.g_engine.module, t.ema_decay)
        self.ema.module.float()
        return engines

    def new_state(self) -> dict:
        return {"kind": "gan", "step": 0, "epoch": 0, "epoch_step": 0, "images": 0}

    def restore_extra(self, folder: str) -> None:
        self.ema.load_state_dict(torch.load(os.path.join(folder, META_DIR, EMA_FILE), map_location=self.worker.device))

    def rebase(self) -> None:
        t = self.t
        set_adam([self.g_engine], t.lr_g, (t.beta1, t.beta2))
        set_adam([self.d_engine], t.lr_d, (t.beta1, t.beta2))

    def describe(self) -> str:
        t, w, mcfg, ds = self.t, self.worker, self.model_config, self.recipe.deepspeed
        return (f"models: generator {self.n_g / 1e6:.2f}M, discriminator {self.n_d / 1e6:.2f}M parameters; "
                f"{mcfg.loss} loss{', class-conditional' if mcfg.num_classes else ''}; {w.world} worker(s), ZeRO-"
                f"{ds.generator.zero_stage}/{ds.discriminator.zero_stage}, "
                f"{resolve_precision(t.precision, self.recipe.cluster.use_gpu)}, device {w.device.type}")

    def prepare(self) -> None:
        t, w, mcfg = self.t, self.worker, self.model_config
        self.evaluator = QualityEval(t.classifier, self.cfg["data_uri"], t.eval_samples, w.device) \
            if t.classifier and w.rank == 0 else None
        fixed = torch.Generator(device=w.device).manual_seed(t.seed)
        self.fixed_z = torch.randn(t.sample_grid, mcfg.z_dim, generator=fixed, device=w.device)
        self.fixed_labels = torch.arange(t.sample_grid, device=w.device) % mcfg.num_classes if mcfg.num_classes \
            else None
        # d_loss, g_loss, real score, fake score, gradient penalty
        self.sums = torch.zeros(5, dtype=torch.float64, device=w.device)
        self.counted, self.collapsed_logs = 0, 0
        self.images_per_step = t.batch_size * t.n_critic * w.world

    def epoch_steps(self, epoch: int) -> int:
        return steps_per_epoch(self.cfg["rows_per_worker"], self.t.batch_size, self.t.n_critic)

    def open_epoch(self, epoch: int, rows):
        mcfg = self.model_config
        return image_stream(rows.epoch(), mcfg.image_size, mcfg.channels, self.t.batch_size, self.t.seed, epoch,
                            self.worker.rank, self.recipe.data.shuffle_buffer)

    def step(self, batches, state: dict) -> None:
        t, device = self.t, self.worker.device

        def next_batch():
            x, y = next(batches)
            return torch.from_numpy(x).to(device, non_blocking=True), torch.from_numpy(y).to(device, non_blocking=True)

        self.sums += gan_step(self.g_engine, self.d_engine, next_batch, self.model_config, t.n_critic, t.batch_size,
                              t.gp_weight, device, self.dtype)
        self.ema.update(self.g_engine.module, decay=ema_decay(t.ema_decay, state["step"] + 1))
        self.counted += 1
        state["images"] += self.images_per_step

    def log_train(self, step: int, seconds_per_step: float) -> dict:
        t, w, kind = self.t, self.worker, self.model_config.loss
        means = mean_stats(self.sums, self.counted, w.world, step, ("d_loss", "g_loss"),
                           "lower train.lr_g / train.lr_d")
        dt = seconds_per_step
        w.logger.scalars(step, {"train/d_loss": means[0], "train/g_loss": means[1], "train/d_real": means[2],
                                "train/d_fake": means[3], "train/gradient_penalty": means[4] if kind == "wgan-gp"
                                else None, "perf/images_per_s": self.images_per_step / dt, "perf/step_time_s": dt})
        w.logger.progress(step, {"d_loss": f"{means[0]:.4f}", "g_loss": f"{means[1]:.4f}",
                                 "img/s": f"{self.images_per_step / dt:,.0f}"})
        self.collapsed_logs = self.collapsed_logs + 1 if kind != "wgan-gp" and means[0] < COLLAPSE_D_LOSS else 0
        if t.collapse_patience and self.collapsed_logs >= t.collapse_patience:
            raise GANTrainingError(
                f"the discriminator's loss has stayed below {COLLAPSE_D_LOSS} for {self.collapsed_logs} log intervals "
                f"by step {step}: the generator has collapsed (lower train.lr_d, or try model.loss=hinge / "
                "wgan-gp); the last checkpoint is intact")
        self.sums, self.counted = torch.zeros_like(self.sums), 0
        return {"d_loss": means[0], "g_loss": means[1], "images_per_s": self.images_per_step / dt}

    def samples(self, step: int) -> None:
        if self.worker.rank != 0:
            return
        mcfg, logger = self.model_config, self.worker.logger
        with torch.no_grad():
            imgs = self.ema.module(self.fixed_z, self.fixed_labels)
        log_grid(self.worker, step, "samples/ema_generator", imgs, nrow=mcfg.num_classes if mcfg.num_classes and
                 self.t.sample_grid % mcfg.num_classes == 0 else None, png=f"step_{step:08d}.png")
        diversity = imgs.float().std(dim=0).mean().item()  # ~0 when every sample is the same image
        logger.scalars(step, {"samples/diversity": diversity})
        if diversity < 0.02:
            say(f"warning: step {step}: the fixed-noise samples are nearly identical (diversity {diversity:.4f})"
                " - mode collapse?")

    def evaluate(self) -> dict:
        if self.evaluator is None:
            return {}
        return generator_quality(self.evaluator, self.ema.module, self.model_config, self.t.seed)

    def log_eval(self, step: int, metrics: dict) -> None:
        if not metrics:
            return
        self.worker.logger.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        say(quality_line(step, metrics))

    def write_meta(self, meta_dir: str) -> None:
        super().write_meta(meta_dir)
        torch.save(self.ema.state_dict(), os.path.join(meta_dir, EMA_FILE))

    def export(self, state: dict) -> str:
        """Check the replicas' weights are equal, then rank 0 writes the EMA generator's export."""
        w = self.worker
        check_replicas({"generator": self.g_engine.module, "discriminator": self.d_engine.module}, w.device, w.world,
                       w.rank)
        if w.rank == 0:
            write_gan_export(export_location(w.run_uri), self.ema.module.state_dict(), self.model_config,
                             self.recipe_yaml, state["step"])
        return "the EMA generator"
