"""Our GPT (genai/models/gpt.py) in Hugging Face's GPT-2 layout (`GPT2LMHeadModel`) and back. Pure torch.

The two models compute the same function: pre-LayerNorm blocks, fused q|k|v projection split in that order,
GELU (exact, or GPT-2's own tanh approximation: `activation`), LayerNorm eps 1e-5, attention scaled by 1/sqrt(head_dim), tied input/output embeddings. The
differences are names and layout: Hugging Face's GPT-2 keeps its projections in `Conv1D` modules whose weights
are stored (in, out), the transpose of `nn.Linear`'s, and it always has biases (written as zeros for a model
trained with `bias=False`).
"""

from __future__ import annotations

import torch

from genai.models.gpt import GPTConfig

# nn.LayerNorm's default, which every LayerNorm of genai/models/gpt.py uses.
LAYER_NORM_EPS = 1e-5
ARCHITECTURE = "GPT2LMHeadModel"  # the transformers class of the mapping
# transformers' activation_function names of GPTConfig.activation: "gelu" is F.gelu's default (the erf form),
# "gelu_new" (GPT-2's, the Hub checkpoints') and "gelu_pytorch_tanh" are its tanh approximation.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}

# Per block: (our module, Hugging Face's module, stored transposed because it is a Conv1D there).
_BLOCK_MODULES = (
    ("ln_1", "ln_1", False),
    ("attn.qkv", "attn.c_attn", True),
    ("attn.proj", "attn.c_proj", True),
    ("ln_2", "ln_2", False),
    ("mlp.fc", "mlp.c_fc", True),
    ("mlp.proj", "mlp.c_proj", True),
)
_EMBEDDINGS = ("wte", "wpe")  # no biases
# Buffers that old GPT-2 checkpoints (the Hub's gpt2) carry beside the weights: causal masks, not parameters.
_HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _module_pairs(n_layer: int) -> list[tuple[str, str, bool]]:
    """Every (our module, Hugging Face's module, transposed) of a model with `n_layer` blocks."""
    pairs = [(name, f"transformer.{name}", False) for name in _EMBEDDINGS]
    for i in range(n_layer):
        pairs += [(f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", t) for ours, theirs, t in _BLOCK_MODULES]
    return pairs + [("ln_f", "transformer.ln_f", False)]


def hf_config(cfg: GPTConfig, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None) -> dict:
    """The `config.json` of a `GPT2LMHeadModel` that computes what `GPT(cfg)` computes.

    `vocab_size` is the model's (padded) embedding table, not the tokenizer's. Dropout is 0: an export is for
    inference, and the trained rate stays in our own `model_config.json`."""
    return {
        "model_type": "gpt2",
        "architectures": [ARCHITECTURE],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": 4 * cfg.n_embd,
        "activation_function": cfg.activation,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": "float32",
    }


def gpt_config_from_hf(config: dict, dropout: float = 0.0) -> GPTConfig:
    """Our GPTConfig for a GPT-2 `config.json`; ValueError naming the field when our model cannot compute it."""
    if config.get("model_type") != "gpt2":
        raise ValueError(f"model_type {config.get('model_type')!r}: only gpt2 maps to genai/models/gpt.py")
    n_embd = config["n_embd"]
    activation = config.get("activation_function", "gelu_new")  # GPT2Config's default
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation_function={activation!r} is not supported by genai/models/gpt.py (it computes "
                         f"{', '.join(sorted(ACTIVATIONS))})")
    unsupported = {
        "layer_norm_epsilon": (config.get("layer_norm_epsilon", LAYER_NORM_EPS), LAYER_NORM_EPS),
        "n_inner": (config.get("n_inner") or 4 * n_embd, 4 * n_embd),
        "tie_word_embeddings": (config.get("tie_word_embeddings", True), True),
        "scale_attn_weights": (config.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (config.get("scale_attn_by_inverse_layer_idx", False), False),
        "add_cross_attention": (config.get("add_cross_attention", False), False),
    }
    for field, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"{field}={value!r} is not supported by genai/models/gpt.py (it computes {supported!r})")
    return GPTConfig(vocab_size=config["vocab_size"], block_size=config["n_positions"], n_layer=config["n_layer"],
                     n_head=config["n_head"], n_embd=n_embd, dropout=dropout, bias=True,
                     activation=ACTIVATIONS[activation])


config_from_hf = gpt_config_from_hf  # the name every genai/models/hf_*.py module gives it


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict as `GPT2LMHeadModel`'s, without its tied `lm_head.weight`; zero biases where ours has none.
    Every tensor owns its memory (safetensors refuses shared or strided ones)."""
    _check_tied(state)
    expected = {f"{ours}.{kind}" for ours, _, _ in _module_pairs(cfg.n_layer) for kind in ("weight", "bias")}
    unexpected = set(state) - expected - {"lm_head.weight"}
    if unexpected:
        raise ValueError(f"parameters with no GPT-2 counterpart: {sorted(unexpected)}")
    out = {}
    for ours, theirs, transposed in _module_pairs(cfg.n_layer):
        weight = state[f"{ours}.weight"]
        out[f"{theirs}.weight"] = (weight.t() if transposed else weight).contiguous().clone()
        if ours not in _EMBEDDINGS:
            bias = state.get(f"{ours}.bias")
            out[f"{theirs}.bias"] = (bias.clone() if bias is not None
                                     else torch.zeros(weight.shape[0], dtype=weight.dtype))
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict (`GPT2LMHeadModel`'s, or the bare `GPT2Model` names of the Hub's gpt2) as ours, with
    `lm_head.weight` tied to `wte.weight`. With `cfg.bias` False, GPT-2's biases must be zero (ValueError else)."""
    state = _with_transformer_prefix(hf_state)
    _check_tied({"wte.weight": state.get("transformer.wte.weight"), "lm_head.weight": state.get("lm_head.weight")})
    out = {}
    for ours, theirs, transposed in _module_pairs(cfg.n_layer):
        key = f"{theirs}.weight"
        if key not in state:
            raise ValueError(f"{key} is missing from the GPT-2 weights")
        out[f"{ours}.weight"] = (state[key].t() if transposed else state[key]).contiguous().clone()
        bias = state.get(f"{theirs}.bias")
        if ours in _EMBEDDINGS or bias is None:
            continue
        if cfg.bias:
            out[f"{ours}.bias"] = bias.clone()
        elif bool(bias.any()):
            raise ValueError(f"{theirs}.bias is not zero and the model has bias=False")
    out["lm_head.weight"] = out["wte.weight"]
    return out


def _with_transformer_prefix(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names as GPT2LMHeadModel has them, without the causal-mask buffers of old checkpoints."""
    out = {}
    for name, tensor in hf_state.items():
        if name.endswith(_HF_BUFFER_SUFFIXES):
            continue
        out[name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"] = tensor
    return out


def _check_tied(state: dict) -> None:
    """Both models tie the output head to the token embeddings: an untied head has nowhere to go."""
    head, wte = state.get("lm_head.weight"), state.get("wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise ValueError("lm_head.weight differs from the token embeddings: only tied output heads map to GPT-2")

