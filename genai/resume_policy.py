"""What a run's checkpoints fix: the one policy for resuming a run and for PBT continuing another trial's run.

A checkpoint holds weights and optimizer shards of one shape, in one ZeRO layout, in one precision, and it sits at
one position of one data order. So it fixes the model's shape, the ZeRO stage, the precision, and whatever
decides which batches came before it: the dataset, batch sizes, sequence length, seed and shuffle. What may
change is how training goes on from it: the learning-rate schedule and the optimizer's hyperparameters (the
loops apply the recipe's values over the restored state), the step budget, logging, intervals, resources, the
number of workers (the shards are resharded; the current epoch's data restarts) and where the run lives.

Every recipe field is in exactly one class below, per recipe kind (tests/test_resume_policy.py checks it):
    FIXED      a resumed run must keep it (compared by its effective value: train.seq_len null = model.block_size)
    DATASET    fixed too, but compared through the dataset it resolves to (the content), not as text
    HPARAM     may change on resume: a hyperparameter the loops apply over the restored state, which PBT may vary
               when it continues a trial from another trial's checkpoint
    FREE       may change on resume, and PBT does not vary it: the step budget, intervals, logging, evaluation,
               resources, names
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel

from cluster.deepspeed_config import resolve_precision

FIXED, DATASET, HPARAM, FREE = "fixed", "dataset", "hyperparameter", "free"

_CLUSTER = {
    # A resume on another worker count reshards the engines (genai/train/reshard.py: ZeRO 1-3 through DeepSpeed's
    # universal checkpoint, optimizer state and schedule carried). The global batch is num_workers x micro_batch x
    # grad_accum: it changes with num_workers, as the batch sizes stay FIXED here (rescaling grad_accum to keep it
    # is a new run), and the schedule counts steps, not samples. The data position cannot be carried (each
    # worker's rows and shuffle follow the worker count): the current epoch restarts its data from the beginning,
    # logged (genai/train/checkpoint.py restore), so the rows of its earlier steps are seen again, none skipped.
    "cluster.num_workers": FREE,
    "cluster.use_gpu": FREE,
    "cluster.cpus_per_worker": FREE,
    "cluster.torch_threads": FREE,
    "cluster.placement": FREE,
    "cluster.resource_wait_s": FREE,
    "cluster.storage": FREE,
    "cluster.run_name": FREE,
    "cluster.max_failures": FREE,
}


def _engine(prefix: str) -> dict[str, str]:
    """One DeepSpeed engine's section: its ZeRO stage and offloads shape the saved shards."""
    return {
        f"{prefix}.zero_stage": FIXED,
        f"{prefix}.offload_optimizer": FIXED,  # loading shards across an offload change is untested: refused
        f"{prefix}.offload_param": FIXED,
        f"{prefix}.overlap_comm": FREE,
        f"{prefix}.reduce_bucket_size": FREE,
        f"{prefix}.config_overrides": FIXED,  # raw DeepSpeed keys can change anything the shards hold
    }


_IMAGE_DATA = {
    "data.uri": DATASET,
    "data.source": DATASET,
    "data.val_fraction": DATASET,
    "data.cache_dir": DATASET,
    "data.shuffle_buffer": FIXED,
}

# genai/config.py ImageTrainConfig, shared by the vae, sr and cyclegan recipes.
_IMAGE_TRAIN = {
    "train.batch_size": FIXED,
    "train.max_steps": FREE,
    "train.lr": HPARAM,
    "train.beta1": HPARAM,
    "train.beta2": HPARAM,
    "train.grad_clip": HPARAM,
    "train.precision": FIXED,
    "train.seed": FIXED,
    "train.log_interval": FREE,
    "train.eval_interval": FREE,
    "train.eval_samples": FREE,
    "train.sample_interval": FREE,
    "train.sample_grid": FREE,
    "train.checkpoint_interval": FREE,
    "train.keep_checkpoints": FREE,
}


