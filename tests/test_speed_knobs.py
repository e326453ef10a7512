"""The speed knobs of a GPT recipe change how a step runs, not what it computes: activation checkpointing gives the
same loss and gradients bit for bit, the chunked loss the same within fp32 rounding (at GPT-2's 50k vocabulary),
torch.compile the same within rounding; TF32 and pinned memory do nothing on CPU. All are off by default where
they change numerics. (benchmarks/gpu_check.py measures what each buys on a GPU.)"""

from __future__ import annotations

import shutil

import pytest
import torch

from genai.config import load_recipe
from genai.models.gpt import GPT, GPTConfig, chunked_cross_entropy
from genai.train.steps import set_tf32, to_device

SMALL = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
WIDE_VOCAB = GPTConfig(vocab_size=50304, block_size=32, n_layer=1, n_head=2, n_embd=16)


def train_step(cfg: GPTConfig, batch: int = 2, dtype: torch.dtype = torch.float32, **knobs):
    """Loss and every parameter's gradient of one forward/backward from the same weights, batch and dropout seed."""
    torch.manual_seed(0)
    model = GPT(cfg, **knobs).to(dtype).train()
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_the_knobs_are_off_by_default_where_they_change_numerics():
    recipe = load_recipe("tiny")
    assert not recipe.train.compile and not recipe.train.tf32 and recipe.model.loss_chunk_tokens == 0
    assert not recipe.model.activation_checkpointing
    assert recipe.train.pin_memory  # changes no number: on by default (on GPU)
    on = load_recipe("tiny", ["train.compile=true", "train.tf32=true", "model.activation_checkpointing=true",
                              "model.loss_chunk_tokens=4096", "train.pin_memory=false"])
    assert on.train.compile and on.train.tf32 and on.model.activation_checkpointing
    assert on.model.loss_chunk_tokens == 4096 and not on.train.pin_memory


def test_activation_checkpointing_changes_neither_the_loss_nor_the_gradients():
    loss, grads = train_step(SMALL)
    ckpt_loss, ckpt_grads = train_step(SMALL, activation_checkpointing=True)
    assert torch.equal(loss, ckpt_loss)  # dropout included: its masks are replayed on recompute
    for name, grad in grads.items():
        assert torch.equal(grad, ckpt_grads[name]), name


def test_activation_checkpointing_keeps_only_block_inputs_for_the_backward_pass():
    def saved_bytes(**knobs) -> int:
        torch.manual_seed(0)
        model = GPT(SMALL, **knobs)
        x = torch.randint(0, SMALL.vocab_size, (2, SMALL.block_size + 1))
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x[:, :-1], x[:, 1:])
        return total

    assert saved_bytes(activation_checkpointing=True) < saved_bytes() / 2


def test_the_chunked_loss_matches_the_plain_loss_and_gradients_at_a_50k_vocabulary():
    loss, grads = train_step(WIDE_VOCAB)
    # 64 positions in chunks of 24: the last chunk is short
    chunked_loss, chunked_grads = train_step(WIDE_VOCAB, loss_chunk_tokens=24)
    assert chunked_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_chunked_loss_matches_in_bf16_as_deepspeed_trains_on_gpu():
    loss, grads = train_step(WIDE_VOCAB, dtype=torch.bfloat16)
    chunked_loss, chunked_grads = train_step(WIDE_VOCAB, dtype=torch.bfloat16, loss_chunk_tokens=24)
    assert chunked_loss.dtype == loss.dtype == torch.float32  # the softmax runs in fp32 either way
    assert chunked_loss.item() == pytest.approx(loss.item(), rel=1e-3)
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name].float(), grad.float(), rtol=2e-2, atol=1e-4, msg=name)


def test_the_chunked_loss_never_holds_the_whole_logits():
    torch.manual_seed(0)
    positions, vocab = 64, WIDE_VOCAB.vocab_size
    x = torch.randn(positions, 16, requires_grad=True)
    weight = torch.randn(vocab, 16, requires_grad=True)
    targets = torch.randint(0, vocab, (positions,))
    largest = 0

    def pack(t):
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.cross_entropy(x @ weight.t(), targets)
    assert largest == positions * vocab  # the plain loss keeps the logits for its backward pass
    largest = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_cross_entropy(x, weight, targets, 16)
    assert largest <= vocab * 16  # its gradients: one of the weight's size, one of the input's
    loss.backward()
    assert x.grad.shape == x.shape and weight.grad.shape == weight.shape


def test_the_chunked_loss_without_gradients_is_the_same_loss():
    torch.manual_seed(0)
    model = GPT(WIDE_VOCAB).eval()
    x = torch.randint(0, WIDE_VOCAB.vocab_size, (2, WIDE_VOCAB.block_size + 1))
    with torch.no_grad():
        _, plain = model(x[:, :-1], x[:, 1:])
        model.loss_chunk_tokens = 20
        logits, chunked = model(x[:, :-1], x[:, 1:])
    assert logits is None  # never materialised
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile (inductor) on CPU needs a C++ compiler; none on the PATH")
def test_compile_does_not_change_the_loss_beyond_rounding():
    # The way train.compile compiles (DeepSpeed's engine.compile is module.compile, in place); tiny so that the
    # inductor's CPU compile stays short (~30 s on 2 cores with its cache cold, a few seconds warm).
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    loss, grads = train_step(cfg)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    names = [name for name, _ in model.named_parameters()]
    model.compile()
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints keep their keys
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size + 1), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    _, compiled_loss = model(x[:, :-1], x[:, 1:])
    compiled_loss.backward()
    assert compiled_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_tf32_and_pinned_memory_do_nothing_on_cpu():
    cpu = torch.device("cpu")
    before = torch.get_float32_matmul_precision()
    set_tf32(True, cpu)
    assert torch.get_float32_matmul_precision() == before
    batch = torch.arange(12).reshape(3, 4).numpy()
    moved = to_device(batch, cpu, pin_memory=True)
    assert torch.equal(moved, torch.arange(12).reshape(3, 4)) and not moved.is_pinned()
