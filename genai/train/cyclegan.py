"""Unpaired image-to-image translation (CycleGAN): the plan made on the driver (no Ray) and the family the training
skeleton (genai/train/loop.py) runs in every Ray Train worker.

Four DeepSpeed engines, one per network: generators g_ab (A -> B) and g_ba (B -> A), discriminators d_a and d_b.
The generators' loss (adversarial, cycle and identity terms) depends on both generators, and ZeRO-2 reduces an
engine's gradients from hooks that only its own backward completes; so each generator takes its gradient in a pass
of its own, the other generator's and both discriminators' parameters frozen (their bare modules), and both step
after both passes. Each discriminator then trains on real images and on generated ones from its history pool (each
rank's pools are saved with its RNG, so a resume is exact). Both domains are held in memory by every worker: the
images of step s on rank r are batch s * world + r of a seeded draw, as for super-resolution.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from cluster.deepspeed_config import gan_engine_config, resolve_precision
from genai.config import ConfigError, CycleGANRecipe
from genai.data.image_dataset import DIGITS_SIZE, load_image_arrays, load_image_manifest, verify_image_shards
from genai.data.sr_pairs import seed_for
from genai.eval.translation import translation_metrics
from genai.export import write_image_export
from genai.models.cyclegan import (CycleGANConfig, CycleOutputs, Generator, ImagePool, PatchDiscriminator,
                                   discriminator_loss_terms, generator_loss_terms, init_weights, num_params)
from genai.run import SAMPLES_DIR, export_location
from genai.train.checkpoint import master_weights
from genai.train.family import Family
from genai.train.images import (ENDLESS, BatchIndices, adam_engine, check_classifier, check_replicas, engine_dtype,
                                interleave, log_grid, mean_stats, set_adam)
from genai.train.tracking import say

STATS = ("loss", "adv_ab", "adv_ba", "cycle_a", "cycle_b", "identity_a", "identity_b", "d_a", "d_b")
GENERATORS, DISCRIMINATORS = ("g_ab", "g_ba"), ("d_a", "d_b")
SAMPLE_ROWS = 8  # held-out images of each domain in the sample grids (original, translated, back)


@dataclass
class DomainsManifest:
    """What the run records of its two domains (the dataset identity of genai/run.py)."""

    raw: dict
    manifests: list = field(default_factory=list)  # the two prepared datasets' manifests (none for the builtin pair)


@dataclass
class CycleGANPlan:
    """Everything the workers need, checked on the driver before any cluster time is spent."""

    recipe: CycleGANRecipe
    data_uri: str
    manifest: DomainsManifest
    model_config: CycleGANConfig
    ds_configs: dict[str, dict]
    train_images: int  # images of the smaller domain's training split

    def loop_config(self, run_uri: str) -> dict:
        return {"recipe": self.recipe.model_dump(mode="json"), "model_config": self.model_config.to_dict(),
                "ds_configs": self.ds_configs, "data_uri": self.data_uri, "run_uri": run_uri}

    def dataset_uris(self) -> dict[str, list[str]]:
        return {}  # every worker holds both domains (digit-sized images)

    def verify_data(self) -> None:
        for manifest in self.manifest.manifests:
            verify_image_shards(manifest)


def load_domains(data, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(A images, A labels, B images, B labels) of a split, images uint8 [N, C, H, W]: the builtin pair, or the
    recipe's two prepared datasets."""
    if data.domain_a is None:
        from genai.data.digit_domains import builtin_digit_domains

        d = builtin_digit_domains(split, data.style, data.val_fraction)
        return d.a_images, d.a_labels, d.b_images, d.b_labels
    return (*load_image_arrays(data.domain_a, split), *load_image_arrays(data.domain_b, split))


