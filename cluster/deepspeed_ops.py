"""Build DeepSpeed's JIT-compiled CPU ops once, at set-up time, instead of inside the first training run.

    python -m cluster.deepspeed_ops
"""

from __future__ import annotations

import os
import time

from cluster.ray_env import worker_env


def prebuild() -> None:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", worker_env()["TORCH_EXTENSIONS_DIR"])
    import torch
    from deepspeed.accelerator import get_accelerator

    if torch.cuda.is_available():
        return  # GPU ops build from the CUDA toolchain on first use; nothing to do on CPU-less paths here
    t0 = time.time()
    # ShareMemComm: loaded by every CPU process group; CPUAdam: the optimizer of deepspeed.offload_optimizer.
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
    print(f"DeepSpeed CPU ops ready in {os.environ['TORCH_EXTENSIONS_DIR']} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    prebuild()
