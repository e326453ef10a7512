"""Load a trained model from a run, an export or a checkpoint (local or URI) and sample from it.

Every kind of run (gpt, gan, vae, sr, cyclegan) shares the layout (genai/run.py): `<run>/export/export.json` names
the kind and files; a checkpoint's `trainer_state.json` names its kind and its `meta/` folder holds what sampling
needs (for image runs other than GANs, the engines' shards are consolidated).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass

import torch
import yaml
from safetensors.torch import load as safetensors_load

from cluster.storage import Location, StorageError, resolve
from genai.data.tokenizers import TOKENIZER_FILE, Tokenizer, tokenizer_from_json
from genai.models import DecoderLM, build_model, config_from_dict, generate
from genai.run import (EMA_FILE, EXPORT_INDEX, META_DIR, MODEL_CONFIG_FILE, RECIPE_FILE, TRAINER_STATE,
                       CheckpointError, find_model_source)


@dataclass
class LoadedModel:
    model: DecoderLM  # GPT or Llama
    tokenizer: Tokenizer
    source: str  # the export or checkpoint actually loaded
    step: int | None


def _consolidate(ckpt_dir: str, tag: str, zero_stage: int) -> dict:
    """fp32 weights from DeepSpeed shards: stage 0 from the module file, stages 1-2 from the ranks' fp32
    partitions, stage 3 through zero_to_fp32."""
    if zero_stage == 0:
        states = torch.load(os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    if zero_stage <= 2:
        return _fp32_from_partitions(os.path.join(ckpt_dir, tag))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)


def _fp32_from_partitions(folder: str) -> dict:
    """ZeRO-1/2 fp32 master weights from every rank's optimizer file, each naming the slice of each parameter its
    fp32 partition holds (DeepSpeed's param_slice_mappings). zero_to_fp32 would refuse the files of DeepSpeed's
    BF16_Optimizer, which bf16 ZeRO-1 trains with (fp32 gradient accumulation)."""

    def rank(path: str) -> int:
        return int(re.search(r"pp_rank_(\d+)_", os.path.basename(path)).group(1))

    pieces: dict[str, list[torch.Tensor]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*_optim_states.pt")), key=rank):
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
        for partition, slices in zip(saved["single_partition_of_fp32_groups"], saved["param_slice_mappings"]):
            for name, where in slices.items():
                pieces.setdefault(name, []).append(partition.narrow(0, where.start, where.numel).float())
    model = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    shapes = {name: shape for group in model["param_shapes"] for name, shape in group.items()}
    if set(pieces) != set(shapes) or any(sum(p.numel() for p in pieces[n]) != s.numel() for n, s in shapes.items()):
        raise CheckpointError(f"{folder}: the ranks' fp32 partitions do not cover the model's parameters "
                              "(a rank's optimizer file is missing?)")
    return {name: torch.cat(pieces[name]).view(shape) for name, shape in shapes.items()}


def read_weights(file: Location) -> dict[str, torch.Tensor]:
    """An export's state dict: safetensors, or a torch pickle (GPT exports written before safetensors)."""
    data = file.read_bytes()
    if file.path.endswith(".safetensors"):
        return safetensors_load(data)
    return torch.load(io.BytesIO(data), map_location="cpu")


def load_model(uri: str, device: str = "cpu") -> LoadedModel:
    """Load the model and tokenizer a run produced. Prefers the final export; falls back to the latest checkpoint."""
    kind, loc = find_model_source(uri)
    if kind == "export":
        index = json.loads(loc.join(EXPORT_INDEX).read_text())
        cfg = config_from_dict(json.loads(loc.join(index["model_config"]).read_text()))
        state = read_weights(loc.join(index["weights"]))
        tok = tokenizer_from_json(loc.join(index["tokenizer"]).read_text())
        step = None
    else:
        with tempfile.TemporaryDirectory(prefix="genai-ckpt-") as tmp:
            local = loc.download_to(tmp)
            with open(os.path.join(local, TRAINER_STATE)) as f:
                tstate = json.load(f)
            meta = os.path.join(local, META_DIR)
            with open(os.path.join(meta, MODEL_CONFIG_FILE)) as f:
                cfg = config_from_dict(json.load(f))
            with open(os.path.join(meta, RECIPE_FILE)) as f:
                zero_stage = yaml.safe_load(f)["deepspeed"]["zero_stage"]
            with open(os.path.join(meta, TOKENIZER_FILE)) as f:
                tok = tokenizer_from_json(f.read())
            state = _consolidate(local, tstate["tags"]["model"], zero_stage)
            step = tstate["step"]
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not cfg.tie_embeddings]:  # tied to wte
        raise CheckpointError(f"{loc.uri}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    return LoadedModel(model.to(device).eval(), tok, loc.uri, step)


def sample_text(loaded: LoadedModel, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                seed: int, num_samples: int = 1) -> list[str]:
    """Continue `prompt`; the same seed gives the same text."""
    device = next(loaded.model.parameters()).device
    try:
        ids = loaded.tokenizer.encode(prompt) if prompt else loaded.tokenizer.encode("\n")
    except ValueError as exc:
        raise CheckpointError(f"--prompt: {exc}") from None
    idx = torch.as_tensor(ids, dtype=torch.long, device=device)[None, :].repeat(num_samples, 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(loaded.model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen,
                   vocab_size=loaded.tokenizer.vocab_size)
    return [loaded.tokenizer.decode(row.tolist()) for row in out]



# kind -> (models module, config class, model class, the checkpoint's engines holding it (state-dict prefix -> engine
# name) and the recipe section of their ZeRO stage). A GAN's checkpoint keeps its EMA generator in meta/ instead.
IMAGE_MODELS = {
    "gan": ("genai.models.gan", "GANConfig", "Generator", None, None),
    "vae": ("genai.models.vae", "VAEConfig", "VAE", {"": "model"}, ("deepspeed",)),
    "sr": ("genai.models.sr", "SRConfig", "SRResNet", {"": "generator"}, ("deepspeed", "generator")),
    "cyclegan": ("genai.models.cyclegan", "CycleGANConfig", "CycleGenerators", {"ab.": "g_ab", "ba.": "g_ba"},
                 ("deepspeed", "generators")),
}


@dataclass
class LoadedImageModel:
    model: "torch.nn.Module"
    config: "object"  # GANConfig, VAEConfig, SRConfig or CycleGANConfig
    kind: str
    source: str
    step: int | None


LoadedGenerator = LoadedImageModel


def load_image_model(uri: str, device: str = "cpu") -> LoadedImageModel:
    """The network an image run generates with (the GAN's EMA generator, the VAE, the SRResNet, the CycleGAN
    generators): its export, else its latest checkpoint (no DeepSpeed needed)."""
    import importlib

    source, loc = find_model_source(uri)
    index = json.loads(loc.join(EXPORT_INDEX if source == "export" else TRAINER_STATE).read_text())
    kind = index.get("kind", "gpt")
    if kind not in IMAGE_MODELS:
        raise CheckpointError(f"{loc.uri}: a {kind} model, not an image model")
    module, config_class, model_class, engines, section = IMAGE_MODELS[kind]
    models = importlib.import_module(module)
    try:
        if source == "export":
            cfg = getattr(models, config_class)(**json.loads(loc.join(index["model_config"]).read_text()))
            state = torch.load(io.BytesIO(loc.join(index["weights"]).read_bytes()), map_location="cpu")
        else:
            cfg = getattr(models, config_class)(**json.loads(loc.join(META_DIR, MODEL_CONFIG_FILE).read_text()))
            state = (torch.load(io.BytesIO(loc.join(META_DIR, EMA_FILE).read_bytes()), map_location="cpu")
                     if engines is None else _engine_weights(loc, index["tags"], engines, section))
        model = getattr(models, model_class)(cfg)
        model.load_state_dict(state["module"] if "module" in state else state)
    except (StorageError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        what = "GAN generator" if kind == "gan" else f"{kind} model"
        raise CheckpointError(f"{loc.uri}: not a usable {what} ({exc})") from None
    return LoadedImageModel(model.to(device).eval(), cfg, kind, loc.uri, index.get("step"))


def _engine_weights(loc: Location, tags: dict, engines: dict[str, str], section: tuple[str, ...]) -> dict:
    """Engines' fp32 weights from a checkpoint folder's DeepSpeed shards (their ZeRO stage from meta/'s recipe), as
    one state dict: each engine's under its prefix."""
    with tempfile.TemporaryDirectory(prefix="genai-ckpt-") as tmp:
        local = loc.download_to(tmp)
        with open(os.path.join(local, META_DIR, RECIPE_FILE)) as f:
            ds = yaml.safe_load(f)
        for key in section:
            ds = ds[key]
        return {prefix + k: v for prefix, name in engines.items()
                for k, v in _consolidate(local, tags[name], ds["zero_stage"]).items()}


def load_generator(uri: str, device: str = "cpu") -> LoadedImageModel:
    """The EMA generator of a GAN run: its export, else its latest checkpoint's meta/ (no DeepSpeed needed)."""
    loaded = load_image_model(uri, device)
    if loaded.kind != "gan":
        raise CheckpointError(f"{loaded.source}: a {loaded.kind} model, not a GAN generator")
    return loaded


def read_image(uri: str, channels: int, size: int | None = None, min_size: int | None = None,
               multiple_of: int | None = None, what: str = "--input") -> torch.Tensor:
    """A PNG/JPEG file (path or URI) as a float tensor [1, C, H, W] in [-1, 1]. ConfigError, naming `what` and the
    file, when it is not an image, its channels are not `channels` (1: grey, 3: RGB), it is not `size` x `size`,
    it is smaller than `min_size` on a side, or its sides are not multiples of `multiple_of`."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from genai.config import ConfigError

    try:
        data = resolve(uri).read_bytes()
    except (StorageError, OSError) as exc:
        raise ConfigError(f"{what} {uri}: cannot read it ({exc})") from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"{what} {uri}: not a PNG or JPEG image ({exc})") from None
    found = {"L": 1, "1": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 2}.get(img.mode, len(img.getbands()))
    if found != channels:
        kinds = {1: "grey", 3: "RGB"}
        raise ConfigError(f"{what} {uri}: a {found}-channel ({img.mode}) image; this model takes {channels}-channel "
                          f"({kinds.get(channels, 'multi-channel')}) images")
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size, size):
        raise ConfigError(f"{what} {uri}: a {img.width}x{img.height} image; this model takes {size}x{size} images")
    if min_size is not None and min(img.size) < min_size:
        raise ConfigError(f"{what} {uri}: a {img.width}x{img.height} image, smaller than {min_size} pixels on a side")
    if multiple_of and (img.width % multiple_of or img.height % multiple_of):
        raise ConfigError(f"{what} {uri}: a {img.width}x{img.height} image; this model takes sides that are "
                          f"multiples of {multiple_of}")
    a = np.array(img, dtype=np.uint8).reshape(img.height, img.width, channels)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()[None] / 127.5 - 1.0


def _check_label(cfg, label: int | None) -> None:
    if label is not None and not cfg.num_classes:
        raise CheckpointError("--label: this model is not class-conditional")
    if label is not None and not 0 <= label < cfg.num_classes:
        raise CheckpointError(f"--label {label}: the model knows classes 0..{cfg.num_classes - 1}")


@torch.no_grad()
def sample_images(loaded: LoadedImageModel, num: int, seed: int, label: int | None = None) -> torch.Tensor:
    """`num` images in [-1, 1] from a GAN's noise or a VAE's prior; a conditional model draws `label`, or cycles
    0..classes-1 when None."""
    cfg = loaded.config
    if loaded.kind not in ("gan", "vae"):
        raise CheckpointError(f"{loaded.source}: a {loaded.kind} model does not sample images from noise")
    _check_label(cfg, label)
    device = next(loaded.model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = None
    if cfg.num_classes:
        labels = (torch.full((num,), label, device=device) if label is not None
                  else torch.arange(num, device=device) % cfg.num_classes)
    if loaded.kind == "vae":
        return loaded.model.sample(num, labels, generator=gen)
    z = torch.randn(num, cfg.z_dim, generator=gen, device=device)
    return loaded.model(z, labels).float()


@torch.no_grad()
def image_to_image(loaded: LoadedImageModel, input_uri: str, label: int | None = None,
                   direction: str = "a2b") -> tuple[torch.Tensor, str]:
    """(the image [1, C, H, W] in [-1, 1] made from the image file at `input_uri`, what it is): a VAE's
    reconstruction (a conditional VAE needs the image's `label`), an SR model's upscaling, a CycleGAN's
    translation in `direction`. ConfigError when the image does not fit the model."""
    from genai.config import ConfigError

    cfg, model = loaded.config, loaded.model
    device = next(model.parameters()).device
    if loaded.kind == "vae":
        _check_label(cfg, label)
        if cfg.num_classes and label is None:
            raise ConfigError("--label: this VAE is class-conditional; give the input image's class (0.."
                              f"{cfg.num_classes - 1})")
        x = read_image(input_uri, cfg.channels, size=cfg.image_size).to(device)
        labels = None if label is None else torch.full((1,), label, device=device)
        return model.reconstruct(x, labels), "the reconstruction"
    if loaded.kind == "sr":
        x = read_image(input_uri, cfg.channels).to(device)
        return model.upscale(x), f"the x{cfg.scale} upscaling"
    if loaded.kind == "cyclegan":
        channels = cfg.channels_a if direction == "a2b" else cfg.channels_b
        x = read_image(input_uri, channels, multiple_of=4).to(device)
        return model.translate(x, direction), f"the {direction} translation"
    raise CheckpointError(f"{loaded.source}: --input: a {loaded.kind} model does not map images to images")


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2):
    """Images in [-1, 1] (N, C, H, W) tiled into one uint8 array (height, width, channels)."""
    import math

    import numpy as np

    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = pixels[i]
    return grid


def png_bytes(grid) -> bytes:
    """A uint8 (height, width, channels) array as PNG file bytes."""
    from PIL import Image

    img = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
