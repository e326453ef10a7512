"""Our Llama (genai/models/llama.py) in Hugging Face's layout (`LlamaForCausalLM`) and back. Pure torch.

The two models compute the same function (see llama.py). The differences are names and layout: ours fuses
q | k | v into one matrix (`attn.qkv`, rows in that order) and gate | up into another (`mlp.fc`), where
transformers keeps q_proj, k_proj, v_proj, gate_proj and up_proj apart; every matrix is nn.Linear's (out, in) in
both. A tied output head is stored once (`model.embed_tokens.weight`), an untied one as `lm_head.weight`.
"""

from __future__ import annotations

import torch

from genai.models.llama import LlamaConfig

ARCHITECTURE = "LlamaForCausalLM"  # the transformers class of the mapping
ACTIVATION = "silu"

# Per block: (our module, Hugging Face's modules it holds, stacked by rows in this order).
_FUSED = (
    ("attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("mlp.fc", ("mlp.gate_proj", "mlp.up_proj")),
)
_PLAIN = (
    ("norm_1", "input_layernorm"),
    ("attn.proj", "self_attn.o_proj"),
    ("norm_2", "post_attention_layernorm"),
    ("mlp.proj", "mlp.down_proj"),
)


def hf_config(cfg: LlamaConfig, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None) -> dict:
    """The `config.json` of a `LlamaForCausalLM` that computes what `Llama(cfg)` computes. The RoPE base is written
    both as transformers 5 reads it (`rope_parameters`) and as earlier readers do (`rope_theta`). Dropout is 0: an
    export is for inference."""
    return {
        "model_type": "llama",
        "architectures": [ARCHITECTURE],
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.block_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_size,
        "hidden_act": ACTIVATION,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": "float32",
    }


def llama_config_from_hf(config: dict, dropout: float = 0.0) -> LlamaConfig:
    """Our LlamaConfig for a Llama `config.json`; ValueError naming the field when our model cannot compute it."""
    if config.get("model_type") != "llama":
        raise ValueError(f"model_type {config.get('model_type')!r}: only llama maps to genai/models/llama.py")
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    unsupported = {
        "hidden_act": (config.get("hidden_act", ACTIVATION), ACTIVATION),
        "head_dim": (config.get("head_dim") or n_embd // n_head, n_embd // n_head),
        "rope_type": (rope.get("rope_type", rope.get("type", "default")), "default"),
        "attention_bias": (config.get("attention_bias", False), False),
        "mlp_bias": (config.get("mlp_bias", False), False),
        "pretraining_tp": (config.get("pretraining_tp") or 1, 1),
    }
    for field, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"{field}={value!r} is not supported by genai/models/llama.py (it computes {supported!r})")
    try:
        return LlamaConfig(vocab_size=config["vocab_size"], block_size=config["max_position_embeddings"],
                           n_layer=config["num_hidden_layers"], n_head=n_head,
                           n_kv_head=config.get("num_key_value_heads") or n_head, n_embd=n_embd,
                           intermediate_size=config["intermediate_size"], rope_theta=float(theta),
                           rms_norm_eps=config.get("rms_norm_eps", 1e-6),
                           tie_embeddings=config.get("tie_word_embeddings", False), dropout=dropout)
    except KeyError as exc:
        raise ValueError(f"{exc.args[0]} is missing from the Llama config") from None


config_from_hf = llama_config_from_hf


def _module_pairs(n_layer: int) -> tuple[list[tuple[str, tuple[str, ...]]], list[tuple[str, str]]]:
    """(fused pairs, plain pairs) of (our module, Hugging Face's module(s)) for `n_layer` blocks."""
    fused, plain = [], [("wte", "model.embed_tokens"), ("norm_f", "model.norm")]
    for i in range(n_layer):
        fused += [(f"blocks.{i}.{ours}", tuple(f"model.layers.{i}.{t}" for t in theirs)) for ours, theirs in _FUSED]
        plain += [(f"blocks.{i}.{ours}", f"model.layers.{i}.{theirs}") for ours, theirs in _PLAIN]
    return fused, plain


def _split_sizes(cfg: LlamaConfig, ours: str) -> list[int]:
    if ours.endswith("attn.qkv"):
        return [cfg.n_head * cfg.head_size, cfg.n_kv_head * cfg.head_size, cfg.n_kv_head * cfg.head_size]
    return [cfg.intermediate_size, cfg.intermediate_size]


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our state dict as `LlamaForCausalLM`'s: without `lm_head.weight` when the head is tied (transformers ties
    it on load). Every tensor owns its memory (safetensors refuses shared or strided ones)."""
    fused, plain = _module_pairs(cfg.n_layer)
    expected = {f"{ours}.weight" for ours, _ in fused + plain} | {"lm_head.weight"}
    unexpected = set(state) - expected
    if unexpected:
        raise ValueError(f"parameters with no Llama counterpart: {sorted(unexpected)}")
    out = {}
    for ours, theirs in fused:
        for name, part in zip(theirs, state[f"{ours}.weight"].split(_split_sizes(cfg, ours), dim=0)):
            out[f"{name}.weight"] = part.contiguous().clone()
    for ours, theirs in plain:
        out[f"{theirs}.weight"] = state[f"{ours}.weight"].contiguous().clone()
    head = state.get("lm_head.weight")
    if cfg.tie_embeddings:
        if head is not None and not torch.equal(head, state["wte.weight"]):
            raise ValueError("lm_head.weight differs from the token embeddings, and the config ties them")
    elif head is None:
        raise ValueError("lm_head.weight is missing (the config does not tie it to the token embeddings)")
    else:
        out["lm_head.weight"] = head.contiguous().clone()
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """A `LlamaForCausalLM` state dict as ours (`lm_head.weight` tied to `wte.weight` when the config ties them).
    ValueError naming a weight that is missing or has the wrong shape."""
    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in hf_state:
            raise ValueError(f"{name} is missing from the Llama weights")
        if tuple(hf_state[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(hf_state[name].shape)}; the config needs {shape}")
        return hf_state[name]

    d, hs = cfg.n_embd, cfg.head_size
    rows = {"self_attn.q_proj": cfg.n_head * hs, "self_attn.k_proj": cfg.n_kv_head * hs,
            "self_attn.v_proj": cfg.n_kv_head * hs, "mlp.gate_proj": cfg.intermediate_size,
            "mlp.up_proj": cfg.intermediate_size}
    shapes = {"model.embed_tokens": (cfg.vocab_size, d), "model.norm": (d,), "input_layernorm": (d,),
              "post_attention_layernorm": (d,), "self_attn.o_proj": (d, d), "mlp.down_proj": (d, cfg.intermediate_size)}
    fused, plain = _module_pairs(cfg.n_layer)
    out = {}
    for ours, theirs in fused:
        parts = [get(f"{t}.weight", (rows[t.split(".", 3)[3]], d)) for t in theirs]
        out[f"{ours}.weight"] = torch.cat(parts, dim=0)
    for ours, theirs in plain:
        key = theirs if theirs in shapes else theirs.split(".", 3)[3]
        out[f"{ours}.weight"] = get(f"{theirs}.weight", shapes[key]).contiguous().clone()
    head = hf_state.get("lm_head.weight")
    if cfg.tie_embeddings:
        if head is not None and not torch.equal(head, out["wte.weight"]):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight, and the config ties them")
        out["lm_head.weight"] = out["wte.weight"]
    else:
        out["lm_head.weight"] = get("lm_head.weight", (cfg.vocab_size, d)).contiguous().clone()
    return out
