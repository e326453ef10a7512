"""What the image families (gan, vae, sr, cyclegan) share: the image dataset checks of a plan, the digit classifier
check and evaluation, DeepSpeed engines with torch's Adam, image grids into TensorBoard and the run folder, the
training statistics' all-reduce and the replicas' check at the end."""

from __future__ import annotations

from typing import Callable

import torch

from cluster.storage import StorageError, resolve
from genai.config import ConfigError
from genai.data.batches import ExampleStream
from genai.data.image_dataset import (ImageManifest, ensure_image_dataset, images_from_batch, load_image_arrays,
                                      load_image_manifest, verify_image_shards)
from genai.run import SAMPLES_DIR
from genai.sampling import image_grid, png_bytes
from genai.train.tracking import say


class TrainingError(RuntimeError):
    """Training diverged (NaN), collapsed or lost data parallelism; the last checkpoint is intact."""


def plan_image_dataset(data, image_size: int, channels: int, conditional: bool = False,
                       log=print) -> tuple[str, ImageManifest]:
    """The recipe's image dataset (prepared into the cache if needed), checked against the model's image size,
    channels and (when conditional) labels: (its URI, its manifest). Raises ConfigError / DatasetError."""
    data_uri = data.uri or ensure_image_dataset(data.source, data.cache_dir, data.val_fraction, log=log)
    manifest = load_image_manifest(data_uri)
    verify_image_shards(manifest)
    if (manifest.height, manifest.width) != (image_size, image_size):
        raise ConfigError(f"model.image_size={image_size}, but {data_uri} holds {manifest.height}x{manifest.width} "
                          "images (set model.image_size to match, square images only)")
    if manifest.channels != channels:
        raise ConfigError(f"model.channels={channels}, but {data_uri} holds {manifest.channels}-channel images")
    if conditional and manifest.num_classes < 2:
        raise ConfigError(f"model.conditional=true needs labelled images; {data_uri} has no classes")
    return data_uri, manifest


def check_classifier(uri: str | None) -> None:
    """train.classifier, when set, names a folder holding a trained digit classifier."""
    if not uri:
        return
    try:
        if not resolve(uri).join("classifier.json").exists():
            raise ConfigError(f"train.classifier={uri}: no classifier.json there "
                              "(train one with jobs/train_classifier.py)")
    except StorageError as exc:
        raise ConfigError(f"train.classifier: {exc}") from None


def image_stream(rows, image_size: int, channels: int, batch_size: int, seed: int, epoch: int, rank: int,
                 shuffle_buffer: int) -> ExampleStream:
    """A worker's epoch of labelled images: batches of (float32 [B, C, S, S] in [-1, 1], int64 labels [B])."""

    def decode(batch):
        return images_from_batch(batch, image_size, image_size, channels)

    return ExampleStream(rows, decode, batch_size, seed, epoch, rank, shuffle_buffer)


ENDLESS = 2 ** 62  # the epoch of a family that draws its batches without end (sr, cyclegan): max_steps cuts it