def plan_cyclegan_run(recipe: CycleGANRecipe, log=print) -> CycleGANPlan:
    """Check the two domains against the model and the batch size."""
    d, t, c, m = recipe.data, recipe.train, recipe.cluster, recipe.model
    if d.domain_a is None:
        data_uri = f"builtin:digits/{d.style}"
        sizes = {"data.domain_a": (DIGITS_SIZE, 1), "data.domain_b": (DIGITS_SIZE, 1)}
        a, _, b, _ = load_domains(d, "train")
        # The content identity of the pair (dataset_fingerprint reads the splits' rows and checksums).
        manifest = DomainsManifest({"kind": "digit-domains", "style": d.style, "splits": {
            name: {"shards": [{"rows": len(x), "sha256": hashlib.sha256(x.tobytes()).hexdigest()}]}
            for name, x in (("a_train", a), ("b_train", b))}})
        counts = (len(a), len(b))
    else:
        data_uri = f"{d.domain_a} + {d.domain_b}"
        manifests = [load_image_manifest(d.domain_a), load_image_manifest(d.domain_b)]
        for man in manifests:
            verify_image_shards(man)
        sizes = {f"data.{k}": (man.height, man.channels) for k, man in zip(("domain_a", "domain_b"), manifests)}
        if any(man.height != man.width for man in manifests):
            raise ConfigError(f"{data_uri}: square images only")
        manifest = DomainsManifest({"kind": "image-pair", "splits": {
            f"{domain}_{split}": man.raw["splits"][split] for domain, man in zip("ab", manifests)
            for split in ("train", "val")}}, manifests)
        counts = tuple(man.splits["train"].rows for man in manifests)
    for (key, (size, channels)), want in zip(sizes.items(), (m.channels_a, m.channels_b)):
        where = d.domain_a if key.endswith("_a") else d.domain_b
        where = where or f"the builtin {'digits' if key.endswith('_a') else d.style + ' digits'}"
        if size != m.image_size:
            raise ConfigError(f"model.image_size={m.image_size}, but {key} ({where}) holds {size}x{size} images")
        if channels != want:
            raise ConfigError(f"model.channels_{key[-1]}={want}, but {key} ({where}) holds {channels}-channel images")
    if min(counts) < t.batch_size:
        raise ConfigError(f"{data_uri}: {min(counts)} training images in a domain are too few for train.batch_size="
                          f"{t.batch_size}")
    check_classifier(t.classifier)
    model_config = CycleGANConfig(image_size=m.image_size, channels_a=m.channels_a, channels_b=m.channels_b,
                                  ngf=m.ngf, ndf=m.ndf, blocks=m.blocks, d_layers=m.d_layers,
                                  lambda_cycle=m.lambda_cycle, lambda_identity=m.lambda_identity,
                                  pool_size=m.pool_size)
    ds = recipe.deepspeed
    ds_configs = {name: gan_engine_config(ds.generators if name in GENERATORS else ds.discriminators, t, t.lr,
                                          c.num_workers, c.use_gpu) for name in GENERATORS + DISCRIMINATORS}
    return CycleGANPlan(recipe, data_uri, manifest, model_config, ds_configs, min(counts))


