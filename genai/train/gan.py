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
from cluster.storage import StorageError, resolve
from genai.config import ConfigError, GANRecipe
from genai.data.batches import ExampleStream
from genai.data.image_dataset import (ImageManifest, ensure_image_dataset, images_from_batch, load_image_arrays,
                                      load_image_manifest, verify_image_shards)
from genai.data.shards import DatasetError
from genai.models.gan import EMA, GANConfig, Discriminator, Generator, init_weights, num_params
from genai.export import write_gan_export
from genai.run import EMA_FILE, META_DIR, SAMPLES_DIR, export_location
from genai.sampling import image_grid, png_bytes
from genai.train.family import Family
from genai.train.steps import gan_step
from genai.train.tracking import say

ROWS_PER_FETCH = 1024
COLLAPSE_D_LOSS = 1e-3  # a discriminator loss this close to 0 means it wins outright: the generator has failed


class GANTrainingError(RuntimeError):
    """Training diverged (NaN) or collapsed; the last checkpoint is intact."""


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
    d, t, c, m = recipe.data, recipe.train, recipe.cluster, recipe.model
    data_uri = d.uri or ensure_image_dataset(d.source, d.cache_dir, d.val_fraction, log=log)
    manifest = load_image_manifest(data_uri)
    verify_image_shards(manifest)
    if (manifest.height, manifest.width) != (m.image_size, m.image_size):
        raise ConfigError(f"model.image_size={m.image_size}, but {data_uri} holds {manifest.height}x{manifest.width} "
                          "images (set model.image_size to match, square images only)")
    if manifest.channels != m.channels:
        raise ConfigError(f"model.channels={m.channels}, but {data_uri} holds {manifest.channels}-channel images")
    if m.conditional and manifest.num_classes < 2:
        raise ConfigError(f"model.conditional=true needs labelled images; {data_uri} has no classes")
    rows = manifest.rows_per_worker("train", c.num_workers)
    if steps_per_epoch(rows, t.batch_size, t.n_critic) < 1:
        raise DatasetError(f"{data_uri}: {rows} training images per worker are too few for train.batch_size="
                           f"{t.batch_size} x train.n_critic={t.n_critic}")
    if t.classifier:
        try:
            if not resolve(t.classifier).join("classifier.json").exists():
                raise ConfigError(f"train.classifier={t.classifier}: no classifier.json there "
                                  "(train one with jobs/train_classifier.py)")
        except StorageError as exc:
            raise ConfigError(f"train.classifier: {exc}") from None
    model_config = GANConfig(image_size=m.image_size, channels=m.channels, z_dim=m.z_dim, ngf=m.ngf, ndf=m.ndf,
                             num_classes=manifest.num_classes if m.conditional else 0, loss=m.loss,
                             spectral_norm=m.spectral_norm)
    ds_configs = {
        "generator": gan_engine_config(recipe.deepspeed.generator, t, t.lr_g, c.num_workers, c.use_gpu),
        "discriminator": gan_engine_config(recipe.deepspeed.discriminator, t, t.lr_d, c.num_workers, c.use_gpu),
    }
    return GANPlan(recipe, data_uri, manifest, model_config, ds_configs)


class QualityEval:
    """Frechet distance in the digit classifier's feature space (generated vs real training digits, beside
    held-out real digits vs the same reference) and, for conditional models, label agreement."""

    def __init__(self, classifier_uri: str, data_uri: str, n: int, device: torch.device):
        from genai.eval.digits import extract_features, feature_stats, frechet_distance, load_classifier

        self.n, self.device = n, device
        self.model = load_classifier(classifier_uri, device=str(device))
        self._features, self._fd = extract_features, frechet_distance
        ref, _ = load_image_arrays(data_uri, "train", limit=n)
        held_out, _ = load_image_arrays(data_uri, "val", limit=n)
        self.ref = feature_stats(extract_features(self.model, ref))
        self.baseline = frechet_distance(*self.ref, *feature_stats(extract_features(self.model, held_out)))

    @torch.no_grad()
    def __call__(self, generator: torch.nn.Module, cfg: GANConfig, seed: int) -> dict[str, float]:
        from genai.eval.digits import feature_stats, label_agreement

        gen = torch.Generator(device=self.device).manual_seed(seed)
        images, labels = [], None
        if cfg.num_classes:
            labels = torch.arange(self.n, device=self.device) % cfg.num_classes
        for i in range(0, self.n, 500):
            z = torch.randn(min(500, self.n - i), cfg.z_dim, generator=gen, device=self.device)
            images.append(generator(z, None if labels is None else labels[i:i + len(z)]).float())
        images = torch.cat(images)
        out = {"fd": self._fd(*self.ref, *feature_stats(self._features(self.model, images))),
               "fd_real": self.baseline}
        if labels is not None:
            out["label_agreement"] = label_agreement(self.model, images, labels.cpu().numpy())
        return out


def ema_decay(decay: float, updates: int) -> float:
    """EMA decay with warm-up, min(decay, (1 + n) / (10 + n)): early on the average follows the generator
    closely instead of mixing in its random initial weights for thousands of steps."""
    return min(decay, (1 + updates) / (10 + updates))


