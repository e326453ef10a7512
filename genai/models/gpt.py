"""A decoder-only transformer (GPT-2 shape): pre-LayerNorm blocks, causal attention through
`scaled_dot_product_attention`, tied input/output embeddings. Pure torch.

Two memory knobs change how training computes, not what: activation checkpointing (each block's activations are
recomputed in the backward pass) and a chunked loss (`chunked_cross_entropy`: the logits over the vocabulary exist
for `loss_chunk_tokens` positions at a time, never for the whole batch). Both, the output head, the KV cache and
`generate` are shared with the Llama model (genai/models/decoder.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

# chunked_cross_entropy and generate lived here first: importing them from this module still works.
from genai.models.decoder import (DecoderLM, KVCache, LayerKVCache, LMHead, causal_attention,  # noqa: F401
                                  chunked_cross_entropy, generate)


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    activation: str = "gelu"  # "gelu": exact (erf) GELU; "gelu_new": its tanh approximation, GPT-2's own
    arch: ClassVar[str] = "gpt2"  # model_config.json has no "arch" key for this model (as before Llama came)
    tie_embeddings: ClassVar[bool] = True

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = causal_attention(q, k, v, cache, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(DecoderLM):
    """GPT language model. `forward(idx, targets, kv_cache)` returns (logits, loss); the knobs
    `activation_checkpointing` and `loss_chunk_tokens` are DecoderLM's."""

    def __init__(self, cfg: GPTConfig, activation_checkpointing: bool = False, loss_chunk_tokens: int = 0):
        super().__init__(activation_checkpointing, loss_chunk_tokens)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self._init_weights(cfg.n_layer)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (tied token embeddings count once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None):
        """Logits and loss of `idx` (B, T); with `kv_cache`, idx are the positions after the cached ones (their
        keys and values are appended to it)."""
        past = self._positions(idx, kv_cache)
        pos = torch.arange(past, past + idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        x = self.ln_f(self._run_blocks(x, kv_cache))
        return self._output(x, targets)