def as_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey images repeated to `channels` (a grid of both domains when their channels differ)."""
    return images.expand(-1, channels, -1, -1) if images.shape[1] == 1 and channels > 1 else images


class CycleGANFamily(Family):
    """Two generators and two discriminators on four DeepSpeed engines: unpaired batches of both domains, history
    pools, translation grids, cycle L1 and label preservation, both generators' export."""

    kind, job, counter = "cyclegan", "jobs/train.py", "images"
    rows_per_fetch, prefetch_batches, batches_per_step = 0, 0, 1  # no row stream: the family draws its batches
    plan = staticmethod(plan_cyclegan_run)

    @staticmethod
    def summary(run, metrics: dict) -> tuple[str, list[str]]:
        parts = [f"{key} {metrics[key]:.{digits}f}" for key, digits in
                 (("label_preservation_ab", 3), ("label_preservation_ba", 3), ("cycle_l1_a", 4), ("cycle_l1_b", 4))
                 if isinstance(metrics.get(key), float)]
        return ("".join(f", {p}" for p in parts),
                [f"samples:     {run.join(SAMPLES_DIR).uri}",
                 f"translate:   python jobs/generate.py --checkpoint {run.uri} --input digit.png --out out.png "
                 "[--direction b2a]"])

    def build(self) -> dict:
        t, cfg = self.t, CycleGANConfig(**self.cfg["model_config"])
        self.model_config = cfg
        nets = {"g_ab": Generator(cfg.channels_a, cfg.channels_b, cfg.ngf, cfg.blocks),
                "g_ba": Generator(cfg.channels_b, cfg.channels_a, cfg.ngf, cfg.blocks),
                "d_a": PatchDiscriminator(cfg.channels_a, cfg.ndf, cfg.d_layers),
                "d_b": PatchDiscriminator(cfg.channels_b, cfg.ndf, cfg.d_layers)}
        for net in nets.values():
            init_weights(net)
        self.n_params = {name: num_params(net) for name, net in nets.items()}
        self.engines = {name: adam_engine(net, self.cfg["ds_configs"][name], t.lr, (t.beta1, t.beta2))
                        for name, net in nets.items()}
        self.dtype = engine_dtype(self.cfg["ds_configs"]["g_ab"])
        # Fake B images train d_b, fake A images d_a; each rank's pools draw from their own seeded generators.
        rank = self.worker.rank
        self.pools = {"a": ImagePool(cfg.pool_size, seed_for(t.seed, 2 * rank)),
                      "b": ImagePool(cfg.pool_size, seed_for(t.seed, 2 * rank + 1))}
        return self.engines

    def new_state(self) -> dict:
        return {"kind": "cyclegan", "step": 0, "epoch": 0, "epoch_step": 0, "images": 0}

    def rank_state(self) -> dict:
        return {name: pool.state_dict() for name, pool in self.pools.items()}

    def restore_rank_state(self, state: dict) -> None:
        for name, pool in self.pools.items():
            pool.load_state_dict(state[name])

    def rebase(self) -> None:
        set_adam(self.engines.values(), self.t.lr, (self.t.beta1, self.t.beta2))

    def describe(self) -> str:
        t, w, n, ds = self.t, self.worker, self.n_params, self.recipe.deepspeed
        return (f"models: generators {n['g_ab'] / 1e6:.2f}M + {n['g_ba'] / 1e6:.2f}M, discriminators "
                f"{n['d_a'] / 1e6:.2f}M + {n['d_b'] / 1e6:.2f}M parameters on 4 engines; {w.world} worker(s), ZeRO-"
                f"{ds.generators.zero_stage}/{ds.discriminators.zero_stage}, "
                f"{resolve_precision(t.precision, self.recipe.cluster.use_gpu)}, device {w.device.type}")

    def prepare(self) -> None:
        t, w = self.t, self.worker
        a, _, b, _ = load_domains(self.recipe.data, "train")
        self.train_a, self.train_b = torch.from_numpy(a), torch.from_numpy(b)
        self.val = self.evaluator = None
        if w.rank == 0:
            a, _, b, _ = load_domains(self.recipe.data, "val")
            self.val = (a[:t.eval_samples], b[:t.eval_samples])
            if t.classifier:
                from genai.eval.digits import load_classifier

                self.evaluator = load_classifier(t.classifier, device=str(w.device))
        self.sums = torch.zeros(len(STATS), dtype=torch.float64, device=w.device)
        self.counted = 0
        self.images_per_step = 2 * t.batch_size * w.world

    def epoch_steps(self, epoch: int) -> int:
        return ENDLESS

    def open_epoch(self, epoch: int, rows) -> BatchIndices:
        return BatchIndices(self.worker.rank, self.worker.world)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index`: images of A and of B drawn independently (unpaired), float in [-1, 1] on the device."""
        gen = torch.Generator().manual_seed(seed_for(self.t.seed, index))
        n = self.t.batch_size
        a = self.train_a[torch.randint(len(self.train_a), (n,), generator=gen)]
        b = self.train_b[torch.randint(len(self.train_b), (n,), generator=gen)]
        return tuple((x.float() / 127.5 - 1.0).to(self.worker.device, self.dtype) for x in (a, b))

    def _generator_pass(self, trained: str, real_a: torch.Tensor, real_b: torch.Tensor) -> dict:
        """The generators' loss with only `trained`'s parameters taking gradients, backpropagated through its
        engine; returns its terms."""
        e, cfg = self.engines, self.model_config
        frozen = [e[name].module for name in (*GENERATORS, *DISCRIMINATORS) if name != trained]
        for module in frozen:
            module.requires_grad_(False)
        try:
            ab = e["g_ab"] if trained == "g_ab" else e["g_ab"].module
            ba = e["g_ba"] if trained == "g_ba" else e["g_ba"].module
            fake_b, fake_a = ab(real_a), ba(real_b)
            identity = cfg.lambda_identity > 0
            out = CycleOutputs(fake_b, ba(fake_b), fake_a, ab(fake_a), ba(real_a) if identity else None,
                               ab(real_b) if identity else None)
            terms = generator_loss_terms(out, real_a, real_b, e["d_a"].module(fake_a), e["d_b"].module(fake_b), cfg)
            e[trained].backward(terms["loss"])
        finally:
            for module in frozen:
                module.requires_grad_(True)
        terms["fake_a"], terms["fake_b"] = fake_a.detach(), fake_b.detach()
        return terms

    def step(self, batches, state: dict) -> None:
        e = self.engines
        real_a, real_b = self.batch(next(batches))
        terms = self._generator_pass("g_ab", real_a, real_b)
        self._generator_pass("g_ba", real_a, real_b)
        for name in GENERATORS:
            e[name].step()
        fake_a, fake_b = self.pools["a"].query(terms["fake_a"]), self.pools["b"].query(terms["fake_b"])
        d = discriminator_loss_terms(e["d_a"](real_a), e["d_a"](fake_a), e["d_b"](real_b), e["d_b"](fake_b))
        for name, key in (("d_a", "d_a"), ("d_b", "d_b")):
            # each discriminator's term depends on its own parameters only
            e[name].backward(d[key])
            e[name].step()
        terms.update(d_a=d["d_a"], d_b=d["d_b"])
        self.sums += torch.stack([terms[k].detach().float() for k in STATS]).double()
        self.counted += 1
        state["images"] += self.images_per_step

    def log_train(self, step: int, seconds_per_step: float) -> dict:
        w, dt = self.worker, seconds_per_step
        means = dict(zip(STATS, mean_stats(self.sums, self.counted, w.world, step, STATS, "lower train.lr")))
        w.logger.scalars(step, {**{f"train/{k}": v for k, v in means.items()},
                                "perf/images_per_s": self.images_per_step / dt, "perf/step_time_s": dt})
        w.logger.progress(step, {"g_loss": f"{means['loss']:.4f}",
                                 "cycle": f"{means['cycle_a'] + means['cycle_b']:.4f}",
                                 "d_loss": f"{means['d_a'] + means['d_b']:.4f}",
                                 "img/s": f"{self.images_per_step / dt:,.0f}"})
        self.sums, self.counted = torch.zeros_like(self.sums), 0
        return {"g_loss": means["loss"], "d_a": means["d_a"], "d_b": means["d_b"],
                "images_per_s": self.images_per_step / dt}

    @torch.no_grad()
    def samples(self, step: int) -> None:
        """Rank 0: held-out images of each domain beside their translation and its way back."""
        if self.worker.rank != 0:
            return
        e, channels = self.engines, max(self.model_config.channels_a, self.model_config.channels_b)
        for name, x, there, back in (("a2b", self.val[0], e["g_ab"].module, e["g_ba"].module),
                                     ("b2a", self.val[1], e["g_ba"].module, e["g_ab"].module)):
            x = torch.from_numpy(x[:SAMPLE_ROWS]).float().to(self.worker.device) / 127.5 - 1.0
            moved = there(x.to(self.dtype))
            rows = [as_channels(im.float().clamp(-1, 1), channels) for im in (x, moved, back(moved))]
            log_grid(self.worker, step, f"samples/{name}", interleave(*rows), nrow=6,
                     png=f"{name}_step_{step:08d}.png")

    def evaluate(self) -> dict:
        """Rank 0: the cycle L1 of held-out images of both domains and, with a classifier, label preservation."""
        if self.val is None:
            return {}
        e = self.engines
        return translation_metrics(e["g_ab"].module, e["g_ba"].module, *self.val, self.evaluator,
                                   device=self.worker.device, dtype=self.dtype)

    def log_eval(self, step: int, metrics: dict) -> None:
        if not metrics:
            return
        self.worker.logger.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        labels = (f"; label preservation a2b {100 * metrics['label_preservation_ab']:.1f}%, b2a "
                  f"{100 * metrics['label_preservation_ba']:.1f}%" if "label_preservation_ab" in metrics else "")
        say(f"step {step}: cycle L1 A {metrics['cycle_l1_a']:.4f}, B {metrics['cycle_l1_b']:.4f}{labels}")

    def export(self, state: dict) -> str:
        """Check the replicas' weights are equal, then rank 0 writes both generators' fp32 weights (as one
        CycleGenerators state dict: ab.*, ba.*)."""
        w, e = self.worker, self.engines
        check_replicas({name: e[name].module for name in GENERATORS + DISCRIMINATORS}, w.device, w.world, w.rank)
        weights = {prefix: master_weights(e[name], w.rank) for prefix, name in (("ab", "g_ab"), ("ba", "g_ba"))}
        if w.rank == 0:
            state_dict = {f"{prefix}.{k}": v for prefix, part in weights.items() for k, v in part.items()}
            write_image_export(export_location(w.run_uri), "cyclegan", state_dict, self.model_config,
                               self.recipe_yaml, state["step"])
        return "both generators"
