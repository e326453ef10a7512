"""GPT training: the plan made on the driver (no Ray) and the loop run by every Ray Train worker."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch

from cluster.deepspeed_config import build_deepspeed_config, resolve_precision
from cluster.storage import resolve
from genai.config import ConfigError, NLGRecipe, recipe_to_yaml
from genai.data.batches import WindowStream, epoch_offset, window_count
from genai.data.text_dataset import (DatasetError, TextManifest, ensure_dataset, load_manifest, verify_shards,
                                     worker_rows)
from genai.data.tokenizers import TOKENIZER_FILE
from genai.models import DecoderConfig, GPTConfig, LlamaConfig, build_model, config_from_dict, generate
from genai.models.llama import default_intermediate_size
from genai.export import write_gpt_export
from genai.sampling import EXPORT_DIR
from genai.train.checkpoint import master_weights, restore, save_and_report, start_checkpoint
from genai.train.interrupt import StopFlag
from genai.train.schedule import warmup_cosine
from genai.train.steps import lm_step, run_epochs, set_tf32, to_device
from genai.train.tracking import RunLogger, say
from genai.train.worker import EpochRows, init_worker

ROWS_PER_FETCH = 32

# Dense bf16 peak FLOP/s per device, for MFU (matched against torch.cuda.get_device_name()).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
                   "L4": 121e12, "V100": 125e12}


@dataclass
class NLGPlan:
    """Everything the workers need, checked on the driver before any cluster time is spent."""

    recipe: NLGRecipe
    data_uri: str
    manifest: TextManifest
    model_config: DecoderConfig
    ds_config: dict

    def loop_config(self, run_uri: str) -> dict:
        return {
            "recipe": self.recipe.model_dump(mode="json"),
            "model_config": self.model_config.to_dict(),
            "ds_config": self.ds_config,
            "data_uri": self.data_uri,
            "run_uri": run_uri,
            "train_worker_tokens": self.manifest.min_tokens_per_worker("train", self.recipe.cluster.num_workers),
            "val_shards": self.manifest.shard_uris("val"),
        }

    def dataset_uris(self) -> dict[str, list[str]]:
        """Ray Data streams the training split; the workers read their few validation rows themselves."""
        return {"train": self.manifest.shard_uris("train")}

    def verify_data(self) -> None:
        """Check the shards against the manifest again (raises DatasetError naming a missing/corrupt one)."""
        verify_shards(self.manifest)


def steps_per_epoch(worker_tokens: int, seq_len: int, micro_batch: int, grad_accum: int, seed: int,
                    epoch: int) -> int:
    """Optimizer steps every worker takes in `epoch`: the whole steps of windows that `worker_tokens` (the
    tokens each worker is guaranteed, `TextManifest.min_tokens_per_worker`) yield after the epoch's offset."""
    windows = window_count(worker_tokens, seq_len, epoch_offset(seed, epoch, seq_len))
    return windows // (micro_batch * grad_accum)


def worst_steps_per_epoch(worker_tokens: int, seq_len: int, micro_batch: int, grad_accum: int) -> int:
    """The fewest steps any epoch can have: its offset at the largest value epoch_offset draws."""
    return window_count(worker_tokens, seq_len, seq_len - 1) // (micro_batch * grad_accum)


