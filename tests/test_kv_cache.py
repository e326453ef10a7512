"""The KV cache of generation, for both architectures: a forward over cached positions computes what a forward over
the whole sequence computes, and generation gives the same tokens with and without the cache, also past the
model's context (block_size), where it falls back to recomputing the cropped window. Pure torch."""

from __future__ import annotations

import pytest
import torch

from genai.models import build_model
from genai.models.decoder import KVCache, generate
from genai.models.gpt import GPTConfig
from genai.models.llama import LlamaConfig

CONFIGS = {
    "gpt2": GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32, bias=True),
    "llama-gqa": LlamaConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             intermediate_size=48, rope_theta=100.0, tie_embeddings=False),
    "llama-mqa": LlamaConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_kv_head=1, n_embd=32,
                             intermediate_size=48),
}


def random_model(cfg, seed: int = 0):
    """Weights large enough that logits are far from ties, so greedy tokens are well defined."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
            elif name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def model(request):
    return random_model(CONFIGS[request.param])


def test_cached_forwards_give_the_logits_of_the_whole_sequence(model):
    """The prompt at once, then pieces of 1, 3 and 1 tokens (a piece of several new positions after cached ones
    needs an offset causal mask), each piece's last logits equal the full forward's at that position."""
    ids = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(ids, ids)  # with targets: every position's logits
        cache = model.new_kv_cache()
        start = 0
        for end in (8, 9, 12, 13, 14):
            logits, _ = model(ids[:, start:end], kv_cache=cache)
            torch.testing.assert_close(logits[:, -1], full[:, end - 1], rtol=0, atol=1e-5)
            start = end
    assert cache.length == 14


@pytest.mark.parametrize("prompt_len, new", [(1, 23), (5, 19), (4, 40), (30, 6)],
                         ids=["fits-exactly", "fits", "runs-past-the-context", "prompt-longer-than-the-context"])
def test_greedy_tokens_are_the_same_with_and_without_the_cache(model, prompt_len, new):
    prompt = torch.randint(0, 61, (3, prompt_len), generator=torch.Generator().manual_seed(2))
    cached = generate(model, prompt, new, temperature=0)
    plain = generate(model, prompt, new, temperature=0, use_cache=False)
    assert cached.shape == (3, prompt_len + new)
    assert torch.equal(cached, plain)
    assert len({tuple(row) for row in cached[:, prompt_len:].tolist()}) > 1  # rows differ: a real batch


def test_sampled_tokens_are_the_same_with_and_without_the_cache(model):
    prompt = torch.zeros(2, 1, dtype=torch.long)
    a = generate(model, prompt, 40, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(7),
                 vocab_size=50)
    b = generate(model, prompt, 40, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(7),
                 vocab_size=50, use_cache=False)
    assert torch.equal(a, b) and int(a.max()) < 50


def test_the_cache_refuses_positions_beyond_the_context(model):
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(torch.zeros(1, 20, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="sequence of 25 tokens exceeds the model's context of 24"):
            model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    assert isinstance(cache, KVCache) and cache.length == 20


def test_the_cache_holds_the_kv_heads_only(model):
    cfg = model.config
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    kv_heads = getattr(cfg, "n_kv_head", cfg.n_head)
    assert len(cache.layers) == cfg.n_layer
    assert cache.layers[0].k.shape == (2, kv_heads, cfg.block_size, cfg.n_embd // cfg.n_head)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_cache_at_gpt2_small_widths(arch):
    """768 wide, 12 heads (4 kv heads for llama), GPT-2's vocabulary, a 1024-position context: cached decoding
    gives the full forward's logits, and the same greedy tokens."""
    common = dict(vocab_size=50257, block_size=1024, n_layer=2, n_head=12, n_embd=768)
    cfg = GPTConfig(**common) if arch == "gpt2" else LlamaConfig(**common, n_kv_head=4, intermediate_size=2048)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    prompt = torch.randint(0, 50257, (1, 200), generator=torch.Generator().manual_seed(3))
    cached = generate(model, prompt, 12, temperature=0)
    assert torch.equal(cached, generate(model, prompt, 12, temperature=0, use_cache=False))
    with torch.no_grad():
        full, _ = model(cached, cached)
        cache = model.new_kv_cache()
        model(cached[:, :200], kv_cache=cache)
        for i in range(200, 212):
            step, _ = model(cached[:, i:i + 1], kv_cache=cache)
            torch.testing.assert_close(step[:, -1], full[:, i], rtol=0, atol=1e-4)