class BatchIndices:
    """A worker's endless stream of batch indices, rank, rank + world, ...: for families that draw batch i from a
    seeded sampler in `step` (sr, cyclegan), so that every rank draws different batches and a resumed run, which
    skips the indices of the steps it has trained, draws exactly the batches it would have drawn."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __iter__(self):
        i = self.rank
        while True:
            yield i
            i += self.world

    def drain(self) -> None:
        pass


Sampler = Callable[[int, "torch.Tensor | None", torch.Generator], torch.Tensor]


class QualityEval:
    """Frechet distance in the digit classifier's feature space (generated vs real training digits, beside
    held-out real digits vs the same reference) and, for conditional models, label agreement."""

    def __init__(self, classifier_uri: str, data_uri: str, n: int, device: torch.device):
        from genai.eval.digits import extract_features, feature_stats, frechet_distance, load_classifier

        self.n, self.device = n, device
        self.model = load_classifier(classifier_uri, device=str(device))
        ref, _ = load_image_arrays(data_uri, "train", limit=n)
        held_out, _ = load_image_arrays(data_uri, "val", limit=n)
        self.ref = feature_stats(extract_features(self.model, ref))
        self.baseline = frechet_distance(*self.ref, *feature_stats(extract_features(self.model, held_out)))

    @torch.no_grad()
    def __call__(self, sample: Sampler, num_classes: int, seed: int) -> dict[str, float]:
        """Score `n` images drawn by `sample(count, labels or None, generator)` (in chunks of 500, the labels
        cycling through the classes of a conditional model)."""
        from genai.eval.digits import extract_features, feature_stats, frechet_distance, label_agreement

        gen = torch.Generator(device=self.device).manual_seed(seed)
        labels = torch.arange(self.n, device=self.device) % num_classes if num_classes else None
        images = torch.cat([sample(min(500, self.n - i), None if labels is None else labels[i:i + 500], gen).float()
                            for i in range(0, self.n, 500)])
        out = {"fd": frechet_distance(*self.ref, *feature_stats(extract_features(self.model, images))),
               "fd_real": self.baseline}
        if labels is not None:
            out["label_agreement"] = label_agreement(self.model, images, labels.cpu().numpy())
        return out


def quality_line(step: int, metrics: dict) -> str:
    """The line that says a QualityEval's figures."""
    return (f"step {step}: digit-feature Frechet distance {metrics['fd']:.2f} (held-out real digits "
            f"{metrics['fd_real']:.2f})" + (f", label agreement {100 * metrics['label_agreement']:.1f}%"
                                            if "label_agreement" in metrics else ""))


def engine_dtype(ds_config: dict) -> torch.dtype:
    """The dtype a DeepSpeed config trains in."""
    if ds_config["bf16"]["enabled"]:
        return torch.bfloat16
    return torch.float16 if ds_config["fp16"]["enabled"] else torch.float32


def adam_engine(net: torch.nn.Module, ds_config: dict, lr: float, betas: tuple[float, float]):
    """`net` on a DeepSpeed engine with torch's Adam (with optimizer offload DeepSpeed builds its CPU Adam)."""
    import deepspeed

    opt = None
    if "optimizer" not in ds_config:
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=betas)
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt,
                                           model_parameters=None if opt else net.parameters(), config=ds_config)
    return engine


def set_adam(engines, lr: float, betas: tuple[float, float]) -> None:
    """After a restore: the recipe's learning rate and betas win over the saved ones."""
    for engine in engines:
        for group in engine.optimizer.param_groups:
            group["lr"], group["betas"] = lr, betas


def mean_stats(sums: torch.Tensor, counted: int, world: int, step: int, names: tuple[str, ...],
               hint: str) -> list[float]:
    """The training statistics summed on every rank since the last log, averaged over ranks and steps
    (collective); TrainingError naming them when one is not finite."""
    import torch.distributed as dist

    dist.all_reduce(sums)
    means = (sums / max(1, counted * world)).tolist()
    if not all(v == v and abs(v) != float("inf") for v in means):
        shown = ", ".join(f"{n} {v}" for n, v in zip(names, means))
        raise TrainingError(f"losses are not finite by step {step} ({shown}); the last checkpoint is intact ({hint})")
    return means


def log_grid(worker, step: int, tag: str, images: torch.Tensor, nrow: int | None = None,
             png: str | None = None) -> None:
    """Rank 0: images in [-1, 1] as one grid into TensorBoard under `tag`, and as `<run>/samples/<png>`."""
    if worker.rank != 0:
        return
    grid = image_grid(images, nrow)
    worker.logger.image(step, tag, grid)
    if png:
        resolve(worker.run_uri).join(SAMPLES_DIR, png).write_bytes(png_bytes(grid))


def interleave(*rows: torch.Tensor) -> torch.Tensor:
    """Images of equal shape [N, C, H, W] from several sets, one of each in turn (a grid of side-by-side pairs)."""
    return torch.stack(rows, dim=1).flatten(0, 1)


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
            raise TrainingError(f"{name} weights differ across ranks: {[e.tolist() for e in every]}")
        if rank == 0:
            say(f"{name} weights identical on all {world} rank(s) (digest {every[0][0].item():.6f})")
