"""The GPT model: shapes, causality, weight tying, counts and sampling."""

import torch

from genai.models.gpt import GPT, GPTConfig, generate

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(CFG)
    x = torch.randint(0, 50, (3, 16))
    logits, loss = model(x, x)
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5  # near uniform at init
    logits, loss = model(x)
    assert logits.shape == (3, 1, 50) and loss is None


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 50  # change only future tokens
    la, _ = model(x, x)
    lb, _ = model(y, y)
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-6)
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


def test_weights_are_tied_and_counted_once():
    model = GPT(CFG)
    assert model.lm_head.weight is model.wte.weight
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 16 * 32
    # 6N + 12 L H Q T
    assert model.flops_per_token(16) == 6 * model.num_params() + 12 * 2 * 2 * 16 * 16


def test_gpt2_small_has_124m_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert round(model.num_params(non_embedding=False) / 1e6) == 124


def test_context_longer_than_block_size_is_rejected():
    model = GPT(CFG)
    try:
        model(torch.zeros(1, 17, dtype=torch.long))
    except ValueError as exc:
        assert "exceeds the model's context" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_generate_is_seeded_and_respects_vocab_limit():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    idx = torch.zeros(2, 1, dtype=torch.long)
    a = generate(model, idx, 40, generator=torch.Generator().manual_seed(1), vocab_size=7)
    b = generate(model, idx, 40, generator=torch.Generator().manual_seed(1), vocab_size=7)
    assert a.shape == (2, 41)
    assert torch.equal(a, b)
    assert int(a.max()) < 7
    greedy = generate(model, idx, 5, temperature=0)
    assert torch.equal(greedy[0], greedy[1])


def test_optimizer_groups_decay_only_matrices():
    model = GPT(CFG)
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
