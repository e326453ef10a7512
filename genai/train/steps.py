"""One optimizer step of each model on DeepSpeed engines: torch and DeepSpeed only (no Ray, no pyarrow).

The families' steps in the Ray Train loop (genai/train/nlg.py, gan.py) and the single-process GPU check
(benchmarks/gpu_check.py) call these, so what the GPU check measures is the training step itself.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from genai.models.gan import GANConfig, d_loss, g_loss, gradient_penalty


def set_tf32(enabled: bool, device: torch.device) -> None:
    """fp32 matrix products on TF32 tensor cores (`train.tf32`) or at full fp32 precision, on GPU; CPU untouched."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")


def to_device(batch, device: torch.device, pin_memory: bool = False) -> torch.Tensor:
    """A batch (numpy array or tensor) on `device`. With `pin_memory` on GPU it is first copied into page-locked
    host memory, from which the copy to the device is truly asynchronous (from pageable memory it is not)."""
    b = torch.from_numpy(batch) if not isinstance(batch, torch.Tensor) else batch
    if pin_memory and device.type == "cuda" and b.device.type == "cpu":
        b = b.pin_memory()
    return b.to(device, non_blocking=True)


def lm_step(engine, batches: Iterator, grad_accum: int, device: torch.device, pin_memory: bool = False) -> torch.Tensor:
    """`grad_accum` micro-batches of (batch, seq_len + 1) token windows; returns the summed loss (a tensor).
    `pin_memory`: copy batches to a GPU through pinned host memory (to_device)."""
    total = torch.zeros((), device=device)
    for _ in range(grad_accum):
        b = to_device(next(batches), device, pin_memory)
        _, loss = engine(b[:, :-1], b[:, 1:])
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return total


def gan_step(g_engine, d_engine, next_batch: Callable[[], tuple], cfg: GANConfig, n_critic: int, batch_size: int,
             gp_weight: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`n_critic` discriminator updates then one generator update. `next_batch()` gives (images in [-1, 1],
    labels) as tensors on `device`. Returns float64 (d_loss, g_loss, D(real), D(fake), gradient penalty),
    the discriminator terms averaged over its updates.

    The generator's update runs through `d_engine.module` with D's parameters frozen: DeepSpeed hooks every
    backward through an engine's outputs, and ZeRO-2 reduces D's gradients from per-parameter hooks, so
    neither may fire for the generator's backward. The penalty's autograd.grad goes through the bare module
    too; its second-order gradients reach D's parameters in D's own engine.backward."""
    stats = torch.zeros(5, dtype=torch.float64, device=device)
    conditional = bool(cfg.num_classes)
    for _ in range(n_critic):
        real, labels = next_batch()
        real = real.to(dtype)
        labels = labels if conditional else None
        z = torch.randn(len(real), cfg.z_dim, device=device, dtype=dtype)
        with torch.no_grad():
            fake = g_engine.module(z, labels)
        scores = d_engine(torch.cat([real, fake]), None if labels is None else torch.cat([labels, labels])).float()
        real_s, fake_s = scores[:len(real)], scores[len(real):]
        loss = d_loss(real_s, fake_s, cfg.loss)
        gp = torch.zeros((), device=device)
        if cfg.loss == "wgan-gp":
            gp = gradient_penalty(d_engine.module, real, fake, labels)
            total = loss + gp_weight * gp
        else:
            total = loss
        d_engine.backward(total)
        d_engine.step()
        stats += torch.stack([loss.detach(), torch.zeros((), device=device), real_s.detach().mean(),
                              fake_s.detach().mean(), gp.detach()]).double() / n_critic
    D = d_engine.module
    D.requires_grad_(False)
    try:
        z = torch.randn(batch_size, cfg.z_dim, device=device, dtype=dtype)
        g_labels = torch.randint(0, cfg.num_classes, (batch_size,), device=device) if conditional else None
        loss_g = g_loss(D(g_engine(z, g_labels), g_labels).float(), cfg.loss)
        g_engine.backward(loss_g)
        g_engine.step()
    finally:
        D.requires_grad_(True)
    stats[1] += loss_g.detach().double()
    return stats