def plan_nlg_run(recipe: NLGRecipe, log=print) -> NLGPlan:
    """Resolve the dataset (preparing it into the cache if needed) and check it fits the recipe."""
    d, t, c = recipe.data, recipe.train, recipe.cluster
    data_uri = d.uri or ensure_dataset(d.source, d.tokenizer, d.bpe_vocab_size, d.val_fraction, d.chunk_tokens,
                                       d.cache_dir, log=log)
    manifest = load_manifest(data_uri)
    verify_shards(manifest)
    vocab = recipe.model.vocab_size or 64 * math.ceil(manifest.vocab_size / 64)
    if vocab < manifest.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the dataset's vocabulary ({manifest.vocab_size})")
    seq_len = recipe.seq_len
    # Windows cross rows, so the row size bounds nothing: each worker needs the tokens of one step, in every epoch.
    worker_tokens = manifest.min_tokens_per_worker("train", c.num_workers)
    if worst_steps_per_epoch(worker_tokens, seq_len, t.micro_batch_size, t.grad_accum) < 1:
        raise DatasetError(
            f"{data_uri}: {manifest.splits['train'].tokens} training tokens are too few for {c.num_workers} worker(s) x "
            f"train.micro_batch_size={t.micro_batch_size} x train.grad_accum={t.grad_accum} x seq_len={seq_len} "
            f"(each worker is guaranteed {worker_tokens} tokens; one step needs "
            f"{t.micro_batch_size * t.grad_accum * seq_len + seq_len})")
    val_windows = window_count(manifest.min_tokens_per_worker("val", c.num_workers), seq_len, 0)
    if val_windows < t.micro_batch_size:
        raise DatasetError(
            f"{data_uri}: the validation split gives each of {c.num_workers} worker(s) {val_windows} window(s) of "
            f"seq_len={seq_len}, fewer than one micro-batch (train.micro_batch_size={t.micro_batch_size})")
    model_config = decoder_config(recipe, vocab)
    ds_config = build_deepspeed_config(recipe.deepspeed, t, c.num_workers, c.use_gpu)
    return NLGPlan(recipe, data_uri, manifest, model_config, ds_config)


def decoder_config(recipe: NLGRecipe, vocab: int) -> DecoderConfig:
    """The model config of the recipe's `model.arch`, its nulls filled with the architecture's defaults."""
    m = recipe.model
    if m.arch == "gpt2":
        return GPTConfig(vocab_size=vocab, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                         n_embd=m.n_embd, dropout=m.dropout, bias=m.bias)
    return LlamaConfig(vocab_size=vocab, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                       n_kv_head=m.n_kv_head or m.n_head, n_embd=m.n_embd,
                       intermediate_size=m.intermediate_size or default_intermediate_size(m.n_embd),
                       rope_theta=m.rope_theta or 10000.0, rms_norm_eps=m.rms_norm_eps or 1e-5,
                       tie_embeddings=m.tie_embeddings, dropout=m.dropout)


def _lr_scheduler(t, lr_min: float, decay_steps: int):
    def make(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, t.lr, lr_min, t.warmup_steps, decay_steps) / t.lr)
    return make


def _peak_flops(t, device: torch.device) -> float | None:
    if t.peak_flops:
        return t.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return None


def _val_batches(shard_uris: list[str], seq_len: int, micro_batch: int, n: int, seed: int, rank: int,
                 world: int) -> list:
    """The same fixed validation windows at every evaluation: this worker's share (every world-th row) of
    the validation split, read straight from storage and only as far as the first `n` micro-batches."""
    rows = worker_rows(shard_uris, rank, world, ROWS_PER_FETCH)
    out = []
    for mb in WindowStream(rows, seq_len, micro_batch, seed, 0, rank, shuffle_buffer=1, offset=0):
        out.append(mb)
        if len(out) == n:
            break
    return out


def export_model(engine, model_config: DecoderConfig, run_uri: str, data_uri: str, recipe_yaml: str, rank: int) -> None:
    """Write `<run>/export/` (genai/export.py: our safetensors weights, model config, tokenizer, recipe, and the
    Hugging Face copy in hf/) from the fp32 master weights. Every rank calls it (assembling the weights is
    collective); rank 0 writes."""
    state = master_weights(engine, rank)
    if rank != 0:
        return
    tokenizer_json = resolve(data_uri).join(TOKENIZER_FILE).read_text()
    write_gpt_export(resolve(run_uri).join(EXPORT_DIR), state, model_config, tokenizer_json, recipe_yaml)


