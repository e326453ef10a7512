"""The export of a run, `<run>/export/`, written by rank 0 at the end of training (no Ray, no DeepSpeed here).

A GPT run's:

    model.safetensors    fp32 weights under our parameter names (a tied lm_head stored once, as wte)
    model_config.json    GPTConfig or LlamaConfig (its "arch" key; none for GPT-2)
    tokenizer.json       our tokenizer (genai/data/tokenizers.py)
    recipe.yaml          the recipe it was trained with
    hf/                  the same model for Hugging Face transformers (GPT2LMHeadModel or LlamaForCausalLM):
                         config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
                         special_tokens_map.json
    export.json          the index naming the files, written last (genai/sampling.py reads the export through it)

An image model's (write_image_export): its fp32 weights, model_config.json, recipe.yaml and export.json; the weights
are the EMA generator's for a GAN (generator.pt), the VAE's (vae.pt), the SRResNet's (generator.pt) and both
CycleGAN generators' (generators.pt).
"""

from __future__ import annotations

import io
import json

import torch
from safetensors.torch import save as safetensors_bytes

from cluster.storage import Location
from genai.data.hf_tokenizer import hf_tokenizer_files
from genai.data.tokenizers import TOKENIZER_FILE, Tokenizer, tokenizer_from_json
from genai.models import DecoderConfig, hf_mapping
from genai.run import EXPORT_INDEX, MODEL_CONFIG_FILE, RECIPE_FILE

WEIGHTS_FILE = "model.safetensors"
HF_DIR = "hf"
GAN_WEIGHTS_FILE = "generator.pt"
# The weights file of each image family's export: the network that generation needs.
IMAGE_WEIGHTS_FILES = {"gan": GAN_WEIGHTS_FILE, "vae": "vae.pt", "sr": GAN_WEIGHTS_FILE, "cyclegan": "generators.pt"}
LEGACY_WEIGHTS_FILE = "model.pt"  # exports written before the move to safetensors
# transformers refuses a safetensors file without this metadata.
_SAFETENSORS_METADATA = {"format": "pt"}


def write_gpt_export(out: Location, state: dict[str, torch.Tensor], cfg: DecoderConfig, tokenizer_json: str,
                     recipe_yaml: str) -> None:
    """Write a GPT export into `out` from fp32 weights under our names; the index file last, so that a reader never
    takes a half-written export for a finished one."""
    out.join(WEIGHTS_FILE).write_bytes(weights_bytes(_untied(state, cfg)))
    out.join(MODEL_CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
    out.join(TOKENIZER_FILE).write_text(tokenizer_json)
    out.join(RECIPE_FILE).write_text(recipe_yaml)
    write_hf_export(out.join(HF_DIR), state, cfg, tokenizer_from_json(tokenizer_json))
    out.join(EXPORT_INDEX).write_text(json.dumps(
        {"kind": "gpt", "weights": WEIGHTS_FILE, "model_config": MODEL_CONFIG_FILE, "tokenizer": TOKENIZER_FILE,
         "recipe": RECIPE_FILE, "hf": HF_DIR, "dtype": "float32"}, indent=2))
    out.join(LEGACY_WEIGHTS_FILE).delete()  # a refreshed old export: the index no longer names it


def write_image_export(out: Location, kind: str, state: dict[str, torch.Tensor], cfg, recipe_yaml: str, step: int,
                       **extra) -> None:
    """Write an image model's export into `out`: its fp32 weights (IMAGE_WEIGHTS_FILES[kind]), its config and the
    recipe; the index last (with `extra` keys)."""
    buf = io.BytesIO()
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, buf)
    weights = IMAGE_WEIGHTS_FILES[kind]
    out.join(weights).write_bytes(buf.getvalue())
    out.join(MODEL_CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
    out.join(RECIPE_FILE).write_text(recipe_yaml)
    out.join(EXPORT_INDEX).write_text(json.dumps(
        {"kind": kind, "weights": weights, "model_config": MODEL_CONFIG_FILE, "recipe": RECIPE_FILE,
         "step": step, "dtype": "float32", **extra}, indent=2))


def write_gan_export(out: Location, state: dict[str, torch.Tensor], cfg, recipe_yaml: str, step: int) -> None:
    """Write a GAN export into `out`: the EMA generator's weights in fp32, its GANConfig and the recipe; the index
    last."""
    write_image_export(out, "gan", state, cfg, recipe_yaml, step, ema=True)


def write_hf_export(out: Location, state: dict[str, torch.Tensor], cfg: DecoderConfig, tok: Tokenizer) -> None:
    """Write a folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load."""
    eot, hf = tok.eot_id, hf_mapping(cfg.arch)
    out.join("model.safetensors").write_bytes(weights_bytes(hf.to_hf_state_dict(state, cfg)))
    out.join("config.json").write_text(json.dumps(
        hf.hf_config(cfg, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot), indent=2))
    out.join("generation_config.json").write_text(json.dumps(generation_config(cfg, tok), indent=2))
    for name, text in hf_tokenizer_files(tok, cfg.block_size).items():
        out.join(name).write_text(text)


def generation_config(cfg: DecoderConfig, tok: Tokenizer) -> dict:
    """transformers' generation defaults for the export. The ids of a padded embedding table that the tokenizer
    never produces are suppressed, as genai.models.decoder.generate masks them, so greedy decoding picks the same
    tokens in both."""
    config = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id}
    padding = list(range(tok.vocab_size, cfg.vocab_size))
    return {**config, "suppress_tokens": padding} if padding else config


def weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as a safetensors file."""
    return safetensors_bytes({k: v.contiguous() for k, v in state.items()}, metadata=_SAFETENSORS_METADATA)


def _untied(state: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Without an output head tied to the token embeddings: safetensors stores no shared tensors, and loading
    ties it again (genai/sampling.py). An untied head is a weight of its own and stays."""
    return {k: v for k, v in state.items() if k != "lm_head.weight" or not cfg.tie_embeddings}
