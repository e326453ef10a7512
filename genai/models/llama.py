"""A decoder-only transformer of the Llama family: pre-RMSNorm blocks, rotary position embeddings (RoPE),
grouped-query attention (fewer key/value heads than query heads), a SwiGLU MLP, no biases, the output head tied to
the token embeddings or not. Pure torch.

It computes what transformers' `LlamaForCausalLM` computes (genai/models/hf_llama.py maps the weights): RMSNorm
in fp32, RoPE rotating the two halves of each head (`rotate_half`), inverse frequencies
theta^(-2i/head_size), attention scaled by 1/sqrt(head size), the MLP down(silu(gate(x)) * up(x)). The output head,
the chunked loss, activation checkpointing, the KV cache and generation are shared with GPT (genai/models/decoder.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from genai.models.decoder import DecoderLM, KVCache, LayerKVCache, LMHead, causal_attention


def default_intermediate_size(n_embd: int) -> int:
    """SwiGLU width with about the parameters of a 4 x n_embd GELU MLP: 8/3 n_embd, up to a multiple of 64."""
    return 64 * math.ceil(8 * n_embd / 3 / 64)


@dataclass
class LlamaConfig:
    """The model's shape (recipe: model.*, genai/config.py documents each field); to_dict() names its arch."""

    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    arch: ClassVar[str] = "llama"

    def __post_init__(self):
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}: n_head must "
                             "divide n_embd into an even head size and be a multiple of n_kv_head")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return {"arch": self.arch, **asdict(self)}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) times a gain, computed in fp32 and cast back before the gain (as Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_size: int, n_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (positions, head_size) of every position's rotation angles, each frequency on both halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float) / head_size))
    angles = torch.arange(n_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, positions, head_size): pairs (i, i + head_size/2) by their position's angle."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal self-attention with n_head query heads sharing n_kv_head key/value heads, RoPE on q and k."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = cfg.n_head, cfg.n_kv_head, cfg.head_size
        # q | k | v in one matmul; genai/models/hf_llama.py splits it into q_proj, k_proj, v_proj
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_size, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        b, t, c = x.shape
        hs = self.head_size
        q, k, v = self.qkv(x).split([self.n_head * hs, self.n_kv_head * hs, self.n_kv_head * hs], dim=2)
        q = q.view(b, t, self.n_head, hs).transpose(1, 2)
        k = k.view(b, t, self.n_kv_head, hs).transpose(1, 2)
        v = v.view(b, t, self.n_kv_head, hs).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = causal_attention(q, k, v, cache, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate | up in one matmul (`fc`), split by genai/models/hf_llama.py."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 2 * cfg.intermediate_size, bias=False)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.dropout(self.proj(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.norm_1 = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.norm_2 = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin, cache)
        return x + self.mlp(self.norm_2(x))


class Llama(DecoderLM):
    """Llama-family language model. `forward(idx, targets, kv_cache)` returns (logits, loss); the knobs
    `activation_checkpointing` and `loss_chunk_tokens` are DecoderLM's."""

    def __init__(self, cfg: LlamaConfig, activation_checkpointing: bool = False, loss_chunk_tokens: int = 0):
        super().__init__(activation_checkpointing, loss_chunk_tokens)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # fp32 tables of every position; not saved (a function of the config). A bf16 engine casts them, as
        # transformers casts its cos/sin to the activations' dtype.
        cos, sin = rope_tables(cfg.head_size, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(cfg.n_layer)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied embeddings count once); by default without an untied input embedding table (a
        lookup: no matmul uses it, the FLOPs formula leaves it out). Tied, the table is the output head's matmul."""
        n = sum(p.numel() for p in self.parameters())
        untied = not self.config.tie_embeddings
        return n - self.wte.weight.numel() if non_embedding and untied else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None):
        """Logits and loss of `idx` (B, T); with `kv_cache`, idx are the positions after the cached ones (their
        keys and values are appended to it)."""
        past = self._positions(idx, kv_cache)
        t = idx.size(1)
        x = self.drop(self.wte(idx))
        cos, sin = self.rope_cos[past:past + t].to(x.dtype), self.rope_sin[past:past + t].to(x.dtype)
        x = self.norm_f(self._run_blocks(x, kv_cache, cos, sin))
        return self._output(x, targets)
