"""A decoder-only transformer (GPT-2 shape): pre-LayerNorm blocks, causal attention through
`scaled_dot_product_attention`, tied input/output embeddings. Pure torch.

Two memory knobs change how training computes, not what: activation checkpointing (each block's activations are
recomputed in the backward pass) and a chunked loss (`chunked_cross_entropy`: the logits over the vocabulary exist
for `loss_chunk_tokens` positions at a time, never for the whole batch)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits `x @ weight.T` against `targets`, `chunk` rows at a time. Each chunk's
    gradients are taken in the forward pass while its logits exist; the backward pass only scales them."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk):
        n = x.size(0)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)  # summed over chunks in fp32, like one matmul
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, n, chunk):
            xs, ts = x[start:start + chunk], targets[start:start + chunk, None]
            logits = (xs @ weight.t()).float()  # fp32 softmax, as the plain path's cross_entropy on .float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += (lse - logits.gather(1, ts)).sum()
            # d(mean loss)/d(logits) = (softmax - one-hot) / n, made in place in the chunk's logits
            grad = logits.sub_(lse).exp_()
            grad.scatter_add_(1, ts, torch.full_like(lse, -1.0))
            grad = grad.div_(n).to(x.dtype)
            grad_x[start:start + chunk] = grad @ weight
            grad_w += (grad.t() @ xs).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), (grad_w * grad_loss).to(ctx.weight_dtype), None, None


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """`F.cross_entropy(x @ weight.T, targets)` (mean over every position; none is ignored) computed `chunk`
    positions at a time, so the (positions, vocabulary) logits never exist at once, in the forward or the backward
    pass: the same loss and gradients within float tolerance, with one chunk's logits as the peak."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(x, weight, targets, chunk)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, x.size(0), chunk):
        logits = (x[start:start + chunk] @ weight.t()).float()
        total += F.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
    return total / x.size(0)


class LMHead(nn.Linear):
    """The output projection. Called with targets it returns their mean cross-entropy, `chunk_tokens` positions
    at a time (chunked_cross_entropy), instead of logits: a module call, so hooks that gather its weight (ZeRO-3)
    run around it."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, chunk_tokens: int = 0) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return chunked_cross_entropy(x, self.weight, targets, chunk_tokens)


class GPT(nn.Module):
    """GPT language model. `forward(idx, targets)` returns (logits, loss).

    `activation_checkpointing` recomputes each block's activations in the backward pass instead of keeping them
    (less memory, about a third more compute, the same loss and gradients); `loss_chunk_tokens` > 0 computes the
    training loss that many positions at a time (chunked_cross_entropy), and forward then returns no logits.
    Neither is part of the model's config: they change how it trains, not what it computes."""

    def __init__(self, cfg: GPTConfig, activation_checkpointing: bool = False, loss_chunk_tokens: int = 0):
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_tokens = loss_chunk_tokens
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (tied token embeddings count once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        t = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * t

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.size(1)
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds the model's context of {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = self._block(block, x)
        x = self.ln_f(x)
        if targets is None:
            # Inference: only the last position's logits are needed.
            return self.lm_head(x[:, -1:, :]), None
        if self.loss_chunk_tokens:
            return None, self.lm_head(x, targets, self.loss_chunk_tokens)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def _block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            # Keep only the block's input; its dropout masks are replayed (RNG state preserved) on recompute.
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay matrices and embeddings, not biases or norms."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Sample `max_new_tokens` continuations of `idx` (B, T); temperature 0 is greedy.

    `vocab_size` limits sampling to the tokenizer's ids when the embedding table is padded.
    """
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        ctx = idx if idx.size(1) <= block_size else idx[:, -block_size:]
        logits, _ = model(ctx)
        logits = logits[:, -1, :].float()
        if vocab_size is not None:
            logits[:, vocab_size:] = -float("inf")
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, nxt), dim=1)
    return idx