def _dtype(ds_config: dict) -> torch.dtype:
    if ds_config["bf16"]["enabled"]:
        return torch.bfloat16
    return torch.float16 if ds_config["fp16"]["enabled"] else torch.float32


def _param_digest(module: torch.nn.Module, device) -> torch.Tensor:
    """(sum, sum of squares, weighted sum) of all parameters, in float64: equal on ranks holding equal weights."""
    flat = torch.cat([p.detach().double().flatten() for p in module.parameters()]).to(device)
    idx = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=device)
    return torch.stack([flat.sum(), (flat * flat).sum(), (flat * idx).sum() / flat.numel()])


def check_replicas(modules: dict[str, torch.nn.Module], device, world: int, rank: int) -> None:
    """Data parallelism keeps every rank's weights equal; check it (cheap digests) and say so."""
    import torch.distributed as dist

    for name, module in modules.items():
        mine = _param_digest(module, device)
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        if any(not torch.allclose(e, every[0], rtol=1e-9, atol=0) for e in every):
            raise GANTrainingError(f"{name} weights differ across ranks: {[e.tolist() for e in every]}")
        if rank == 0:
            say(f"{name} weights identical on all {world} rank(s) (digest {every[0][0].item():.6f})")


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
        import deepspeed

        t = self.t
        self.model_config = mcfg = GANConfig(**self.cfg["model_config"])
        G, D = Generator(mcfg), Discriminator(mcfg)
        init_weights(G)
        init_weights(D)
        # Counted before deepspeed.initialize, which may partition the parameters.
        self.n_g, self.n_d = num_params(G), num_params(D)
        engines = {}
        for name, net, lr in (("generator", G, t.lr_g), ("discriminator", D, t.lr_d)):
            ds_config = self.cfg["ds_configs"][name]
            opt = None
            if "optimizer" not in ds_config:  # with optimizer offload DeepSpeed builds its CPU Adam
                opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(t.beta1, t.beta2))
            engines[name], _, _, _ = deepspeed.initialize(
                model=net, optimizer=opt, model_parameters=None if opt else net.parameters(), config=ds_config)
        self.g_engine, self.d_engine = engines["generator"], engines["discriminator"]
        self.dtype = _dtype(self.cfg["ds_configs"]["generator"])
        self.ema = EMA(self.g_engine.module, t.ema_decay)
        self.ema.module.float()
        return engines

    def new_state(self) -> dict:
        return {"kind": "gan", "step": 0, "epoch": 0, "epoch_step": 0, "images": 0}

    def restore_extra(self, folder: str) -> None:
        self.ema.load_state_dict(torch.load(os.path.join(folder, META_DIR, EMA_FILE), map_location=self.worker.device))

    def rebase(self) -> None:
        t = self.t
        for engine, lr in ((self.g_engine, t.lr_g), (self.d_engine, t.lr_d)):  # the recipe's rates and betas win
            for group in engine.optimizer.param_groups:
                group["lr"], group["betas"] = lr, (t.beta1, t.beta2)

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

    def open_epoch(self, epoch: int, rows) -> ExampleStream:
        mcfg = self.model_config

        def decode(batch):
            return images_from_batch(batch, mcfg.image_size, mcfg.image_size, mcfg.channels)

        return ExampleStream(rows.epoch(), decode, self.t.batch_size, self.t.seed, epoch, self.worker.rank,
                             self.recipe.data.shuffle_buffer)

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
        import torch.distributed as dist

        t, w, kind = self.t, self.worker, self.model_config.loss
        dist.all_reduce(self.sums)
        means = (self.sums / max(1, self.counted * w.world)).tolist()
        if not all(map(lambda v: v == v and abs(v) != float("inf"), means)):
            raise GANTrainingError(f"losses are not finite by step {step} (d_loss {means[0]}, g_loss {means[1]}); "
                                   "the last checkpoint is intact (lower train.lr_g / train.lr_d)")
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
        grid = image_grid(imgs, nrow=mcfg.num_classes if mcfg.num_classes and self.t.sample_grid % mcfg.num_classes == 0
                          else None)
        logger.image(step, "samples/ema_generator", grid)
        resolve(self.worker.run_uri).join(SAMPLES_DIR, f"step_{step:08d}.png").write_bytes(png_bytes(grid))
        diversity = imgs.float().std(dim=0).mean().item()  # ~0 when every sample is the same image
        logger.scalars(step, {"samples/diversity": diversity})
        if diversity < 0.02:
            say(f"warning: step {step}: the fixed-noise samples are nearly identical (diversity {diversity:.4f})"
                " - mode collapse?")

    def evaluate(self) -> dict:
        return self.evaluator(self.ema.module, self.model_config, self.t.seed) if self.evaluator is not None else {}

    def log_eval(self, step: int, metrics: dict) -> None:
        if not metrics:
            return
        self.worker.logger.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        say(f"step {step}: digit-feature Frechet distance {metrics['fd']:.2f} (held-out real digits "
            f"{metrics['fd_real']:.2f})" + (f", label agreement {100 * metrics['label_agreement']:.1f}%"
                                            if "label_agreement" in metrics else ""))

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
