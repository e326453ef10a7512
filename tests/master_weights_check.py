"""Single-process DeepSpeed engines (CPU, gloo, world size 1; no Ray) for tests/test_master_weights.py.

    python tests/master_weights_check.py STAGE:PRECISION[:offload] ...

For each case: trains a tiny GPT a few steps on an engine built from the project's DeepSpeed config, then compares
what the export writes (genai.train.checkpoint.master_weights) with the engine's 16-bit weights and with the fp32
weights consolidated from a checkpoint of it (genai.sampling, DeepSpeed's zero_to_fp32 for ZeRO-2/3). Prints one
JSON object per case.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.ray_env import op_cache_dir  # noqa: E402

os.environ.setdefault("TORCH_EXTENSIONS_DIR", op_cache_dir())

import deepspeed  # noqa: E402
import torch  # noqa: E402

from cluster.deepspeed_config import build_deepspeed_config  # noqa: E402
from genai.config import load_recipe  # noqa: E402
from genai.models.gpt import GPT, GPTConfig  # noqa: E402
from genai.sampling import _consolidate  # noqa: E402
from genai.train.checkpoint import master_weights  # noqa: E402
from genai.train.steps import lm_step  # noqa: E402


def init_single_process() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a.keys() & b.keys())


def check(stage: int, precision: str, offload: bool = False) -> dict:
    recipe = load_recipe("tiny", [f"deepspeed.zero_stage={stage}", f"train.precision={precision}",
                                  "train.grad_accum=2", "train.micro_batch_size=4", "train.lr=1e-2",
                                  f"deepspeed.offload_optimizer={'cpu' if offload else 'none'}"])
    t = recipe.train
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    groups = model.optimizer_groups(t.weight_decay)
    ds_config = build_deepspeed_config(recipe.deepspeed, t, 1, False)
    optimizer = None if "optimizer" in ds_config else torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           model_parameters=groups if optimizer is None else None, config=ds_config)
    batches = iter(torch.randint(0, 64, (8, t.micro_batch_size, 17)))
    for _ in range(4):
        lm_step(engine, batches, t.grad_accum, torch.device("cpu"))
    exported = master_weights(engine, rank=0)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        low = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="t", save_latest=False)
        consolidated = _consolidate(d, "t", stage)
        reference = None
        if stage >= 2:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            reference = get_fp32_state_dict_from_zero_checkpoint(d, tag="t")
    model_dtype, accum_dtype = engine.get_data_types()
    return {
        "case": f"{stage}:{precision}{':offload' if offload else ''}",
        "optimizer": type(engine.optimizer).__name__,
        "grad_accum_dtype": str(accum_dtype).removeprefix("torch."),
        "communication_data_type": str(engine.communication_data_type).removeprefix("torch."),
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "same_keys": sorted(exported) == sorted(low),
        "all_fp32": all(v.dtype == torch.float32 for v in exported.values()),
        "close_to_16bit": all(torch.allclose(exported[k], low[k], rtol=2 ** -7, atol=1e-5) for k in low),
        "max_vs_weights": max_diff(exported, low),
        "bf16_representable": all(torch.equal(v, v.bfloat16().float()) for v in exported.values()),
        "max_vs_consolidated": max_diff(exported, consolidated),
        "max_vs_zero_to_fp32": None if reference is None else max_diff(consolidated, reference),
    }


if __name__ == "__main__":
    init_single_process()
    for arg in sys.argv[1:]:
        stage, precision, *offload = arg.split(":")
        print(json.dumps(check(int(stage), precision, offload == ["offload"])), flush=True)