POLICY: dict[str, dict[str, str]] = {
    "gpt": {
        "kind": FIXED,
        "name": FREE,
        "model.init_from": FIXED,  # the pretrained model the run started from (its shape follows it)
        "model.n_layer": FIXED,
        "model.n_head": FIXED,
        "model.n_embd": FIXED,
        "model.block_size": FIXED,
        "model.dropout": HPARAM,
        "model.bias": FIXED,
        "model.activation": FIXED,
        "model.vocab_size": FIXED,
        "model.arch": FIXED,
        "model.n_kv_head": FIXED,
        "model.intermediate_size": FIXED,
        "model.rope_theta": FIXED,
        "model.rms_norm_eps": FIXED,
        "model.tie_embeddings": FIXED,
        "model.activation_checkpointing": FREE,  # how the backward pass gets activations, not what it computes
        "model.loss_chunk_tokens": FREE,  # the same loss, a chunk of logits at a time
        "data.uri": DATASET,
        "data.source": DATASET,
        "data.tokenizer": DATASET,
        "data.bpe_vocab_size": DATASET,
        "data.val_fraction": DATASET,
        "data.chunk_tokens": DATASET,
        "data.cache_dir": DATASET,
        "data.shuffle_buffer_tokens": FIXED,
        "train.micro_batch_size": FIXED,
        "train.grad_accum": FIXED,
        "train.global_batch_size": FREE,  # only a check of micro_batch x grad_accum x num_workers
        "train.seq_len": FIXED,
        "train.max_steps": FREE,
        "train.lr": HPARAM,
        "train.min_lr": HPARAM,
        "train.warmup_steps": HPARAM,
        "train.lr_decay_steps": HPARAM,
        "train.weight_decay": HPARAM,
        "train.beta1": HPARAM,
        "train.beta2": HPARAM,
        "train.grad_clip": HPARAM,
        "train.precision": FIXED,
        "train.seed": FIXED,
        "train.log_interval": FREE,
        "train.eval_interval": FREE,
        "train.eval_batches": FREE,
        "train.checkpoint_interval": FREE,
        "train.keep_checkpoints": FREE,
        "train.sample_interval": FREE,
        "train.sample_prompt": FREE,
        "train.sample_tokens": FREE,
        "train.peak_flops": FREE,
        "train.compile": FREE,  # checkpoints hold the module's own parameter names either way
        "train.tf32": FREE,  # rounding of fp32 products only; the weights and optimizer state are unchanged
        "train.pin_memory": FREE,
        **_engine("deepspeed"),
        **_CLUSTER,
    },
    "gan": {
        "kind": FIXED,
        "name": FREE,
        "model.image_size": FIXED,
        "model.channels": FIXED,
        "model.z_dim": FIXED,
        "model.ngf": FIXED,
        "model.ndf": FIXED,
        "model.conditional": FIXED,
        "model.loss": FREE,
        "model.spectral_norm": FIXED,
        "data.uri": DATASET,
        "data.source": DATASET,
        "data.val_fraction": DATASET,
        "data.cache_dir": DATASET,
        "data.shuffle_buffer": FIXED,
        "train.batch_size": FIXED,
        "train.max_steps": FREE,
        "train.n_critic": FIXED,  # real batches per step: a resumed epoch skips epoch_step x n_critic of them
        "train.lr_g": HPARAM,
        "train.lr_d": HPARAM,
        "train.beta1": HPARAM,
        "train.beta2": HPARAM,
        "train.gp_weight": HPARAM,
        "train.grad_clip": HPARAM,
        "train.ema_decay": HPARAM,
        "train.precision": FIXED,
        "train.seed": FIXED,
        "train.log_interval": FREE,
        "train.eval_interval": FREE,
        "train.eval_samples": FREE,
        "train.classifier": FREE,
        "train.sample_interval": FREE,
        "train.sample_grid": FREE,
        "train.checkpoint_interval": FREE,
        "train.keep_checkpoints": FREE,
        "train.collapse_patience": FREE,
        **_engine("deepspeed.generator"),
        **_engine("deepspeed.discriminator"),
        **_CLUSTER,
    },
    "vae": {
        "kind": FIXED,
        "name": FREE,
        "model.image_size": FIXED,
        "model.channels": FIXED,
        "model.z_dim": FIXED,
        "model.width": FIXED,
        "model.hidden": FIXED,
        "model.conditional": FIXED,
        "model.beta": HPARAM,  # the loss's KL weight, applied at every step
        "model.likelihood": FIXED,  # what the decoder's outputs mean
        "model.sigma": HPARAM,
        **_IMAGE_DATA,
        **_IMAGE_TRAIN,
        "train.classifier": FREE,
        **_engine("deepspeed"),
        **_CLUSTER,
    },
    "sr": {
        "kind": FIXED,
        "name": FREE,
        "model.scale": FIXED,
        "model.channels": FIXED,
        "model.features": FIXED,
        "model.blocks": FIXED,
        "model.bicubic_skip": FIXED,
        "model.pixel_loss": FREE,
        "model.adversarial": FIXED,  # whether a discriminator engine is in the checkpoints
        "model.adversarial_loss": FREE,
        "model.perceptual": FREE,
        "model.ndf": FIXED,
        "data.uri": DATASET,
        "data.source": DATASET,
        "data.val_fraction": DATASET,
        "data.cache_dir": DATASET,
        **_IMAGE_TRAIN,
        "train.patch_size": FIXED,  # the training pairs of each step follow from it (and the seed)
        "train.augment": FIXED,
        "train.lr_d": HPARAM,
        "train.pixel_weight": HPARAM,
        "train.feature_weight": HPARAM,
        "train.adversarial_weight": HPARAM,
        "train.eval_size": FREE,
        "train.init_from": FREE,  # only a fresh run reads it
        **_engine("deepspeed.generator"),
        **_engine("deepspeed.discriminator"),
        **_CLUSTER,
    },
    "cyclegan": {
        "kind": FIXED,
        "name": FREE,
        "model.image_size": FIXED,
        "model.channels_a": FIXED,
        "model.channels_b": FIXED,
        "model.ngf": FIXED,
        "model.ndf": FIXED,
        "model.blocks": FIXED,
        "model.d_layers": FIXED,
        "model.lambda_cycle": HPARAM,
        "model.lambda_identity": FIXED,  # whether the identity mappings are computed at all
        "model.pool_size": FIXED,  # the saved pools hold this many images
        "data.domain_a": DATASET,
        "data.domain_b": DATASET,
        "data.style": DATASET,
        "data.val_fraction": DATASET,
        **_IMAGE_TRAIN,
        "train.classifier": FREE,
        **_engine("deepspeed.generators"),
        **_engine("deepspeed.discriminators"),
        **_CLUSTER,
    },
}

