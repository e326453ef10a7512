"""Pure-torch model definitions; nothing here knows about Ray or DeepSpeed.

The language models come in two architectures, named as transformers' model_type names them: `gpt2`
(genai/models/gpt.py) and `llama` (genai/models/llama.py), each with its Hugging Face mapping (hf_gpt2.py,
hf_llama.py: hf_config, config_from_hf, to_hf_state_dict, from_hf_state_dict).
"""

from __future__ import annotations

from types import ModuleType

from genai.models import hf_gpt2, hf_llama
from genai.models.decoder import DecoderLM, generate
from genai.models.gpt import GPT, GPTConfig
from genai.models.llama import Llama, LlamaConfig

DecoderConfig = GPTConfig | LlamaConfig
ARCHS: dict[str, tuple[type, type[DecoderLM], ModuleType]] = {
    "gpt2": (GPTConfig, GPT, hf_gpt2),
    "llama": (LlamaConfig, Llama, hf_llama),
}


def _arch(name: str) -> tuple[type, type[DecoderLM], ModuleType]:
    if name not in ARCHS:
        raise ValueError(f"arch {name!r} is not one of {', '.join(ARCHS)}")
    return ARCHS[name]


def config_from_dict(data: dict) -> DecoderConfig:
    """A model config from its to_dict() (a model_config.json): its "arch" key, absent in GPT-2's, picks the class."""
    fields = dict(data)
    return _arch(fields.pop("arch", "gpt2"))[0](**fields)


def build_model(cfg: DecoderConfig, activation_checkpointing: bool = False, loss_chunk_tokens: int = 0) -> DecoderLM:
    """The model of a config's architecture."""
    return _arch(cfg.arch)[1](cfg, activation_checkpointing=activation_checkpointing,
                              loss_chunk_tokens=loss_chunk_tokens)


def hf_mapping(arch: str) -> ModuleType:
    """The module that maps an architecture to and from transformers (also by a config.json's model_type)."""
    return _arch(arch)[2]


__all__ = ["ARCHS", "DecoderConfig", "DecoderLM", "GPT", "GPTConfig", "Llama", "LlamaConfig", "build_model",
           "config_from_dict", "generate", "hf_mapping"]
