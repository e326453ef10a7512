"""Build the DeepSpeed config dict from a recipe's `train` and `deepspeed` sections."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """`auto` means bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return precision


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def bf16_gradient_dtypes(zero_stage: int) -> dict:
    """DeepSpeed keys that make bf16 training reduce gradients in fp32 and, where DeepSpeed 0.19 allows it,
    accumulate them in fp32 (both otherwise follow the model's bf16).

    fp32 accumulation needs ZeRO: without it DeepSpeed refuses the mix (engine._do_optimizer_sanity_check raises
    "unsupported mix of model_dtype=bfloat16 and grad_accum_dtype=float32"), so ZeRO-0 accumulates in bf16. With
    ZeRO-1 (no offload) DeepSpeed then trains with its BF16_Optimizer; ZeRO-2/3 keep fp32 gradient partitions."""
    keys: dict = {"communication_data_type": "fp32"}
    if zero_stage >= 1:
        keys["data_types"] = {"grad_accum_dtype": "fp32"}
    return keys


def build_deepspeed_config(ds: Any, train: Any, num_workers: int, use_gpu: bool) -> dict:
    """DeepSpeed JSON config: batch sizes, ZeRO stage and offload, precision (bf16 with fp32 gradient reduction
    and accumulation, see bf16_gradient_dtypes), clipping.

    `ds` and `train` are the recipe's `deepspeed` and `train` sections. The optimizer is declared
    here only with optimizer offload (DeepSpeed then uses its CPU Adam); otherwise the training loop
    passes torch's AdamW.
    """
    precision = resolve_precision(train.precision, use_gpu)
    cfg: dict = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * num_workers,
        "gradient_clipping": train.grad_clip,
        "steps_per_print": 10**9,  # progress is logged by the training loop
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12, "loss_scale_window": 200},
    }
    if precision == "bf16":
        cfg.update(bf16_gradient_dtypes(ds.zero_stage))
    zero = cfg["zero_optimization"]
    if ds.zero_stage >= 1:
        zero.update({
            "overlap_comm": ds.overlap_comm and use_gpu,
            "contiguous_gradients": True,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "reduce_scatter": True,
        })
    if ds.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False})
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": [train.beta1, train.beta2], "weight_decay": train.weight_decay},
        }
    if ds.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return _merge(cfg, dict(ds.config_overrides))


def gan_engine_config(ds: Any, train: Any, lr: float, num_workers: int, use_gpu: bool) -> dict:
    """One image network's DeepSpeed config (GAN, VAE, SR, CycleGAN): `ds` is its part of the recipe's `deepspeed`
    section, `train` the recipe's `train` section (batch_size per worker, no accumulation, grad_clip, precision,
    Adam's beta1/beta2 without weight decay)."""
    opt = SimpleNamespace(micro_batch_size=train.batch_size, grad_accum=1, grad_clip=train.grad_clip,
                          precision=train.precision, lr=lr, beta1=train.beta1, beta2=train.beta2, weight_decay=0.0)
    return build_deepspeed_config(ds, opt, num_workers, use_gpu)