_MISSING = object()

# Fields compared by the value the run actually used, from the fields it depends on (null or `auto` resolved the
# way the loops resolve it).
EFFECTIVE: dict[str, tuple[tuple[str, ...], Callable[..., Any]]] = {
    "train.seq_len": (("train.seq_len", "model.block_size"), lambda seq_len, block_size: seq_len or block_size),
    "train.precision": (("train.precision", "cluster.use_gpu"), resolve_precision),
}


def fields(kind: str, *classes: str) -> tuple[str, ...]:
    """The recipe fields of `kind` in the given classes, in recipe order."""
    return tuple(path for path, cls in POLICY[kind].items() if cls in classes)


def fixed_fields(kind: str) -> tuple[str, ...]:
    """Fields a resumed run must keep (the DATASET fields are compared through the dataset's identity)."""
    return fields(kind, FIXED)


def mutable_fields(kind: str) -> tuple[str, ...]:
    """Fields a resumed run may change."""
    return fields(kind, HPARAM, FREE)


def pbt_fields(kind: str) -> tuple[str, ...]:
    """Fields PBT may vary when a trial continues from another trial's checkpoint."""
    return fields(kind, HPARAM)


def _getter(recipe: dict) -> Callable[[str], Any]:
    def get(path: str) -> Any:
        node: Any = recipe
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node
    return get


def _value(get: Callable[[str], Any], path: str) -> Any:
    """The field's effective value (its raw value when the recipe lacks what that depends on), or _MISSING."""
    if path in EFFECTIVE:
        inputs, resolve = EFFECTIVE[path]
        values = [get(p) for p in inputs]
        if _MISSING not in values:
            return resolve(*values)
    return get(path)


def changed_fields(kind: str, saved: dict, new: dict,
                   classes: tuple[str, ...] = (FIXED,)) -> list[tuple[str, Any, Any]]:
    """(field, saved value, new value) for every field of `classes` whose effective value differs between a run's
    saved recipe and a new one (both as plain YAML/JSON dicts). A field the saved recipe does not record (a
    recipe file from an older version, or written by hand) is not compared."""
    old_get, new_get = _getter(saved), _getter(new)
    out = []
    for path in fields(kind, *classes):
        old = _value(old_get, path)
        if old is _MISSING:
            continue
        value = _value(new_get, path)
        if old != value:
            out.append((path, old, value))
    return out


def dataset_identity(uri: str, manifest: dict) -> dict:
    """What a run records of its dataset: where it was read and a fingerprint of what it holds."""
    from genai.data.shards import dataset_fingerprint  # pulls in pyarrow, which genai.config must not need

    return {"uri": uri, "fingerprint": dataset_fingerprint(manifest)}


def resume_conflicts(kind: str, saved: dict, new: dict, saved_data: dict | None = None,
                     new_data: dict | None = None) -> list[tuple[str, Any, Any]]:
    """(field, saved value, new value) for everything a resumed run would change that its checkpoints fix: the
    FIXED fields, and the dataset. The dataset is compared by content when both identities are known (a copy
    moved to other storage, or the cache a null data.uri resolves to, is the same dataset), else by the DATASET
    fields as written (a run folder from before identities were recorded)."""
    out = changed_fields(kind, saved, new)
    if saved_data and new_data:
        if saved_data.get("fingerprint") != new_data.get("fingerprint"):
            out.append(("data.uri", _describe(saved_data), _describe(new_data)))
    else:
        out += changed_fields(kind, saved, new, (DATASET,))
    return out


def _describe(data: dict) -> str:
    return f"{data.get('uri')} (content {str(data.get('fingerprint'))[:12]})"


def recipe_field_paths(recipe_class: type) -> list[str]:
    """Every leaf field of a recipe class as a dotted path (`train.lr`), sections recursed, in declaration order."""

    def walk(cls: type, prefix: str):
        for name, info in cls.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from walk(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    return list(walk(recipe_class, ""))
