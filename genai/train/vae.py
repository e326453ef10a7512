"""VAE training: the plan made on the driver (no Ray) and the family the training skeleton (genai/train/loop.py)
runs in every Ray Train worker.

One DeepSpeed engine holds the encoder and decoder; a step minimises recon + beta * KL on one batch of streamed
images. Evaluation is the negative ELBO (beta 1) on held-out images, and with a digit classifier the Frechet
distance and label agreement of the prior's samples, as for GANs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cluster.deepspeed_config import gan_engine_config, resolve_precision
from genai.config import VAERecipe
from genai.data.image_dataset import ImageManifest, load_image_arrays, verify_image_shards
from genai.data.shards import DatasetError
from genai.export import write_image_export
from genai.models.vae import VAE, VAEConfig, num_params, vae_loss
from genai.run import SAMPLES_DIR, export_location
from genai.train.checkpoint import master_weights
from genai.train.family import Family
from genai.train.images import (QualityEval, adam_engine, check_classifier, check_replicas, engine_dtype,
                                image_stream, interleave, log_grid, mean_stats, plan_image_dataset, quality_line,
                                set_adam)
from genai.train.tracking import say

ROWS_PER_FETCH = 1024
EVAL_BATCH = 500
STATS = ("loss", "recon", "kl", "nelbo")


@dataclass
class VAEPlan:
    """Everything the workers need, checked on the driver before any cluster time is spent."""

    recipe: VAERecipe
    data_uri: str
    manifest: ImageManifest
    model_config: VAEConfig
    ds_config: dict

    def loop_config(self, run_uri: str) -> dict:
        return {"recipe": self.recipe.model_dump(mode="json"), "model_config": self.model_config.to_dict(),
                "ds_configs": {"model": self.ds_config}, "data_uri": self.data_uri, "run_uri": run_uri,
                "rows_per_worker": self.manifest.rows_per_worker("train", self.recipe.cluster.num_workers)}

    def dataset_uris(self) -> dict[str, list[str]]:
        return {"train": self.manifest.shard_uris("train")}

    def verify_data(self) -> None:
        verify_image_shards(self.manifest)


def plan_vae_run(recipe: VAERecipe, log=print) -> VAEPlan:
    """Resolve the image dataset (preparing it into the cache if needed) and check it fits the recipe."""
    t, c, m = recipe.train, recipe.cluster, recipe.model
    data_uri, manifest = plan_image_dataset(recipe.data, m.image_size, m.channels, m.conditional, log=log)
    rows = manifest.rows_per_worker("train", c.num_workers)
    if rows // t.batch_size < 1:
        raise DatasetError(f"{data_uri}: {rows} training images per worker are too few for train.batch_size="
                           f"{t.batch_size}")
    check_classifier(t.classifier)
    model_config = VAEConfig(image_size=m.image_size, channels=m.channels, z_dim=m.z_dim, width=m.width,
                             hidden=m.hidden, num_classes=manifest.num_classes if m.conditional else 0, beta=m.beta,
                             likelihood=m.likelihood, sigma=m.sigma)
    return VAEPlan(recipe, data_uri, manifest, model_config,
                   gan_engine_config(recipe.deepspeed, t, t.lr, c.num_workers, c.use_gpu))


def as_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 images [N, C, H, W] as float32 in [-1, 1] (as the training batches are decoded)."""
    return torch.from_numpy(images).float() / 127.5 - 1.0


