"""GAN training: the plan made on the driver (no Ray) and the loop run by every Ray Train worker.

Two DeepSpeed engines, one per network, each with its own optimizer and ZeRO stage. The generator's
step runs through the discriminator with the discriminator's parameters frozen, so the generator's
backward does not fire the discriminator's ZeRO gradient hooks (which would reduce its gradients a
second time). A step is one generator update after `n_critic` discriminator updates.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass

import torch

from cluster.deepspeed_config import gan_engine_config, resolve_precision
from cluster.storage import StorageError, resolve
from genai.config import ConfigError, GANRecipe, recipe_to_yaml
from genai.data.batches import ExampleStream
from genai.data.image_dataset import (ImageManifest, ensure_image_dataset, images_from_batch, load_image_arrays,
                                      load_image_manifest, verify_image_shards)
from genai.data.shards import DatasetError
from genai.models.gan import EMA, GANConfig, Discriminator, Generator, init_weights, num_params
from genai.sampling import EMA_FILE, EXPORT_DIR, EXPORT_INDEX, image_grid, png_bytes
from genai.train.checkpoint import restore, save_and_report, start_checkpoint
from genai.train.interrupt import StopFlag
from genai.train.steps import gan_step, run_epochs
from genai.train.tracking import RunLogger, say
from genai.train.worker import EpochRows, init_worker

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


def export_generator(ema: EMA, model_config: GANConfig, run_uri: str, recipe_yaml: str, step: int) -> None:
    """Write `<run>/export/`: the EMA generator's fp32 weights, its config and the recipe; the index last."""
    out = resolve(run_uri).join(EXPORT_DIR)
    buf = io.BytesIO()
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in ema.module.state_dict().items()}, buf)
    out.join("generator.pt").write_bytes(buf.getvalue())
    out.join("model_config.json").write_text(json.dumps(model_config.to_dict(), indent=2))
    out.join("recipe.yaml").write_text(recipe_yaml)
    out.join(EXPORT_INDEX).write_text(json.dumps(
        {"kind": "gan", "weights": "generator.pt", "model_config": "model_config.json", "recipe": "recipe.yaml",
         "step": step, "dtype": "float32", "ema": True}, indent=2))


