"""What every decoder-only language model here shares (genai/models/gpt.py, genai/models/llama.py). Pure torch.

- `LMHead` and `chunked_cross_entropy`: the output projection and the training loss, optionally computed a chunk
  of positions at a time so that the (positions, vocabulary) logits never exist at once;
- `DecoderLM`: the base class: the loss or last-position logits from the final hidden states, activation
  checkpointing of blocks, AdamW groups, the training-FLOPs formula;
- `KVCache` and `causal_attention`: keys and values of the positions already seen, so that generation runs only
  the new token through the model at each step;
- `generate`: sampling or greedy decoding, with the cache while the sequence fits the context.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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


class LayerKVCache:
    """One attention layer's keys and values, (batch, kv heads, positions, head size), in a buffer of `max_len`
    positions allocated at the first update (dtype and device of the keys: no parameter is read, so it works with
    parameters that ZeRO-3 has partitioned away)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys and values; return those of every position so far."""
        b, h, t, d = k.shape
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} asked")
        if self.k is None:
            self.k, self.v = k.new_empty(b, h, self.max_len, d), v.new_empty(b, h, self.max_len, d)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Every layer's past keys and values for generation, at most `max_len` positions (the model's block_size).
    A model's forward(idx, kv_cache=cache) treats `idx` as the positions after the cached ones and appends theirs."""

    def __init__(self, n_layer: int, max_len: int):
        self.layers = [LayerKVCache(max_len) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        """Positions already cached: the position of the next token."""
        return self.layers[0].length


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache | None = None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Causal scaled dot-product attention of q (batch, heads, new, head size) over k, v (batch, kv heads, new,
    head size) and, with a cache, the cached positions before them. Query heads share key/value heads in groups
    (grouped-query attention) when there are fewer kv heads."""
    past = 0
    if cache is not None:
        past = cache.length
        k, v = cache.update(k, v)
    gqa = q.size(1) != k.size(1)
    t = q.size(2)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    mask = None
    if t > 1:  # new position i sees every cached one and the new ones up to itself (SDPA's is_causal aligns top-left)
        mask = torch.ones(t, past + t, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


class DecoderLM(nn.Module):
    """The base of our decoder-only models. A subclass builds its modules, has `config` (with vocab_size,
    block_size, n_layer, n_head, n_embd), `blocks` (run by `_run_blocks`), an `LMHead` `lm_head` and `num_params()`
    (the parameters its matmuls use), and calls `_output` on its final hidden states.

    `activation_checkpointing` recomputes each block's activations in the backward pass instead of keeping them
    (less memory, about a third more compute, the same loss and gradients); `loss_chunk_tokens` > 0 computes the
    training loss that many positions at a time (chunked_cross_entropy), and forward then returns no logits.
    Neither is part of the model's config: they change how it trains, not what it computes."""

    def __init__(self, activation_checkpointing: bool = False, loss_chunk_tokens: int = 0):
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_tokens = loss_chunk_tokens

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default only the parameters that matmuls use (the subclass says which not)."""
        raise NotImplementedError

    def _init_weights(self, n_layer: int) -> None:
        """GPT-2's initialisation: N(0, 0.02) matrices and embeddings, zero biases, and the residual projections
        (parameters named *proj.weight) scaled by 1/sqrt(2 n_layer). Norm gains keep their ones."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T, N the parameters that
        matmuls use (num_params()), H Q = n_head x head size = n_embd (query heads: grouped kv heads save none)."""
        cfg = self.config
        t = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * t

    def new_kv_cache(self) -> KVCache:
        """An empty cache of this model's context length."""
        return KVCache(self.config.n_layer, self.config.block_size)

    def _positions(self, idx: torch.Tensor, kv_cache: KVCache | None) -> int:
        """The position of idx's first token (the cached length); ValueError past the model's context."""
        past = kv_cache.length if kv_cache is not None else 0
        if past + idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {past + idx.size(1)} tokens exceeds the model's context of "
                             f"{self.config.block_size}")
        return past

    def _run_blocks(self, x: torch.Tensor, kv_cache: KVCache | None, *block_args: torch.Tensor) -> torch.Tensor:
        """x through every block, called as block(x, *block_args, layer_cache)."""
        for i, block in enumerate(self.blocks):
            if kv_cache is not None:
                x = block(x, *block_args, kv_cache.layers[i])
            elif self.activation_checkpointing and torch.is_grad_enabled():
                # Keep only the block's input; its dropout masks are replayed (RNG state preserved) on recompute.
                x = checkpoint(block, x, *block_args, use_reentrant=False)
            else:
                x = block(x, *block_args)
        return x

    def _output(self, x: torch.Tensor, targets: torch.Tensor | None):
        """(logits, loss) from the final hidden states: without targets the last position's logits only."""
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None
        if self.loss_chunk_tokens:
            return None, self.lm_head(x, targets, self.loss_chunk_tokens)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

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
    use_cache: bool = True,
) -> torch.Tensor:
    """Sample `max_new_tokens` continuations of `idx` (B, T); temperature 0 is greedy.

    `vocab_size` limits sampling to the tokenizer's ids when the embedding table is padded. With `use_cache` the
    model runs only the tokens its KV cache lacks (the prompt once, then one token a step) while the sequence fits
    its context (block_size). Beyond it every step recomputes the last block_size tokens without a cache, as
    generation without a cache always does: cached keys were computed at positions that cropping shifts. So the
    tokens are the same with and without the cache, for any length.
    """
    block_size = model.config.block_size
    cache = model.new_kv_cache() if use_cache else None
    for _ in range(max_new_tokens):
        if cache is not None and idx.size(1) <= block_size:
            logits, _ = model(idx[:, cache.length:], kv_cache=cache)
        else:
            logits, _ = model(idx if idx.size(1) <= block_size else idx[:, -block_size:])
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
