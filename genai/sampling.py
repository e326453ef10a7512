"""Load a trained model from a run, an export or a checkpoint (local or URI) and sample from it.

Both kinds of run (gpt, gan) share the layout (genai/run.py): `<run>/export/export.json` names the kind and files;
a checkpoint's `trainer_state.json` names its kind and its `meta/` folder holds what sampling needs.
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

from cluster.storage import Location, StorageError
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



@dataclass
class LoadedGenerator:
    model: "torch.nn.Module"
    config: "object"  # GANConfig
    source: str
    step: int | None


def load_generator(uri: str, device: str = "cpu") -> LoadedGenerator:
    """The EMA generator of a GAN run: its export, else its latest checkpoint's meta/ (no DeepSpeed needed)."""
    from genai.models.gan import GANConfig, Generator

    kind, loc = find_model_source(uri)
    if kind == "export":
        index = json.loads(loc.join(EXPORT_INDEX).read_text())
        files, step = (index["model_config"], index["weights"]), index.get("step")
        base = loc
    else:
        step = json.loads(loc.join(TRAINER_STATE).read_text())["step"]
        base, files = loc.join(META_DIR), (MODEL_CONFIG_FILE, EMA_FILE)
    try:
        cfg = GANConfig(**json.loads(base.join(files[0]).read_text()))
        state = torch.load(io.BytesIO(base.join(files[1]).read_bytes()), map_location="cpu")
    except (StorageError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{loc.uri}: not a usable GAN generator ({exc})") from None
    model = Generator(cfg)
    model.load_state_dict(state["module"] if "module" in state else state)
    return LoadedGenerator(model.to(device).eval(), cfg, loc.uri, step)


@torch.no_grad()
def sample_images(loaded: LoadedGenerator, num: int, seed: int, label: int | None = None) -> torch.Tensor:
    """`num` images in [-1, 1]; a conditional model draws `label`, or cycles 0..classes-1 when None."""
    cfg = loaded.config
    device = next(loaded.model.parameters()).device
    if label is not None and not cfg.num_classes:
        raise CheckpointError("--label: this generator is not class-conditional")
    if label is not None and not 0 <= label < cfg.num_classes:
        raise CheckpointError(f"--label {label}: the generator knows classes 0..{cfg.num_classes - 1}")
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(num, cfg.z_dim, generator=gen, device=device)
    labels = None
    if cfg.num_classes:
        labels = (torch.full((num,), label, device=device) if label is not None
                  else torch.arange(num, device=device) % cfg.num_classes)
    return loaded.model(z, labels).float()


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