def train_loop_per_worker(cfg: dict) -> None:
    """Runs in each Ray Train worker: DeepSpeed engine, streamed batches, eval, logging, checkpoints."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    recipe = NLGRecipe.model_validate(cfg["recipe"])
    t, c = recipe.train, recipe.cluster
    rank, world, device = init_worker(c.torch_threads, cfg.get("console"), cfg["run_uri"])
    train_rows = EpochRows(ray.train.get_dataset_shard("train"), ROWS_PER_FETCH, prefetch_batches=4)
    set_tf32(t.tf32, device)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model_config = config_from_dict(cfg["model_config"])
    model = build_model(model_config, activation_checkpointing=recipe.model.activation_checkpointing,
                        loss_chunk_tokens=recipe.model.loss_chunk_tokens)
    # Counted before deepspeed.initialize: ZeRO-3 partitions the parameters (numel() is 0 afterwards).
    n_params, flops_per_token = model.num_params(), model.flops_per_token(recipe.seq_len)
    ds_config = cfg["ds_config"]
    groups = model.optimizer_groups(t.weight_decay)
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")
    min_lr = t.min_lr if t.min_lr is not None else t.lr / 10
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        config=ds_config, lr_scheduler=_lr_scheduler(t, min_lr, t.lr_decay_steps or t.max_steps))
    if t.compile:
        engine.compile()  # compiles the module in place: checkpoints keep its parameter names
    torch.manual_seed(t.seed + 1000 * rank)  # dropout differs across ranks

    seq_len, micro, accum = recipe.seq_len, t.micro_batch_size, t.grad_accum
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "tokens": 0, "world_size": world}
    checkpoint = start_checkpoint(cfg)
    if checkpoint:
        restored, restore_s = restore(checkpoint, {"model": engine}, rank, world)
        state.update(restored)
        # The recipe's schedule and AdamW settings win over the saved ones (a PBT trial may continue with another
        # train.lr); the groups are optimizer_groups' (decayed, not decayed).
        sched = engine.lr_scheduler
        sched.base_lrs = [t.lr] * len(sched.base_lrs)
        for group, fn, decay in zip(engine.optimizer.param_groups, sched.lr_lambdas, (t.weight_decay, 0.0)):
            group["initial_lr"], group["lr"] = t.lr, t.lr * fn(sched.last_epoch)
            group["betas"], group["weight_decay"] = (t.beta1, t.beta2), decay
    resumed_step = state["step"]

    logger = RunLogger(cfg["run_uri"], rank, resumed_step, t.max_steps)
    if checkpoint:
        logger.scalars(resumed_step, {"perf/restore_s": restore_s})
    if rank == 0 and resumed_step == 0:
        say(f"model: {n_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs/token; "
              f"{world} worker(s), ZeRO-{recipe.deepspeed.zero_stage}, "
              f"{resolve_precision(t.precision, c.use_gpu)}, device {device.type}")
    recipe_yaml = recipe_to_yaml(recipe)
    tokenizer_bytes = resolve(cfg["data_uri"]).join(TOKENIZER_FILE).read_bytes()

    def write_meta(meta_dir: str) -> None:
        os.makedirs(meta_dir, exist_ok=True)
        with open(os.path.join(meta_dir, "model_config.json"), "w") as f:
            json.dump(model_config.to_dict(), f, indent=2)
        with open(os.path.join(meta_dir, TOKENIZER_FILE), "wb") as f:
            f.write(tokenizer_bytes)
        with open(os.path.join(meta_dir, "recipe.yaml"), "w") as f:
            f.write(recipe_yaml)

    val_batches = _val_batches(cfg["val_shards"], seq_len, micro, t.eval_batches, t.seed, rank, world)
    n_val = torch.tensor([len(val_batches)], device=device)
    dist.all_reduce(n_val, op=dist.ReduceOp.MIN)
    val_batches = val_batches[: int(n_val.item())]

    def evaluate() -> float:
        engine.eval()
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for b in val_batches:
                b = to_device(b, device, t.pin_memory)
                total += engine(b[:, :-1], b[:, 1:])[1].float()
        engine.train()
        dist.all_reduce(total)
        return total.item() / max(1, len(val_batches) * world)

    def sample() -> str | None:
        from genai.data.tokenizers import tokenizer_from_json

        if recipe.deepspeed.zero_stage != 3 and rank != 0:
            return None  # under ZeRO-3 every rank takes part in each forward
        tok = tokenizer_from_json(tokenizer_bytes.decode())
        try:
            prompt = tok.encode(t.sample_prompt)
        except ValueError:
            prompt = tok.encode(tok.decode([0]))
        idx = torch.as_tensor(prompt, dtype=torch.long, device=device)[None, :]
        gen = torch.Generator(device=device).manual_seed(t.seed)
        engine.eval()
        out = generate(engine.module, idx, t.sample_tokens, temperature=0.8, top_k=200, generator=gen,
                       vocab_size=tok.vocab_size)
        engine.train()
        return tok.decode(out[0].tolist())

    peak = _peak_flops(t, device)
    tokens_per_step = micro * accum * world * seq_len
    loss_sum, loss_count = torch.zeros((), device=device), 0
    last = {"val_loss": None}
    step_t0 = time.perf_counter()
    steps_timed = 0

    def at_step_end(step: int, stopping: bool) -> None:
        nonlocal loss_sum, loss_count, step_t0, steps_timed
        metrics: dict = {}
        save = stopping or step % t.checkpoint_interval == 0 or step == t.max_steps
        if (save or step % t.log_interval == 0) and not torch.isfinite(loss_sum):
            raise FloatingPointError(f"training loss is {loss_sum.item()} by step {step}; the last checkpoint is "
                                     "intact (lower train.lr or raise train.warmup_steps)")
        if step % t.log_interval == 0 or step == t.max_steps:
            dt = (time.perf_counter() - step_t0) / max(1, steps_timed)
            loss = (loss_sum / max(1, loss_count)).item()
            tok_s = tokens_per_step / dt
            mfu = flops_per_token * tok_s / (peak * world) if peak else None
            lr = engine.get_lr()[0]
            logger.scalars(step, {"train/loss": loss, "train/lr": lr, "perf/tokens_per_s": tok_s,
                                  "perf/step_time_s": dt, "perf/mfu": mfu})
            parts = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
            if mfu is not None:
                parts["mfu"] = f"{100 * mfu:.1f}%"
            logger.progress(step, parts)
            metrics.update(train_loss=loss, lr=lr, tokens_per_s=tok_s)
            loss_sum, loss_count = torch.zeros((), device=device), 0
        if step % t.eval_interval == 0 or step == t.max_steps:
            val = evaluate()
            last["val_loss"] = val
            logger.scalars(step, {"val/loss": val, "val/perplexity": math.exp(min(val, 50))})
            if rank == 0:
                say(f"step {step}: val loss {val:.4f} (perplexity {math.exp(min(val, 50)):.2f})")
        if t.sample_interval and (step % t.sample_interval == 0 or step == t.max_steps):
            text = sample()
            if text is not None:
                logger.text(step, "samples", text)
        if save or step % t.eval_interval == 0:
            metrics.update(step=step, epoch=state["epoch"], val_loss=last["val_loss"], tokens=state["tokens"])
            logger.flush()
            if save:
                logger.scalars(step, {"perf/checkpoint_s": save_and_report({"model": engine}, dict(state), metrics,
                                                                           rank, write_meta)})
            else:
                ray.train.report(metrics)
        if metrics:
            step_t0, steps_timed = time.perf_counter(), 0

    def train_step(batches) -> None:
        nonlocal loss_sum, loss_count, steps_timed
        loss_sum += lm_step(engine, batches, accum, device, t.pin_memory)
        loss_count += accum
        state["tokens"] += tokens_per_step
        steps_timed += 1

    def open_epoch(epoch: int) -> WindowStream:
        return WindowStream(train_rows.epoch(), seq_len, micro, t.seed, epoch, rank,
                            recipe.data.shuffle_buffer_windows)

    def epoch_steps(epoch: int) -> int:
        return steps_per_epoch(cfg["train_worker_tokens"], seq_len, micro, accum, t.seed, epoch)

    stopped = run_epochs(state, t.max_steps, epoch_steps, open_epoch, accum, train_step, at_step_end,
                         StopFlag(cfg["run_uri"], rank, device, t.log_interval).requested)
    if stopped:
        logger.close()
        if rank == 0:
            say(f"stopped on request after step {state['step']}; its checkpoint is saved")
        return
    if resumed_step >= t.max_steps:  # already complete: report its result again (Tune, the driver's summary)
        if rank == 0:
            say(f"run already complete at step {resumed_step}; refreshing the export")
        ray.train.report({"step": resumed_step, "epoch": state["epoch"], "tokens": state["tokens"],
                          "val_loss": evaluate()})
    export_model(engine, model_config, cfg["run_uri"], cfg["data_uri"], recipe_yaml, rank)
    logger.close()
    if rank == 0:
        say(f"exported the model to {resolve(cfg['run_uri']).join(EXPORT_DIR).uri}")