def train_loop_per_worker(cfg: dict) -> None:
    """Runs in each Ray Train worker: two DeepSpeed engines, streamed images, eval, samples, checkpoints."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    recipe = GANRecipe.model_validate(cfg["recipe"])
    t, c = recipe.train, recipe.cluster
    rank, world, device = init_worker(c.torch_threads, cfg.get("console"), cfg["run_uri"])
    train_rows = EpochRows(ray.train.get_dataset_shard("train"), ROWS_PER_FETCH, prefetch_batches=2)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    mcfg = GANConfig(**cfg["model_config"])
    G, D = Generator(mcfg), Discriminator(mcfg)
    init_weights(G)
    init_weights(D)
    # Counted before deepspeed.initialize, which may partition the parameters.
    n_g, n_d = num_params(G), num_params(D)
    engines = {}
    for name, net, lr in (("generator", G, t.lr_g), ("discriminator", D, t.lr_d)):
        ds_config = cfg["ds_configs"][name]
        opt = None
        if "optimizer" not in ds_config:  # with optimizer offload DeepSpeed builds its CPU Adam
            opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(t.beta1, t.beta2))
        engines[name], _, _, _ = deepspeed.initialize(
            model=net, optimizer=opt, model_parameters=None if opt else net.parameters(), config=ds_config)
    g_engine, d_engine = engines["generator"], engines["discriminator"]
    dtype = _dtype(cfg["ds_configs"]["generator"])
    ema = EMA(g_engine.module, t.ema_decay)
    ema.module.float()

    state = {"kind": "gan", "step": 0, "epoch": 0, "epoch_step": 0, "images": 0, "world_size": world}

    def load_ema(folder: str) -> None:
        ema.load_state_dict(torch.load(os.path.join(folder, "meta", EMA_FILE), map_location=device))

    checkpoint = start_checkpoint(cfg)
    if checkpoint:
        restored, restore_s = restore(checkpoint, engines, rank, world, load_extra=load_ema)
        state.update(restored)
        for engine, lr in ((g_engine, t.lr_g), (d_engine, t.lr_d)):  # the recipe's rates and betas win over the saved
            for group in engine.optimizer.param_groups:
                group["lr"], group["betas"] = lr, (t.beta1, t.beta2)
    else:
        torch.manual_seed(t.seed + 1000 * rank)  # each rank draws its own noise
    resumed_step = state["step"]

    logger = RunLogger(cfg["run_uri"], rank, resumed_step, t.max_steps)
    if checkpoint:
        logger.scalars(resumed_step, {"perf/restore_s": restore_s})
    if rank == 0 and resumed_step == 0:
        say(f"models: generator {n_g / 1e6:.2f}M, discriminator {n_d / 1e6:.2f}M parameters; {mcfg.loss} loss"
              f"{', class-conditional' if mcfg.num_classes else ''}; {world} worker(s), ZeRO-"
              f"{recipe.deepspeed.generator.zero_stage}/{recipe.deepspeed.discriminator.zero_stage}, "
              f"{resolve_precision(t.precision, c.use_gpu)}, device {device.type}")
    recipe_yaml = recipe_to_yaml(recipe)
    run = resolve(cfg["run_uri"])

    def write_meta(meta_dir: str) -> None:
        os.makedirs(meta_dir, exist_ok=True)
        with open(os.path.join(meta_dir, "model_config.json"), "w") as f:
            json.dump(mcfg.to_dict(), f, indent=2)
        with open(os.path.join(meta_dir, "recipe.yaml"), "w") as f:
            f.write(recipe_yaml)
        torch.save(ema.state_dict(), os.path.join(meta_dir, EMA_FILE))

    evaluator = QualityEval(t.classifier, cfg["data_uri"], t.eval_samples, device) if t.classifier and rank == 0 \
        else None
    fixed = torch.Generator(device=device).manual_seed(t.seed)
    fixed_z = torch.randn(t.sample_grid, mcfg.z_dim, generator=fixed, device=device)
    fixed_labels = torch.arange(t.sample_grid, device=device) % mcfg.num_classes if mcfg.num_classes else None

    def samples(step: int) -> float:
        with torch.no_grad():
            imgs = ema.module(fixed_z, fixed_labels)
        grid = image_grid(imgs, nrow=mcfg.num_classes if mcfg.num_classes and t.sample_grid % mcfg.num_classes == 0
                          else None)
        logger.image(step, "samples/ema_generator", grid)
        run.join("samples", f"step_{step:08d}.png").write_bytes(png_bytes(grid))
        return imgs.float().std(dim=0).mean().item()  # ~0 when every sample is the same image

    kind = mcfg.loss
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # d_loss, g_loss, real score, fake score, gp
    counted, collapsed_logs = 0, 0
    last: dict = {}
    step_t0, steps_timed = time.perf_counter(), 0
    images_per_step = t.batch_size * t.n_critic * world

    def at_step_end(step: int, stopping: bool) -> None:
        nonlocal sums, counted, collapsed_logs, step_t0, steps_timed
        save = stopping or step % t.checkpoint_interval == 0 or step == t.max_steps
        metrics: dict = {}
        if step % t.log_interval == 0 or save:
            dist.all_reduce(sums)
            means = (sums / max(1, counted * world)).tolist()
            if not all(map(lambda v: v == v and abs(v) != float("inf"), means)):
                raise GANTrainingError(f"losses are not finite by step {step} (d_loss {means[0]}, g_loss {means[1]}); "
                                       "the last checkpoint is intact (lower train.lr_g / train.lr_d)")
            dt = (time.perf_counter() - step_t0) / max(1, steps_timed)
            metrics.update(d_loss=means[0], g_loss=means[1], images_per_s=images_per_step / dt)
            logger.scalars(step, {"train/d_loss": means[0], "train/g_loss": means[1], "train/d_real": means[2],
                                  "train/d_fake": means[3], "train/gradient_penalty": means[4] if kind == "wgan-gp"
                                  else None, "perf/images_per_s": images_per_step / dt, "perf/step_time_s": dt})
            logger.progress(step, {"d_loss": f"{means[0]:.4f}", "g_loss": f"{means[1]:.4f}",
                                   "img/s": f"{images_per_step / dt:,.0f}"})
            collapsed_logs = collapsed_logs + 1 if kind != "wgan-gp" and means[0] < COLLAPSE_D_LOSS else 0
            if t.collapse_patience and collapsed_logs >= t.collapse_patience:
                raise GANTrainingError(
                    f"the discriminator's loss has stayed below {COLLAPSE_D_LOSS} for {collapsed_logs} log intervals "
                    f"by step {step}: the generator has collapsed (lower train.lr_d, or try model.loss=hinge / "
                    "wgan-gp); the last checkpoint is intact")
            sums, counted = torch.zeros_like(sums), 0
        if t.sample_interval and (step % t.sample_interval == 0 or step == t.max_steps) and rank == 0:
            diversity = samples(step)
            logger.scalars(step, {"samples/diversity": diversity})
            if diversity < 0.02:
                say(f"warning: step {step}: the fixed-noise samples are nearly identical (diversity {diversity:.4f})"
                      " - mode collapse?")
        if step % t.eval_interval == 0 or step == t.max_steps:
            if evaluator is not None:
                q = evaluator(ema.module, mcfg, t.seed)
                last.update(q)
                logger.scalars(step, {f"eval/{k}": v for k, v in q.items()})
                say(f"step {step}: digit-feature Frechet distance {q['fd']:.2f} (held-out real digits "
                      f"{q['fd_real']:.2f})" + (f", label agreement {100 * q['label_agreement']:.1f}%"
                                                if "label_agreement" in q else ""))
        if save or step % t.eval_interval == 0:
            metrics.update(step=step, epoch=state["epoch"], images=state["images"], **last)
            logger.flush()
            if save:
                logger.scalars(step, {"perf/checkpoint_s": save_and_report(engines, dict(state), metrics, rank,
                                                                           write_meta)})
            else:
                ray.train.report(metrics)
        if metrics:
            step_t0, steps_timed = time.perf_counter(), 0

    manifest_dims = (mcfg.image_size, mcfg.image_size, mcfg.channels)

    def decode(batch):
        return images_from_batch(batch, *manifest_dims)

    def to_device(array):
        return torch.from_numpy(array).to(device, non_blocking=True)

    def train_step(batches) -> None:
        nonlocal sums, counted, steps_timed

        def next_batch():
            x, y = next(batches)
            return to_device(x), to_device(y)

        sums += gan_step(g_engine, d_engine, next_batch, mcfg, t.n_critic, t.batch_size, t.gp_weight, device, dtype)
        ema.update(g_engine.module, decay=ema_decay(t.ema_decay, state["step"] + 1))
        counted += 1
        state["images"] += images_per_step
        steps_timed += 1

    def open_epoch(epoch: int) -> ExampleStream:
        return ExampleStream(train_rows.epoch(), decode, t.batch_size, t.seed, epoch, rank, recipe.data.shuffle_buffer)

    n_steps = steps_per_epoch(cfg["rows_per_worker"], t.batch_size, t.n_critic)
    stopped = run_epochs(state, t.max_steps, lambda _: n_steps, open_epoch, t.n_critic, train_step, at_step_end,
                         StopFlag(cfg["run_uri"], rank, device, t.log_interval).requested)
    if stopped:
        logger.close()
        if rank == 0:
            say(f"stopped on request after step {state['step']}; its checkpoint is saved")
        return
    if resumed_step >= t.max_steps:  # already complete: report its result again (Tune, the driver's summary)
        if rank == 0:
            say(f"run already complete at step {resumed_step}; refreshing the export")
        final = {"step": resumed_step, "epoch": state["epoch"], "images": state["images"]}
        if evaluator is not None:
            final.update(evaluator(ema.module, mcfg, t.seed))
        ray.train.report(final)
    check_replicas({"generator": g_engine.module, "discriminator": d_engine.module}, device, world, rank)
    if rank == 0:
        export_generator(ema, mcfg, cfg["run_uri"], recipe_yaml, state["step"])
        say(f"exported the EMA generator to {run.join(EXPORT_DIR).uri}")
    logger.close()
