"""gpt2-small as a cluster user runs it, on CPU: its real widths (768 wide, 12 heads, a 1024-token context, a 50k
BPE vocabulary), bf16, gradient accumulation over micro-batches of one sequence, two workers, ZeRO-3 and ZeRO-2 with
the optimizer on the CPU — with 2 of its 12 layers, so that a step takes seconds. The tiny recipes prove the
plumbing; the defects that matter (partitioned parameters, bf16 reduction, 50k-wide heads, 1024-token windows)
live at these shapes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from conftest import run_job
from test_train_nlg import tensorboard

pytestmark = pytest.mark.slow
VOCAB = 50304  # GPT-2's 50,257 padded to a multiple of 64, as GPT-2 trainers do


@pytest.fixture(scope="module")
def bpe_dataset(corpus_file, tmp_path_factory) -> str:
    """The corpus with a BPE tokenizer asked for gpt2-small's vocabulary, in gpt2-small's 4096-token rows."""
    from genai.data.text_dataset import prepare_text_dataset

    out = tmp_path_factory.mktemp("datasets") / "bpe-50k"
    prepare_text_dataset(str(corpus_file), str(out), tokenizer="bpe", bpe_vocab_size=50257, chunk_tokens=4096,
                         log=lambda *_: None)
    return str(out)


def gpt2_proxy(data: str, storage: Path, name: str, *sets: str):
    args = ["--recipe", "gpt2-small", "--data", data, "--storage", str(storage), "--name", name]
    for s in ("model.n_layer=2", f"model.vocab_size={VOCAB}", "cluster.use_gpu=false", "cluster.num_workers=2",
              "cluster.cpus_per_worker=1", "cluster.max_failures=0", "train.micro_batch_size=1", "train.grad_accum=4",
              "train.global_batch_size=8", "train.warmup_steps=1", "train.log_interval=1", "train.eval_batches=1",
              "train.sample_tokens=8", *sets):
        args += ["--set", s]
    r = run_job("train_nlg.py", *args, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


def proxy_model(run: Path):
    from genai.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(**json.loads((run / "export" / "model_config.json").read_text())))


def test_zero3_bf16_at_gpt2_widths_trains_counts_and_exports_fp32(bpe_dataset, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = gpt2_proxy(bpe_dataset, tmp_path, "zero3", "deepspeed.zero_stage=3", "train.max_steps=4",
                     "train.eval_interval=4", "train.checkpoint_interval=4", "train.sample_interval=4",
                     "train.peak_flops=1e12")
    run = tmp_path / "zero3"
    model = proxy_model(run)
    assert (model.config.n_embd, model.config.n_head, model.config.block_size, model.config.vocab_size) == (
        768, 12, 1024, VOCAB)
    # Counted before ZeRO-3 partitions the parameters (after it, every rank holds a shard: numel() is 0).
    m = re.search(r"^model: ([0-9.]+)M parameters, ([0-9.]+) MFLOPs/token; 2 worker\(s\), ZeRO-3, bf16", out, re.M)
    assert m, out[-3000:]
    assert float(m.group(1)) == pytest.approx(model.num_params() / 1e6, abs=0.005)
    assert float(m.group(2)) == pytest.approx(model.flops_per_token(1024) / 1e6, abs=0.05)

    scalars, _ = tensorboard(run)
    losses = [v for _, v in scalars["train/loss"]]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=1.0)  # a fresh 50k-way head: about uniform
    assert len(scalars["perf/mfu"]) == 4 and all(v > 0 for _, v in scalars["perf/mfu"])
    val = [v for _, v in scalars["val/loss"]]
    assert val and math.isfinite(val[-1]) and val[-1] < losses[0]

    # The export holds the fp32 master weights, gathered one parameter at a time, at the full widths.
    weights = load_file(run / "export" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert max(tuple(v.shape) for v in weights.values() if v.dim() == 2) == (VOCAB, 768)
    assert json.loads((run / "export" / "hf" / "config.json").read_text())["n_positions"] == 1024
    assert "done: run zero3 at step 4" in out, out[-3000:]
    gen = run_job("generate.py", "--checkpoint", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                  "--temperature", "0")
    assert gen.returncode == 0 and "ROMEO:" in gen.stdout, gen.stdout[-2000:] + gen.stderr[-2000:]


def test_zero2_with_the_optimizer_on_the_cpu_resumes_at_gpt2_widths(bpe_dataset, tmp_path):
    sets = ("deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu", "train.checkpoint_interval=2",
            "train.eval_interval=2", "train.sample_interval=0")
    first = gpt2_proxy(bpe_dataset, tmp_path, "offload", *sets, "train.max_steps=2")
    assert "ZeRO-2" in first and "done: run offload at step 2" in first, first[-3000:]
    again = gpt2_proxy(bpe_dataset, tmp_path, "offload", *sets, "train.max_steps=4")
    assert re.search(r"resumed from \S+checkpoint_00000002 at step 2", again), again[-3000:]
    assert "done: run offload at step 4" in again, again[-3000:]
    scalars, _ = tensorboard(tmp_path / "offload")
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == [1, 2, 3, 4]  # the curve goes on where it stopped, no step twice
    losses = [v for _, v in scalars["train/loss"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