class VAEFamily(Family):
    """A VAE on one DeepSpeed engine: streamed images, ELBO terms, prior samples and reconstructions, the negative
    ELBO on held-out images (and the digit-feature metrics with a classifier), the VAE's export."""

    kind, job, counter = "vae", "jobs/train.py", "images"
    rows_per_fetch, prefetch_batches, batches_per_step = ROWS_PER_FETCH, 2, 1
    plan = staticmethod(plan_vae_run)

    @staticmethod
    def summary(run, metrics: dict) -> tuple[str, list[str]]:
        parts = [f"{key} {metrics[key]:.{digits}f}" for key, digits in
                 (("val_nelbo", 2), ("fd", 2), ("label_agreement", 3), ("loss", 2)) if isinstance(metrics.get(key), float)]
        return ("".join(f", {p}" for p in parts),
                [f"samples:     {run.join(SAMPLES_DIR).uri}",
                 f"generate:    python jobs/generate.py --checkpoint {run.uri} --num 64 --out samples.png",
                 f"reconstruct: python jobs/generate.py --checkpoint {run.uri} --input digit.png --out recon.png"])

    def build(self) -> dict:
        t = self.t
        self.model_config = VAEConfig(**self.cfg["model_config"])
        net = VAE(self.model_config)
        self.n_params = num_params(net)  # before deepspeed.initialize, which may partition the parameters
        self.engine = adam_engine(net, self.cfg["ds_configs"]["model"], t.lr, (t.beta1, t.beta2))
        self.dtype = engine_dtype(self.cfg["ds_configs"]["model"])
        return {"model": self.engine}

    def new_state(self) -> dict:
        return {"kind": "vae", "step": 0, "epoch": 0, "epoch_step": 0, "images": 0}

    def rebase(self) -> None:
        set_adam([self.engine], self.t.lr, (self.t.beta1, self.t.beta2))

    def describe(self) -> str:
        t, w, mcfg = self.t, self.worker, self.model_config
        return (f"model: VAE {self.n_params / 1e6:.2f}M parameters, z_dim {mcfg.z_dim}, {mcfg.likelihood} likelihood, "
                f"beta {mcfg.beta}{', class-conditional' if mcfg.num_classes else ''}; {w.world} worker(s), ZeRO-"
                f"{self.recipe.deepspeed.zero_stage}, {resolve_precision(t.precision, self.recipe.cluster.use_gpu)}, "
                f"device {w.device.type}")

    def prepare(self) -> None:
        t, w = self.t, self.worker
        self.evaluator = self.val = None
        if w.rank == 0:
            self.evaluator = QualityEval(t.classifier, self.cfg["data_uri"], t.eval_samples, w.device) \
                if t.classifier else None
            images, labels = load_image_arrays(self.cfg["data_uri"], "val", limit=max(t.eval_samples, t.sample_grid))
            self.val = (as_unit(images).to(w.device), torch.from_numpy(labels).to(w.device))
        self.sums = torch.zeros(len(STATS), dtype=torch.float64, device=w.device)
        self.counted = 0
        self.images_per_step = t.batch_size * w.world

    def epoch_steps(self, epoch: int) -> int:
        return self.cfg["rows_per_worker"] // self.t.batch_size

    def open_epoch(self, epoch: int, rows):
        mcfg = self.model_config
        return image_stream(rows.epoch(), mcfg.image_size, mcfg.channels, self.t.batch_size, self.t.seed, epoch,
                            self.worker.rank, self.recipe.data.shuffle_buffer)

    def _labels(self, labels: torch.Tensor) -> torch.Tensor | None:
        return labels if self.model_config.num_classes else None

    def step(self, batches, state: dict) -> None:
        device = self.worker.device
        x, y = next(batches)
        x = torch.from_numpy(x).to(device, non_blocking=True)
        y = torch.from_numpy(y).to(device, non_blocking=True)
        terms = vae_loss(self.engine(x.to(self.dtype), self._labels(y)), x, self.model_config)
        self.engine.backward(terms["loss"])
        self.engine.step()
        self.sums += torch.stack([terms[k].detach() for k in STATS]).double()
        self.counted += 1
        state["images"] += self.images_per_step

    def log_train(self, step: int, seconds_per_step: float) -> dict:
        w, dt = self.worker, seconds_per_step
        loss, recon, kl, nelbo = mean_stats(self.sums, self.counted, w.world, step, STATS,
                                            "lower train.lr, or raise model.sigma")
        w.logger.scalars(step, {"train/loss": loss, "train/recon": recon, "train/kl": kl, "train/nelbo": nelbo,
                                "perf/images_per_s": self.images_per_step / dt, "perf/step_time_s": dt})
        w.logger.progress(step, {"elbo": f"{-nelbo:.2f}", "recon": f"{recon:.2f}", "kl": f"{kl:.2f}",
                                 "img/s": f"{self.images_per_step / dt:,.0f}"})
        self.sums, self.counted = torch.zeros_like(self.sums), 0
        return {"loss": loss, "recon": recon, "kl": kl, "images_per_s": self.images_per_step / dt}

    def samples(self, step: int) -> None:
        if self.worker.rank != 0:
            return
        t, vae, mcfg = self.t, self.engine.module, self.model_config
        fixed = torch.Generator(device=self.worker.device).manual_seed(t.seed)
        nrow = mcfg.num_classes if mcfg.num_classes and t.sample_grid % mcfg.num_classes == 0 else None
        log_grid(self.worker, step, "samples/prior", vae.sample(t.sample_grid, generator=fixed), nrow,
                 png=f"step_{step:08d}.png")
        pairs = min(t.sample_grid // 2, len(self.val[0]))
        x, y = self.val[0][:pairs], self.val[1][:pairs]
        recon = vae.reconstruct(x.to(self.dtype), self._labels(y))
        log_grid(self.worker, step, "samples/reconstructions", interleave(x, recon), nrow=2 * min(8, pairs))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Rank 0: the negative ELBO and its terms on held-out images (one seeded draw of z each), and the
        digit-feature metrics of the prior's samples with a classifier."""
        if self.val is None:
            return {}
        vae, t = self.engine.module, self.t
        gen = torch.Generator(device=self.worker.device).manual_seed(t.seed)
        images, labels = self.val[0][:t.eval_samples], self.val[1][:t.eval_samples]
        totals = torch.zeros(3, dtype=torch.float64)
        for i in range(0, len(images), EVAL_BATCH):
            x, y = images[i:i + EVAL_BATCH], labels[i:i + EVAL_BATCH]
            terms = vae_loss(vae(x.to(self.dtype), self._labels(y), generator=gen), x, self.model_config)
            totals += torch.tensor([terms[k].item() for k in ("nelbo", "recon", "kl")], dtype=torch.float64) * len(x)
        nelbo, recon, kl = (totals / len(images)).tolist()
        out = {"val_nelbo": nelbo, "val_recon": recon, "val_kl": kl}
        if self.evaluator is not None:
            out.update(self.evaluator(lambda n, y, g: vae.sample(n, y, generator=g), self.model_config.num_classes,
                                      t.seed))
        return out

    def log_eval(self, step: int, metrics: dict) -> None:
        if not metrics:
            return
        self.worker.logger.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        say(f"step {step}: held-out negative ELBO {metrics['val_nelbo']:.2f} nats (reconstruction "
            f"{metrics['val_recon']:.2f}, KL {metrics['val_kl']:.2f})")
        if "fd" in metrics:
            say(quality_line(step, metrics))

    def export(self, state: dict) -> str:
        """Check the replicas' weights are equal, then rank 0 writes the VAE's fp32 weights."""
        w = self.worker
        check_replicas({"model": self.engine.module}, w.device, w.world, w.rank)
        weights = master_weights(self.engine, w.rank)
        if w.rank == 0:
            write_image_export(export_location(w.run_uri), "vae", weights, self.model_config, self.recipe_yaml,
                               state["step"])
        return "the VAE"
