"""GPT training: the plan made on the driver (no Ray) and the family the training skeleton (genai/train/loop.py) runs
in every Ray Train worker."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from cluster.deepspeed_config import build_deepspeed_config, resolve_precision
from cluster.storage import resolve
from genai.config import ConfigError, NLGRecipe
from genai.data.batches import WindowStream, epoch_offset, shard_order, window_count
from genai.data.text_dataset import (DatasetError, TextManifest, ensure_dataset, load_manifest, verify_shards,
                                     worker_rows)
from genai.data.tokenizers import TOKENIZER_FILE
from genai.models import DecoderConfig, GPTConfig, LlamaConfig, build_model, config_from_dict, generate
from genai.models.llama import default_intermediate_size
from genai.export import write_gpt_export
from genai.pretrained import init_recipe, load_init_weights
from genai.run import export_location
from genai.train.checkpoint import master_weights
from genai.train.family import Family
from genai.train.schedule import warmup_cosine
from genai.train.steps import lm_step, set_tf32, to_device
from genai.train.tracking import say

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
        """Ray Data streams the training split, its shards in the seed's order; the workers read their few
        validation rows themselves."""
        return {"train": shard_order(self.manifest.shard_uris("train"), self.recipe.train.seed)}

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
    """Resolve the dataset (preparing it into the cache if needed) and check it fits the recipe; with
    model.init_from, the plan's recipe has the pretrained model's shape (genai/pretrained.py)."""
    d, t, c = recipe.data, recipe.train, recipe.cluster
    data_uri = d.uri or ensure_dataset(d.source, d.tokenizer, d.bpe_vocab_size, d.val_fraction, d.chunk_tokens,
                                       d.cache_dir, log=log)
    manifest = load_manifest(data_uri)
    verify_shards(manifest)
    if recipe.model.init_from:
        recipe = init_recipe(recipe, manifest)
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
                         n_embd=m.n_embd, dropout=m.dropout, bias=m.bias, activation=m.activation)
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
    for mb in WindowStream(rows, seq_len, micro_batch, seed, 0, rank, shuffle_tokens=0, offset=0):
        out.append(mb)
        if len(out) == n:
            break
    return out


class GPTFamily(Family):
    """A decoder LM (GPT-2 or Llama) on one DeepSpeed engine: streamed token windows, validation loss, text
    samples, the safetensors + Hugging Face export."""

    kind, job, counter = "gpt", "jobs/train_nlg.py", "tokens"
    rows_per_fetch, prefetch_batches = ROWS_PER_FETCH, 4
    eval_defaults = {"val_loss": None}
    plan = staticmethod(plan_nlg_run)

    @staticmethod
    def summary(run, metrics: dict) -> tuple[str, list[str]]:
        val = metrics.get("val_loss")
        return (f", val loss {val:.4f}" if isinstance(val, float) else "",
                [f"generate:    python jobs/generate.py --checkpoint {run.uri} --prompt 'ROMEO:'"])

    def __init__(self, recipe: NLGRecipe, cfg: dict, worker):
        super().__init__(recipe, cfg, worker)
        self.batches_per_step = self.t.grad_accum

    def build(self) -> dict:
        import deepspeed

        recipe, t, device = self.recipe, self.t, self.worker.device
        set_tf32(t.tf32, device)
        self.model_config = config_from_dict(self.cfg["model_config"])
        model = build_model(self.model_config, activation_checkpointing=recipe.model.activation_checkpointing,
                            loss_chunk_tokens=recipe.model.loss_chunk_tokens)
        if recipe.model.init_from:  # before deepspeed.initialize partitions them; a resumed run's checkpoint wins
            model.load_state_dict(load_init_weights(recipe.model.init_from, self.model_config))
        # Counted before deepspeed.initialize: ZeRO-3 partitions the parameters (numel() is 0 afterwards).
        self.n_params, self.flops_per_token = model.num_params(), model.flops_per_token(recipe.seq_len)
        ds_config = self.cfg["ds_config"]
        groups = model.optimizer_groups(t.weight_decay)
        optimizer = None
        if "optimizer" not in ds_config:
            optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")
        min_lr = t.min_lr if t.min_lr is not None else t.lr / 10
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
            config=ds_config, lr_scheduler=_lr_scheduler(t, min_lr, t.lr_decay_steps or t.max_steps))
        if t.compile:
            self.engine.compile()  # compiles the module in place: checkpoints keep its parameter names
        return {"model": self.engine}

    def new_state(self) -> dict:
        return {"step": 0, "epoch": 0, "epoch_step": 0, "tokens": 0}

    def rebase(self) -> None:
        # The recipe's schedule and AdamW settings win over the saved ones (a PBT trial may continue with another
        # train.lr); the groups are optimizer_groups' (decayed, not decayed).
        t, engine = self.t, self.engine
        sched = engine.lr_scheduler
        sched.base_lrs = [t.lr] * len(sched.base_lrs)
        for group, fn, decay in zip(engine.optimizer.param_groups, sched.lr_lambdas, (t.weight_decay, 0.0)):
            group["initial_lr"], group["lr"] = t.lr, t.lr * fn(sched.last_epoch)
            group["betas"], group["weight_decay"] = (t.beta1, t.beta2), decay

    def describe(self) -> str:
        t, w = self.t, self.worker
        return (f"model: {self.n_params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOPs/token; "
                f"{w.world} worker(s), ZeRO-{self.recipe.deepspeed.zero_stage}, "
                f"{resolve_precision(t.precision, self.recipe.cluster.use_gpu)}, device {w.device.type}")

    def prepare(self) -> None:
        import torch.distributed as dist

        t, w = self.t, self.worker
        self.tokenizer_bytes = resolve(self.cfg["data_uri"]).join(TOKENIZER_FILE).read_bytes()
        val_batches = _val_batches(self.cfg["val_shards"], self.recipe.seq_len, t.micro_batch_size, t.eval_batches,
                                   t.seed, w.rank, w.world)
        n_val = torch.tensor([len(val_batches)], device=w.device)
        dist.all_reduce(n_val, op=dist.ReduceOp.MIN)
        self.val_batches = val_batches[: int(n_val.item())]
        self.peak = _peak_flops(t, w.device)
        self.tokens_per_step = t.micro_batch_size * t.grad_accum * w.world * self.recipe.seq_len
        self.loss_sum, self.loss_count = torch.zeros((), device=w.device), 0

    def epoch_steps(self, epoch: int) -> int:
        t = self.t
        return steps_per_epoch(self.cfg["train_worker_tokens"], self.recipe.seq_len, t.micro_batch_size, t.grad_accum,
                               t.seed, epoch)

    def open_epoch(self, epoch: int, rows) -> WindowStream:
        return WindowStream(rows.epoch(), self.recipe.seq_len, self.t.micro_batch_size, self.t.seed, epoch,
                            self.worker.rank, self.recipe.data.shuffle_buffer_tokens)

    def step(self, batches, state: dict) -> None:
        self.loss_sum += lm_step(self.engine, batches, self.t.grad_accum, self.worker.device, self.t.pin_memory)
        self.loss_count += self.t.grad_accum
        state["tokens"] += self.tokens_per_step

    def log_train(self, step: int, seconds_per_step: float) -> dict:
        t, logger = self.t, self.worker.logger
        if not torch.isfinite(self.loss_sum):
            raise FloatingPointError(f"training loss is {self.loss_sum.item()} by step {step}; the last checkpoint is "
                                     "intact (lower train.lr or raise train.warmup_steps)")
        if not (step % t.log_interval == 0 or step == t.max_steps):
            return {}
        dt = seconds_per_step
        loss = (self.loss_sum / max(1, self.loss_count)).item()
        tok_s = self.tokens_per_step / dt
        mfu = self.flops_per_token * tok_s / (self.peak * self.worker.world) if self.peak else None
        lr = self.engine.get_lr()[0]
        logger.scalars(step, {"train/loss": loss, "train/lr": lr, "perf/tokens_per_s": tok_s,
                              "perf/step_time_s": dt, "perf/mfu": mfu})
        parts = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
        if mfu is not None:
            parts["mfu"] = f"{100 * mfu:.1f}%"
        logger.progress(step, parts)
        self.loss_sum, self.loss_count = torch.zeros((), device=self.worker.device), 0
        return {"train_loss": loss, "lr": lr, "tokens_per_s": tok_s}

    def samples(self, step: int) -> None:
        from genai.data.tokenizers import tokenizer_from_json

        t, w, engine = self.t, self.worker, self.engine
        if self.recipe.deepspeed.zero_stage != 3 and w.rank != 0:
            return  # under ZeRO-3 every rank takes part in each forward
        tok = tokenizer_from_json(self.tokenizer_bytes.decode())
        try:
            prompt = tok.encode(t.sample_prompt)
        except ValueError:
            prompt = tok.encode(tok.decode([0]))
        idx = torch.as_tensor(prompt, dtype=torch.long, device=w.device)[None, :]
        gen = torch.Generator(device=w.device).manual_seed(t.seed)
        engine.eval()
        out = generate(engine.module, idx, t.sample_tokens, temperature=0.8, top_k=200, generator=gen,
                       vocab_size=tok.vocab_size)
        engine.train()
        w.logger.text(step, "samples", tok.decode(out[0].tolist()))

    def evaluate(self) -> dict:
        import torch.distributed as dist

        engine, device = self.engine, self.worker.device
        engine.eval()
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for b in self.val_batches:
                b = to_device(b, device, self.t.pin_memory)
                total += engine(b[:, :-1], b[:, 1:])[1].float()
        engine.train()
        dist.all_reduce(total)
        return {"val_loss": total.item() / max(1, len(self.val_batches) * self.worker.world)}

    def log_eval(self, step: int, metrics: dict) -> None:
        val = metrics["val_loss"]
        self.worker.logger.scalars(step, {"val/loss": val, "val/perplexity": math.exp(min(val, 50))})
        if self.worker.rank == 0:
            say(f"step {step}: val loss {val:.4f} (perplexity {math.exp(min(val, 50)):.2f})")

    def write_meta(self, meta_dir: str) -> None:
        super().write_meta(meta_dir)
        with open(os.path.join(meta_dir, TOKENIZER_FILE), "wb") as f:
            f.write(self.tokenizer_bytes)

    def export(self, state: dict) -> str:
        """`<run>/export/` (genai/export.py: our safetensors weights, model config, tokenizer, recipe, and the Hugging
        Face copy in hf/) from the fp32 master weights (assembling them is collective; rank 0 writes)."""
        weights = master_weights(self.engine, self.worker.rank)
        if self.worker.rank == 0:
            write_gpt_export(export_location(self.worker.run_uri), weights, self.model_config,
                             self.tokenizer_bytes.decode(), self.recipe_yaml)
        return "the model"
