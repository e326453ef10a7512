"""Learning-rate schedule and the DeepSpeed config built from a recipe."""

import pytest

from cluster.deepspeed_config import build_deepspeed_config
from genai.config import load_recipe
from genai.train.schedule import warmup_cosine


def test_warmup_then_cosine_to_floor():
    lrs = [warmup_cosine(s, 1e-3, 1e-4, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(5.5e-4, rel=1e-3)  # half-way through the decay
    assert lrs[100] == lrs[119] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def _ds(*overrides, gpu=False):
    r = load_recipe("tiny", list(overrides))
    return build_deepspeed_config(r.deepspeed, r.train, r.cluster.num_workers, gpu)


def test_batch_sizes_and_stage():
    cfg = _ds("cluster.num_workers=2", "train.grad_accum=3", "deepspeed.zero_stage=2")
    assert cfg["train_batch_size"] == 8 * 3 * 2
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["zero_optimization"]["stage"] == 2
    assert "optimizer" not in cfg  # the loop passes torch AdamW


def test_precision_auto_is_bf16_on_gpu_only():
    assert _ds()["bf16"]["enabled"] is False
    assert _ds("cluster.use_gpu=true", gpu=True)["bf16"]["enabled"] is True


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_reduces_and_accumulates_gradients_in_fp32_under_zero(stage):
    cfg = _ds("train.precision=bf16", f"deepspeed.zero_stage={stage}")
    assert cfg["communication_data_type"] == "fp32" and cfg["data_types"] == {"grad_accum_dtype": "fp32"}


def test_bf16_without_zero_reduces_in_fp32_only_and_fp32_sets_nothing():
    zero0 = _ds("train.precision=bf16")
    assert zero0["communication_data_type"] == "fp32"
    assert "data_types" not in zero0  # DeepSpeed 0.19 refuses fp32 accumulation of bf16 gradients without ZeRO
    fp32 = _ds("deepspeed.zero_stage=2")
    assert "communication_data_type" not in fp32 and "data_types" not in fp32
    gpu = _ds("cluster.use_gpu=true", "deepspeed.zero_stage=2", gpu=True)  # auto = bf16 on GPU
    assert gpu["data_types"] == {"grad_accum_dtype": "fp32"}


def test_offload_declares_deepspeed_optimizer_and_overrides_merge():
    cfg = _ds("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu", "deepspeed.offload_param=cpu",
              "deepspeed.config_overrides={zero_optimization: {stage3_max_live_parameters: 1000}}")
    z = cfg["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_max_live_parameters"] == 1000 and z["stage"] == 3
    assert cfg["optimizer"]["type"] == "AdamW"
