"""Typed recipes: YAML files validated into pydantic models before any cluster time is spent.

A recipe has five sections (`model`, `data`, `train`, `deepspeed`, `cluster`). Every field is
documented here; `--set section.field=value` overrides any of them from the command line.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.names import NAME_MAX, NAME_RULE, check_name
from genai.resume_policy import mutable_fields, pbt_fields

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
# Marks a setting a user must fill in before a shipped command runs (S3 bucket names cannot contain it).
PLACEHOLDER = "REPLACE_ME"


class ConfigError(ValueError):
    """A recipe, override or argument is invalid; the message names the field and the reason."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping gives the same key twice."""


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the SafeLoader reports it
                continue
            if first is not None:
                raise DuplicateKeyError(None, None, f"duplicate key {key!r}, first given on line {first + 1}",
                                        key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, origin: str) -> Any:
    """Parse a user's YAML document strictly; ConfigError names the origin, the line and the problem."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise ConfigError(f"{origin}:{where} is not valid YAML ({problem})") from None


def read_yaml_file(path: Path, what: str) -> Any:
    """Read and strictly parse a user's YAML file (`what`: 'recipe', 'sweep') that must exist."""
    if path.is_dir():
        raise ConfigError(f"{what} file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a {what} is a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{what} file {path}: cannot read it ({exc.strerror or exc})") from None
    return parse_yaml(text, str(path))


# A name that becomes a folder or object key under storage (a run, a sweep).
PathName = Annotated[str, AfterValidator(check_name)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Decoder-only transformer shape."""

    init_from: str | None = Field(None, description=(
        "Start from a pretrained Hugging Face model (fine-tuning): a folder or s3:// prefix of a GPT2LMHeadModel or "
        "LlamaForCausalLM as save_pretrained writes it (config.json, model.safetensors or its shards, "
        "tokenizer.json). Its config.json gives the model's shape (the fields below are taken from it; dropout, "
        "activation_checkpointing and loss_chunk_tokens stay the recipe's), its weights the starting weights, and "
        "the dataset must be prepared with its tokenizer (jobs/prepare_data.py --tokenizer <the folder>). "
        f"{PLACEHOLDER}: a recipe that needs one (--init-from). Null: random initial weights."))
    arch: Literal["gpt2", "llama"] = Field("gpt2", description=(
        "Architecture: gpt2 (learned positions, LayerNorm, GELU MLP, tied embeddings; genai/models/gpt.py) or llama "
        "(rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases; genai/models/llama.py). The "
        "fields marked 'llama' apply to it only."))
    n_layer: int = Field(4, ge=1, description="Number of transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block.")
    n_embd: int = Field(128, ge=1, description="Residual stream width; divisible by n_head.")
    block_size: int = Field(64, ge=2, description="Context length: the most positions the model can attend over.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention, MLP and embeddings.")
    bias: bool = Field(False, description="gpt2: bias terms in Linear and LayerNorm layers (GPT-2 uses them; llama has none).")
    activation: Literal["gelu", "gelu_new"] = Field("gelu", description=(
        "gpt2: the MLP's GELU, exact (gelu) or the tanh approximation GPT-2 itself uses (gelu_new, as transformers "
        "names it: the Hub's GPT-2 checkpoints). llama uses SwiGLU."))
    vocab_size: int | None = Field(
        None, ge=2, description="Vocabulary size; null takes the dataset's tokenizer size (rounded up to a multiple of 64)."
    )
    n_kv_head: int | None = Field(None, ge=1, description=(
        "llama: key/value heads, shared by groups of query heads (grouped-query attention); n_head must be a "
        "multiple. Null: n_head (multi-head attention)."))
    intermediate_size: int | None = Field(None, ge=1, description=(
        "llama: hidden width of the SwiGLU MLP. Null: 8/3 x n_embd rounded up to a multiple of 64 (about the "
        "parameters of GPT-2's 4 x n_embd MLP)."))
    rope_theta: float | None = Field(None, gt=0, description="llama: base of the rotary embedding's frequencies. Null: 10000.")
    rms_norm_eps: float | None = Field(None, gt=0, description="llama: epsilon of RMSNorm. Null: 1e-5.")
    tie_embeddings: bool = Field(True, description=(
        "Share the output head's weights with the token embeddings. gpt2 always does; llama may not (false: "
        "a separate head of vocab_size x n_embd parameters)."))
    activation_checkpointing: bool = Field(False, description=(
        "Recompute each transformer block's activations in the backward pass instead of keeping them "
        "(torch.utils.checkpoint): less memory for about a third more compute; the same loss and gradients."))
    loss_chunk_tokens: int = Field(0, ge=0, description=(
        "Compute the training loss over the vocabulary this many positions at a time, so a micro-batch's full "
        "(batch, seq_len, vocab) logits never exist at once (they dominate memory at a 50k vocabulary); the same "
        "loss and gradients within float rounding. 0: all positions at once."))

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.arch == "gpt2":
            for name in ("n_kv_head", "intermediate_size", "rope_theta", "rms_norm_eps"):
                if getattr(self, name) is not None:
                    raise ValueError(f"model.{name}={getattr(self, name)} applies to model.arch=llama only (this "
                                     "recipe's model.arch is gpt2); remove it or set it to null")
            if not self.tie_embeddings:
                raise ValueError("model.tie_embeddings=false needs model.arch=llama (GPT-2 ties its output head to "
                                 "the token embeddings)")
            return self
        if self.bias:
            raise ValueError("model.bias=true: model.arch=llama has no biases")
        if self.activation != "gelu":
            raise ValueError(f"model.activation={self.activation} applies to model.arch=gpt2 only (llama's MLP is "
                             "SwiGLU)")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head} (each "
                             "key/value head serves the same number of query heads)")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"model.n_embd / model.n_head = {self.n_embd // self.n_head} is odd: rotary embeddings "
                             "(model.arch=llama) rotate pairs of a head's dimensions")
        return self


class DataConfig(_Section):
    """Where the training tokens come from."""

    uri: str | None = Field(None, description=(
        "Prepared dataset (a folder or URI holding manifest.json). Null: prepare `source` into the cache. "
        f"A URI containing {PLACEHOLDER} is a placeholder (in the shipped Kubernetes jobs) and refused."))
    source: str | None = Field(
        "builtin:shakespeare",
        description=("Corpus to prepare when `uri` is null: a file, a folder, an http(s) URL or builtin:shakespeare / "
                     "builtin:pydoc. Null: none, `uri` is required (recipes meant for a large prepared corpus)."),
    )
    tokenizer: Literal["char", "bpe"] = Field("char", description="Tokenizer to train on the corpus when preparing.")
    bpe_vocab_size: int = Field(4096, ge=260, description="Vocabulary size of the byte-level BPE tokenizer.")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of the corpus held out for validation.")
    chunk_tokens: int = Field(1024, ge=8, description=(
        "Tokens per parquet row when preparing; any size serves any seq_len (windows cross rows)."))
    cache_dir: str = Field(
        "~/.cache/genai-cluster/datasets", description="Where datasets prepared on first use are kept."
    )
    shuffle_buffer_tokens: int = Field(1 << 23, ge=0, description=(
        "Tokens each worker shuffles together (a seeded, resumable shuffle of the windows cut from them; held in "
        "the dataset's dtype, 2-4 bytes a token). Rows arrive in corpus order, so batches are as random as "
        "uniformly drawn windows only when a buffer holds a large share of an epoch's tokens: the default holds "
        "all of an 8M-token corpus and, at gpt2-small shapes, fills no later than the 8192 windows it replaced; the "
        "training shards are read in a seeded order, so a buffer of a larger corpus holds text from across it. 0: no "
        "shuffle."))

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        if isinstance(values, dict) and "shuffle_buffer_windows" in values:
            raise ValueError("data.shuffle_buffer_windows is now data.shuffle_buffer_tokens (windows x seq_len; "
                             "a buffer of windows too small to cover an epoch made batches less random)")
        return values

    @model_validator(mode="after")
    def _dataset_given(self) -> "DataConfig":
        if self.uri is not None and PLACEHOLDER in self.uri:
            raise ValueError(f"data.uri={self.uri} is a placeholder: prepare the dataset with jobs/prepare_data.py "
                             "--out URI (docs/deploy.md) and give that URI")
        if self.uri is None and self.source is None:
            raise ValueError("data.uri is required: this recipe names no corpus to prepare (data.source is null); "
                             "prepare one with jobs/prepare_data.py --out URI and pass --data URI")
        return self


class TrainConfig(_Section):
    """Optimisation, evaluation, logging and checkpointing."""

    micro_batch_size: int = Field(12, ge=1, description="Sequences per worker per forward/backward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(
        None, ge=1, description="Sequences per optimizer step over all workers; if set it must equal micro_batch_size x grad_accum x num_workers."
    )
    seq_len: int | None = Field(
        None, ge=2, description="Tokens per training sequence; null uses model.block_size. At most model.block_size."
    )
    max_steps: int = Field(2000, ge=1, description="Optimizer steps to train for.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate (AdamW).")
    min_lr: float | None = Field(None, ge=0.0, description="Learning rate at the end of the cosine decay; null = lr / 10.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    lr_decay_steps: int | None = Field(None, ge=1, description="Step at which cosine decay reaches min_lr; null = max_steps.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (not applied to biases, norms, embeddings of position).")
    beta1: float = Field(0.9, gt=0.0, lt=1.0, description="AdamW beta1.")
    beta2: float = Field(0.99, gt=0.0, lt=1.0, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this value; 0 disables.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Training precision: auto = bf16 on GPU, fp32 on CPU."
    )
    seed: int = Field(1337, description="Seed for weights, dropout and data order.")
    log_interval: int = Field(10, ge=1, description="Steps between progress lines and scalar logs.")
    eval_interval: int = Field(250, ge=1, description="Steps between validation passes.")
    eval_batches: int = Field(20, ge=1, description="Micro-batches per worker in each validation pass.")
    checkpoint_interval: int = Field(500, ge=1, description="Steps between checkpoints (the run always checkpoints at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept in storage.")
    sample_interval: int = Field(500, ge=0, description="Steps between text samples logged to TensorBoard; 0 disables.")
    sample_prompt: str = Field("\n", description="Prompt for the text samples.")
    sample_tokens: int = Field(200, ge=1, description="Tokens generated per text sample.")
    peak_flops: float | None = Field(
        None, gt=0, description="Peak FLOP/s of one device for MFU; null looks the GPU up in a table (no MFU on CPU)."
    )
    compile: bool = Field(False, description=(
        "torch.compile the model (DeepSpeed's engine.compile): faster steps on GPU after a compile of a minute or "
        "so at start; the loss agrees with eager mode within float rounding."))
    tf32: bool = Field(False, description=(
        "On GPU, run fp32 matrix products on TF32 tensor cores (torch.set_float32_matmul_precision('high')): much "
        "faster fp32 training at a 10-bit mantissa; bf16 and fp16 products are unaffected. No effect on CPU."))
    pin_memory: bool = Field(True, description=(
        "On GPU, copy each batch to the device from pinned (page-locked) host memory, asynchronously. No effect "
        "on CPU, nor on the numbers."))


class DeepSpeedSection(_Section):
    """DeepSpeed engine settings; the project builds the full DeepSpeed config from these."""

    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage: 0 (data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters).")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="Keep optimizer states (and step) on the CPU; stages 1-3.")
    offload_param: Literal["none", "cpu"] = Field("none", description="Keep parameters on the CPU between uses; stage 3 only.")
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with the backward pass (stages 1-3).")
    reduce_bucket_size: int = Field(50_000_000, ge=1, description="Elements per gradient reduction bucket.")
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Raw DeepSpeed config keys merged last, for settings not modelled here."
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedSection":
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage = 3")
        return self


class ClusterConfig(_Section):
    """How many workers, on what, and where runs are stored."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU on GPU clusters).")
    use_gpu: bool = Field(False, description="Give each worker a GPU.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (fractions allowed; leave some for Ray Data).")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per worker; null: as many as cpus_per_worker (at least 1).")
    placement: Literal["pack", "spread"] = Field("pack", description=(
        "Where Ray puts the workers: pack (fill one node, then the next: the fastest collectives) or spread (one "
        "per node where the nodes allow it: each node's memory and network, fewer workers lost with a node). "
        "Best effort: workers are packed when there are fewer nodes than workers."))
    resource_wait_s: float = Field(600, ge=0, description="On a Ray cluster (RAY_ADDRESS): how long to wait for room for the workers (an autoscaler adding nodes) before failing; the embedded local Ray fails at once.")
    storage: str = Field("~/genai-runs", description="Where runs (checkpoints, TensorBoard, exports) live: a folder or URI.")
    run_name: PathName | None = Field(None, description=(
        f"Run folder under storage; rerunning with the same name resumes. Null: <recipe>-<timestamp>. {NAME_RULE}."))
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts from the last checkpoint before giving up; -1 = unlimited.")


class NLGRecipe(_Section):
    """A GPT-style language-model training recipe."""

    kind: Literal["gpt"] = Field("gpt", description="Recipe kind: gpt.")
    name: PathName = Field("custom", description=f"Recipe name (defaults the run name); {NAME_RULE}.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "NLGRecipe":
        t, m, c = self.train, self.model, self.cluster
        if t.seq_len is not None and t.seq_len > m.block_size and m.init_from is None:  # else: its config's context
            raise ValueError(
                f"train.seq_len={t.seq_len} is larger than the model's context model.block_size={m.block_size}"
            )
        if t.global_batch_size is not None:
            product = t.micro_batch_size * t.grad_accum * c.num_workers
            if product != t.global_batch_size:
                raise ValueError(
                    f"train.global_batch_size={t.global_batch_size} does not equal train.micro_batch_size x "
                    f"train.grad_accum x cluster.num_workers = {t.micro_batch_size} x {t.grad_accum} x "
                    f"{c.num_workers} = {product}"
                )
        if t.warmup_steps >= t.max_steps and t.max_steps > 1:
            raise ValueError(f"train.warmup_steps={t.warmup_steps} must be smaller than train.max_steps={t.max_steps}")
        if t.precision == "fp16" and not c.use_gpu:
            raise ValueError("train.precision=fp16 needs cluster.use_gpu=true (DeepSpeed's fp16 loss scaling is GPU-only)")
        return self

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.block_size


class GANModelConfig(_Section):
    """DCGAN generator/discriminator shape and the adversarial loss."""

    image_size: int = Field(28, ge=8, description="Image height and width; must match the dataset and be divisible by 4.")
    channels: int = Field(1, ge=1, le=4, description="Image channels; must match the dataset.")
    z_dim: int = Field(64, ge=1, description="Latent noise dimensions.")
    ngf: int = Field(64, ge=2, description="Generator width (feature maps of its last layer x 2).")
    ndf: int = Field(64, ge=2, description="Discriminator width (feature maps of its first layer).")
    conditional: bool = Field(False, description="Class-conditional generator and projection discriminator.")
    loss: Literal["nonsaturating", "hinge", "wgan-gp"] = Field(
        "nonsaturating", description="nonsaturating (DCGAN), hinge, or wgan-gp (Wasserstein with gradient penalty).")
    spectral_norm: bool = Field(False, description="Spectral normalisation on the discriminator's layers.")

    @model_validator(mode="after")
    def _size(self) -> "GANModelConfig":
        if self.image_size % 4:
            raise ValueError(f"model.image_size={self.image_size} must be divisible by 4")
        return self


class ImageDataConfig(_Section):
    """Where the training images come from."""

    uri: str | None = Field(
        None, description="Prepared image dataset (a folder or URI holding manifest.json). Null: prepare `source` into the cache.")
    source: str = Field(
        "builtin:digits", description="Images to prepare when `uri` is null: builtin:digits, mnist:<folder or URI> or mnist:download.")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Held-out share for sources without a test split.")
    cache_dir: str = Field("~/.cache/genai-cluster/datasets", description="Where datasets prepared on first use are kept.")
    shuffle_buffer: int = Field(4096, ge=1, description="Images shuffled together on each worker (seeded, resumable).")


class GANTrainConfig(_Section):
    """GAN optimisation, evaluation, logging and checkpointing. A step is one generator update."""

    batch_size: int = Field(64, ge=2, description="Images per worker per discriminator and generator step.")
    max_steps: int = Field(3000, ge=1, description="Generator steps to train for.")
    n_critic: int = Field(1, ge=1, description="Discriminator steps per generator step (5 is usual for wgan-gp).")
    lr_g: float = Field(2e-4, gt=0.0, description="Generator learning rate (Adam).")
    lr_d: float = Field(2e-4, gt=0.0, description="Discriminator learning rate (Adam); TTUR sets it above lr_g.")
    beta1: float = Field(0.5, ge=0.0, lt=1.0, description="Adam beta1 of both optimizers.")
    beta2: float = Field(0.999, gt=0.0, lt=1.0, description="Adam beta2 of both optimizers.")
    gp_weight: float = Field(10.0, ge=0.0, description="Gradient-penalty weight (wgan-gp only).")
    grad_clip: float = Field(0.0, ge=0.0, description="Clip each network's gradient norm to this value; 0 disables.")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description=(
        "EMA of generator weights used for samples, eval and export (warmed up: min(ema_decay, (1+n)/(10+n)) "
        "after n updates)."))
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Training precision: auto = bf16 on GPU, fp32 on CPU.")
    seed: int = Field(1337, description="Seed for weights, noise and data order.")
    log_interval: int = Field(25, ge=1, description="Steps between progress lines and scalar logs.")
    eval_interval: int = Field(500, ge=1, description="Steps between evaluations (Frechet distance, label agreement).")
    eval_samples: int = Field(2000, ge=10, description="Generated and real images per evaluation.")
    classifier: str | None = Field(
        None, description="Digit classifier (jobs/train_classifier.py output) for the quality metrics; null: no metrics.")
    sample_interval: int = Field(250, ge=0, description="Steps between fixed-noise sample grids (TensorBoard + PNG); 0 disables.")
    sample_grid: int = Field(64, ge=1, le=1024, description="Images in each sample grid.")
    checkpoint_interval: int = Field(500, ge=1, description="Steps between checkpoints (the run always checkpoints at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept in storage.")
    collapse_patience: int = Field(
        8, ge=0, description="Stop when the discriminator loss stays ~0 for this many log intervals (collapse); 0 = never.")


class GANDeepSpeed(_Section):
    """One DeepSpeed engine per network, each with its own optimizer and ZeRO stage (0-2)."""

    generator: DeepSpeedSection = Field(default_factory=lambda: DeepSpeedSection(zero_stage=2))
    discriminator: DeepSpeedSection = Field(default_factory=lambda: DeepSpeedSection(zero_stage=2))

    @model_validator(mode="after")
    def _no_stage3(self) -> "GANDeepSpeed":
        for name in ("generator", "discriminator"):
            if getattr(self, name).zero_stage == 3:
                raise ValueError(f"deepspeed.{name}.zero_stage=3 is not supported for GANs (the generator step reads "
                                 "the discriminator's whole weights); use 0-2")
        return self


class GANRecipe(_Section):
    """A GAN training recipe (DCGAN, conditional, WGAN-GP)."""

    kind: Literal["gan"] = Field("gan", description="Recipe kind: gan.")
    name: PathName = Field("custom-gan", description=f"Recipe name (defaults the run name); {NAME_RULE}.")
    model: GANModelConfig = Field(default_factory=GANModelConfig)
    data: ImageDataConfig = Field(default_factory=ImageDataConfig)
    train: GANTrainConfig = Field(default_factory=GANTrainConfig)
    deepspeed: GANDeepSpeed = Field(default_factory=GANDeepSpeed)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "GANRecipe":
        if self.train.precision == "fp16" and not self.cluster.use_gpu:
            raise ValueError("train.precision=fp16 needs cluster.use_gpu=true (DeepSpeed's fp16 loss scaling is GPU-only)")
        if self.model.loss == "wgan-gp" and self.model.spectral_norm:
            raise ValueError("model.spectral_norm=true with model.loss=wgan-gp: the gradient penalty already constrains "
                             "the critic; choose one")
        return self


def _fp16_needs_gpu(train, cluster) -> None:
    if train.precision == "fp16" and not cluster.use_gpu:
        raise ValueError("train.precision=fp16 needs cluster.use_gpu=true (DeepSpeed's fp16 loss scaling is GPU-only)")


def _no_zero3(path: str, ds: DeepSpeedSection, kind: str) -> None:
    if ds.zero_stage == 3:
        raise ValueError(f"{path}.zero_stage=3 is not supported for {kind} recipes (samples and evaluation run the "
                         "whole network on rank 0); use 0-2")


class ImageTrainConfig(_Section):
    """Optimisation, evaluation, logging and checkpointing shared by the image families (vae, sr, cyclegan)."""

    batch_size: int = Field(32, ge=2, description="Images (or image pairs) per worker per step.")
    max_steps: int = Field(2000, ge=1, description="Optimizer steps to train for.")
    lr: float = Field(1e-3, gt=0.0, description="Learning rate (Adam) of every network.")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1.")
    beta2: float = Field(0.999, gt=0.0, lt=1.0, description="Adam beta2.")
    grad_clip: float = Field(0.0, ge=0.0, description="Clip each network's gradient norm to this value; 0 disables.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Training precision: auto = bf16 on GPU, fp32 on CPU.")
    seed: int = Field(1337, description="Seed for weights, noise and data order.")
    log_interval: int = Field(25, ge=1, description="Steps between progress lines and scalar logs.")
    eval_interval: int = Field(500, ge=1, description="Steps between evaluations on held-out images.")
    eval_samples: int = Field(1000, ge=1, description="Held-out (and generated) images per evaluation.")
    sample_interval: int = Field(250, ge=0, description="Steps between sample grids (TensorBoard + PNG); 0 disables.")
    sample_grid: int = Field(64, ge=2, le=1024, description="Images in each sample grid.")
    checkpoint_interval: int = Field(500, ge=1, description="Steps between checkpoints (the run always checkpoints at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept in storage.")


class VAEModelConfig(_Section):
    """Convolutional VAE shape, prior and likelihood (genai/models/vae.py)."""

    image_size: int = Field(28, ge=4, description="Image height and width; must match the dataset and be divisible by 4.")
    channels: int = Field(1, ge=1, le=4, description="Image channels; must match the dataset.")
    z_dim: int = Field(16, ge=1, description="Latent dimensions (standard Gaussian prior).")
    width: int = Field(32, ge=1, description="Channels of the first conv stage (the second has twice as many).")
    hidden: int = Field(256, ge=4, description="Fully connected layer between the conv features and the latent.")
    conditional: bool = Field(False, description="Class-conditional encoder and decoder (a label embedding).")
    beta: float = Field(1.0, ge=0.0, description="Weight of the KL term in the training loss (beta-VAE); the ELBO uses 1.")
    likelihood: Literal["bernoulli", "gaussian"] = Field(
        "bernoulli", description="bernoulli (decoder logits, BCE summed over pixels) or gaussian (fixed sigma).")
    sigma: float = Field(0.1, gt=0.0, description="The gaussian likelihood's standard deviation, in [-1, 1] pixel units.")

    @model_validator(mode="after")
    def _size(self) -> "VAEModelConfig":
        if self.image_size % 4:
            raise ValueError(f"model.image_size={self.image_size} must be divisible by 4")
        return self


_CLASSIFIER = Field(None, description=(
    "Digit classifier (jobs/train_classifier.py output) for the digit metrics; null: none."))


class VAETrainConfig(ImageTrainConfig):
    """VAE optimisation; evaluation is the negative ELBO on the val split (and digit metrics with a classifier)."""

    classifier: str | None = _CLASSIFIER


class VAERecipe(_Section):
    """A variational autoencoder training recipe (optionally class-conditional, beta-weighted KL)."""

    kind: Literal["vae"] = Field("vae", description="Recipe kind: vae.")
    name: PathName = Field("custom-vae", description=f"Recipe name (defaults the run name); {NAME_RULE}.")
    model: VAEModelConfig = Field(default_factory=VAEModelConfig)
    data: ImageDataConfig = Field(default_factory=ImageDataConfig)
    train: VAETrainConfig = Field(default_factory=VAETrainConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=lambda: DeepSpeedSection(zero_stage=2))
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "VAERecipe":
        _fp16_needs_gpu(self.train, self.cluster)
        _no_zero3("deepspeed", self.deepspeed, "vae")
        return self


class PhotoDataConfig(_Section):
    """Where the photographs come from (super-resolution)."""

    uri: str | None = Field(
        None, description="Prepared photo dataset (a folder or URI holding manifest.json). Null: prepare `source` into the cache.")
    source: str = Field("builtin:photos", description=(
        "Photos to prepare when `uri` is null: builtin:photos (scikit-image's bundled photographs, offline) or "
        "images:<folder or s3:// prefix of PNG/JPEG files>."))
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of an images: source's files held out (at least one).")
    cache_dir: str = Field("~/.cache/genai-cluster/datasets", description="Where datasets prepared on first use are kept.")


class SRModelConfig(_Section):
    """SRResNet shape, and the SRGAN-style adversarial fine-tune (genai/models/sr.py)."""

    scale: Literal[2, 4] = Field(4, description="Upscaling factor.")
    channels: Literal[1, 3] = Field(3, description="Image channels (the photos are prepared with as many).")
    features: int = Field(64, ge=1, description="SRResNet width.")
    blocks: int = Field(16, ge=0, description="Residual blocks.")
    bicubic_skip: bool = Field(True, description=(
        "Predict a correction to the bicubic upscaling (an untrained model is exactly bicubic)."))
    pixel_loss: Literal["l1", "mse"] = Field("l1", description="Pixel loss of the generator.")
    adversarial: bool = Field(False, description=(
        "SRGAN: train a discriminator too (deepspeed.discriminator) and add its adversarial and feature terms."))
    adversarial_loss: Literal["nonsaturating", "relativistic"] = Field(
        "relativistic", description="nonsaturating (SRGAN) or relativistic average (ESRGAN).")
    perceptual: Literal["none", "discriminator"] = Field("none", description=(
        "Perceptual term: none, or the distance between the discriminator's features of the output and the "
        "original (a feature network the run trains itself; nothing is downloaded). Needs model.adversarial."))
    ndf: int = Field(32, ge=1, description="Discriminator width.")


class SRTrainConfig(ImageTrainConfig):
    """Super-resolution optimisation: random crops of the training photos, downscaled for the input; evaluation is
    PSNR/SSIM on the held-out photos beside bicubic upscaling."""

    patch_size: int = Field(96, ge=4, description=(
        "High-resolution crop side (pixels, a multiple of model.scale); every training photo must be at least this big."))
    augment: bool = Field(True, description="Random flips and quarter turns of each crop.")
    lr_d: float = Field(1e-4, gt=0.0, description="Discriminator learning rate (Adam; model.adversarial only).")
    pixel_weight: float = Field(1.0, ge=0.0, description="Weight of the pixel loss.")
    feature_weight: float = Field(1.0, ge=0.0, description="Weight of the perceptual term (model.perceptual).")
    adversarial_weight: float = Field(5e-3, ge=0.0, description="Weight of the adversarial term (model.adversarial).")
    eval_size: int = Field(256, ge=16, description="Held-out photos are centre-cropped to at most this side for evaluation.")
    init_from: str | None = Field(None, description=(
        "Start the generator from another SR run's weights (a run, export or checkpoint folder of the same scale, "
        "channels, features and blocks), e.g. an SRResNet run before an SRGAN fine-tune. Null: from scratch. A "
        "resumed run continues from its own checkpoint."))


class TwoEngineDeepSpeed(_Section):
    """One DeepSpeed engine per network, each with its own optimizer and ZeRO stage (0-2)."""

    generator: DeepSpeedSection = Field(default_factory=lambda: DeepSpeedSection(zero_stage=2))
    discriminator: DeepSpeedSection = Field(default_factory=lambda: DeepSpeedSection(zero_stage=2))


class SRRecipe(_Section):
    """A super-resolution training recipe: SRResNet (pixel loss) or an SRGAN-style adversarial fine-tune."""

    kind: Literal["sr"] = Field("sr", description="Recipe kind: sr.")
    name: PathName = Field("custom-sr", description=f"Recipe name (defaults the run name); {NAME_RULE}.")
    model: SRModelConfig = Field(default_factory=SRModelConfig)
    data: PhotoDataConfig = Field(default_factory=PhotoDataConfig)
    train: SRTrainConfig = Field(default_factory=SRTrainConfig)
    deepspeed: TwoEngineDeepSpeed = Field(default_factory=TwoEngineDeepSpeed)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "SRRecipe":
        m, t = self.model, self.train
        _fp16_needs_gpu(t, self.cluster)
        for name in ("generator", "discriminator"):
            _no_zero3(f"deepspeed.{name}", getattr(self.deepspeed, name), "sr")
        if t.patch_size % m.scale:
            raise ValueError(f"train.patch_size={t.patch_size} is not a multiple of model.scale={m.scale}")
        if m.perceptual != "none" and not m.adversarial:
            raise ValueError(f"model.perceptual={m.perceptual} needs model.adversarial=true (its features are the "
                             "discriminator's)")
        return self


class TranslationDataConfig(_Section):
    """The two unpaired image domains (genai/data/digit_domains.py)."""

    domain_a: str | None = Field(None, description=(
        "Prepared image dataset (jobs/prepare_data.py) of domain A. Null, with domain_b null: the builtin pair, "
        "builtin:digits (A) and a stroke-style variant of other digits of it (B, data.style)."))
    domain_b: str | None = Field(None, description="Prepared image dataset of domain B (given with domain_a).")
    style: Literal["bold", "thin", "invert"] = Field("bold", description="The builtin pair's domain B style.")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="The builtin pair's held-out share of the digits.")

    @model_validator(mode="after")
    def _both_domains(self) -> "TranslationDataConfig":
        if (self.domain_a is None) != (self.domain_b is None):
            given, missing = ("domain_a", "domain_b") if self.domain_b is None else ("domain_b", "domain_a")
            raise ValueError(f"data.{given} is set but data.{missing} is not: translation needs two domains (or "
                             "neither, for the builtin pair of digit domains)")
        return self


class CycleGANModelConfig(_Section):
    """CycleGAN generators, PatchGAN discriminators and the loss weights (genai/models/cyclegan.py)."""

    image_size: int = Field(28, ge=4, description="Image height and width of both domains; divisible by 4.")
    channels_a: int = Field(1, ge=1, le=4, description="Domain A's image channels; must match its data.")
    channels_b: int = Field(1, ge=1, le=4, description="Domain B's image channels; must match its data.")
    ngf: int = Field(32, ge=1, description="Generator width.")
    ndf: int = Field(32, ge=1, description="Discriminator width.")
    blocks: int = Field(6, ge=0, description="Residual blocks in each generator.")
    d_layers: int = Field(2, ge=1, description="Strided convolutions of each PatchGAN discriminator.")
    lambda_cycle: float = Field(10.0, ge=0.0, description="Weight of the cycle-consistency losses.")
    lambda_identity: float = Field(0.5, ge=0.0, description=(
        "Identity loss weight as a fraction of lambda_cycle (0 when the domains' channels differ)."))
    pool_size: int = Field(50, ge=0, description="Generated images in each discriminator's history pool; 0: none.")

    @model_validator(mode="after")
    def _shape(self) -> "CycleGANModelConfig":
        if self.image_size % 4:
            raise ValueError(f"model.image_size={self.image_size} must be divisible by 4")
        if self.image_size >> self.d_layers < 3:
            raise ValueError(f"model.d_layers={self.d_layers} halves {self.image_size}x{self.image_size} images below "
                             "3x3 (lower it)")
        if self.lambda_identity and self.channels_a != self.channels_b:
            raise ValueError(f"model.lambda_identity must be 0 when the domains' channels differ (channels_a="
                             f"{self.channels_a}, channels_b={self.channels_b})")
        return self


class CycleGANTrainConfig(ImageTrainConfig):
    """CycleGAN optimisation (Adam for all four networks); evaluation is the cycle L1 on held-out images of both
    domains and, with a digit classifier, label preservation in both directions."""

    lr: float = Field(2e-4, gt=0.0, description="Learning rate (Adam) of the generators and discriminators.")
    beta1: float = Field(0.5, ge=0.0, lt=1.0, description="Adam beta1 (the paper's 0.5).")
    classifier: str | None = _CLASSIFIER


class CycleGANDeepSpeed(_Section):
    """Four DeepSpeed engines: both generators share one section, both discriminators the other (ZeRO 0-2)."""

    generators: DeepSpeedSection = Field(default_factory=lambda: DeepSpeedSection(zero_stage=2))
    discriminators: DeepSpeedSection = Field(default_factory=lambda: DeepSpeedSection(zero_stage=2))


class CycleGANRecipe(_Section):
    """An unpaired image-to-image translation recipe (CycleGAN)."""

    kind: Literal["cyclegan"] = Field("cyclegan", description="Recipe kind: cyclegan.")
    name: PathName = Field("custom-cyclegan", description=f"Recipe name (defaults the run name); {NAME_RULE}.")
    model: CycleGANModelConfig = Field(default_factory=CycleGANModelConfig)
    data: TranslationDataConfig = Field(default_factory=TranslationDataConfig)
    train: CycleGANTrainConfig = Field(default_factory=CycleGANTrainConfig)
    deepspeed: CycleGANDeepSpeed = Field(default_factory=CycleGANDeepSpeed)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "CycleGANRecipe":
        _fp16_needs_gpu(self.train, self.cluster)
        for name in ("generators", "discriminators"):
            _no_zero3(f"deepspeed.{name}", getattr(self.deepspeed, name), "cyclegan")
        return self


RECIPE_KINDS: dict[str, type[BaseModel]] = {"gpt": NLGRecipe, "gan": GANRecipe, "vae": VAERecipe, "sr": SRRecipe, "cyclegan": CycleGANRecipe}
# The job that trains each kind (jobs/train.py trains them all).
KIND_JOBS = {"gpt": "jobs/train_nlg.py", "gan": "jobs/train_gan.py"}


def _format_validation_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    prefix = f"{origin}: " if origin else ""
    return f"{prefix}{loc}: {msg}" if loc else f"{prefix}{msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `section.field=value`; the value is read as YAML (numbers, booleans, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else ""
    except DuplicateKeyError as exc:
        raise ConfigError(f"--set {text!r}: {exc.problem}") from None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides to a raw recipe dict (before validation)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def available_recipes(kind: str | None = None) -> list[str]:
    """Names of the recipes shipped with the project (of one kind when given)."""
    paths = sorted(RECIPE_DIR.glob("*.yaml"))
    return [p.stem for p in paths if kind is None or (read_yaml_file(p, "recipe") or {}).get("kind", "gpt") == kind]


def resolve_recipe_path(name_or_path: str) -> Path:
    """A shipped recipe name (`tiny`) or a path to a YAML file."""
    path = Path(os.path.expanduser(name_or_path))
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise ConfigError(f"recipe file {name_or_path} is a folder, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"recipe file {name_or_path} does not exist")
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ConfigError(
            f"recipe {name_or_path!r} is neither a file nor a shipped recipe ({', '.join(available_recipes())})"
        )
    return shipped


def recipe_class(data: dict, origin: str = "") -> type[BaseModel]:
    """The recipe model for a raw recipe's `kind` (gpt when absent)."""
    kind = data.get("kind", "gpt")
    if kind not in RECIPE_KINDS:
        prefix = f"{origin}: " if origin else ""
        raise ConfigError(f"{prefix}kind: {kind!r} is not a recipe kind ({', '.join(RECIPE_KINDS)})")
    return RECIPE_KINDS[kind]


def load_recipe(name_or_path: str, overrides: list[str] | None = None, kind: str | None = None) -> Any:
    """Load, override and validate a recipe (its class from its `kind`). Raises ConfigError with the field
    path and reason; with `kind`, a recipe of another kind is refused."""
    path = resolve_recipe_path(name_or_path)
    data = read_yaml_file(path, "recipe") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    # The file's stem, made a valid name ('my recipe' -> 'my-recipe'); a name written in the file must be valid.
    data.setdefault("name", re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-")[:NAME_MAX] or "recipe")
    apply_overrides(data, overrides or [])
    recipe = validate_recipe(data, origin=str(path))
    if kind and recipe.kind != kind:
        job = KIND_JOBS.get(recipe.kind, "jobs/train.py")
        raise ConfigError(f"{path}: a {recipe.kind} recipe, not a {kind} recipe (train it with {job})")
    return recipe


def validate_recipe(data: dict, origin: str = "", cls: type[BaseModel] | None = None) -> Any:
    """Validate a raw recipe (class from its `kind` unless given)."""
    cls = cls or recipe_class(data, origin)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def recipe_to_yaml(recipe: BaseModel) -> str:
    """A recipe as YAML that `load_recipe` reads back to an equal recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


class ParamSpec(_Section):
    """One searched field: exactly one of the keys below."""

    choice: list[Any] | None = Field(None, description="Pick one of these values.")
    grid: list[Any] | None = Field(None, description="Try every value (a grid over all grid parameters).")
    uniform: tuple[float, float] | None = Field(None, description="Float uniformly in [low, high].")
    loguniform: tuple[float, float] | None = Field(None, description="Float log-uniformly in [low, high] (both > 0).")
    randint: tuple[int, int] | None = Field(None, description="Integer in [low, high).")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ParamSpec":
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, grid, uniform, loguniform, randint (got {given or 'none'})")
        if self.loguniform and min(self.loguniform) <= 0:
            raise ValueError("loguniform bounds must be > 0")
        for bounds in (self.uniform, self.loguniform, self.randint):
            if bounds and bounds[0] >= bounds[1]:
                raise ValueError(f"low {bounds[0]} must be below high {bounds[1]}")
        return self

    def samples(self) -> list[Any]:
        """Values a recipe must accept (for validating the sweep before Ray starts)."""
        if self.choice or self.grid:
            return list(self.choice or self.grid)
        low, high = self.uniform or self.loguniform or (self.randint[0], self.randint[1] - 1)
        return [low, high]


class SchedulerConfig(_Section):
    """Early stopping (ASHA) or Population Based Training of trials."""

    type: Literal["fifo", "asha", "pbt"] = Field("asha", description=(
        "asha stops clearly worse trials early; pbt clones the best trials' checkpoints into the worst and "
        "perturbs their parameters; fifo runs all to the end."))
    grace_period: int = Field(20, ge=1, description="asha: steps every trial trains before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="asha: keeps about 1/reduction_factor of trials at each rung.")
    perturbation_interval: int | None = Field(None, ge=1, description=(
        "pbt: steps between exploit/explore decisions; a multiple of the base recipe's train.checkpoint_interval "
        "(null: that interval)."))
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5, description=(
        "pbt: share of trials at the bottom that clone one at the top."))
    resample_probability: float = Field(0.25, ge=0.0, le=1.0, description=(
        "pbt: chance that an explored parameter is drawn afresh instead of shifted (x0.8 / x1.2, or a neighbouring choice)."))
    synch: bool = Field(False, description=(
        "pbt: trials wait for each other at every perturbation point (fair comparisons, at the cost of a "
        "restart each time); false compares with whatever the others last reported."))


class SweepConfig(_Section):
    """A hyperparameter sweep over a recipe: each trial is a distributed training run."""

    name: PathName = Field("sweep", description=(
        f"Sweep name: its folder under storage; rerun with --resume to continue. {NAME_RULE}."))
    base_recipe: str = Field("tiny", description="Shipped recipe name or YAML path every trial starts from.")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides applied to the base recipe.")
    parameters: dict[str, ParamSpec] = Field(description="Searched fields, by recipe path (e.g. train.lr).")
    search: Literal["random", "grid", "optuna"] = Field("random", description=(
        "random samples num_samples configs; grid tries all grid values; optuna (Bayesian, Optuna's TPE sampler "
        "through Tune's OptunaSearch) picks each new trial's values from the results so far."))
    seed: int | None = Field(None, description="optuna: the TPE sampler's seed, for a repeatable search (null: random).")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metric: str = Field("val_loss", description="Reported metric to optimise.")
    mode: Literal["min", "max"] = Field("min", description="Minimise or maximise the metric.")
    num_samples: int = Field(4, ge=1, description="Trials (with grid: repeats of the whole grid).")
    max_concurrent_trials: int = Field(2, ge=1, description="Trials running at once (each uses cluster.num_workers workers).")
    storage: str | None = Field(None, description="Where the sweep folder lives; null uses the base recipe's cluster.storage.")

    @model_validator(mode="after")
    def _grid_only_with_grid_search(self) -> "SweepConfig":
        if not self.parameters:
            raise ValueError("parameters: give at least one field to search")
        kinds = {k: [n for n, v in spec.model_dump().items() if v is not None][0] for k, spec in self.parameters.items()}
        if self.search == "grid" and any(v != "grid" for v in kinds.values()):
            bad = next(k for k, v in kinds.items() if v != "grid")
            raise ValueError(f"parameters.{bad}: search=grid needs grid values for every parameter")
        if self.search != "grid" and "grid" in kinds.values():
            bad = next(k for k, v in kinds.items() if v == "grid")
            raise ValueError(f"parameters.{bad}: grid values need search=grid (use choice for {self.search} search)")
        if self.search == "optuna" and self.scheduler.type == "pbt":
            raise ValueError("search=optuna with scheduler.type=pbt: PBT picks the new values itself (use search=random)")
        return self


def load_sweep(path: str, extra_overrides: list[str] | None = None) -> tuple[SweepConfig, NLGRecipe]:
    """Load a sweep file and check that every searched value gives a valid recipe, before Ray starts."""
    p = Path(os.path.expanduser(path))
    data = read_yaml_file(p, "sweep") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a sweep is a mapping of fields, got {type(data).__name__}")
    sweep = validate_recipe(data, origin=str(p), cls=SweepConfig)
    base = load_recipe(sweep.base_recipe, sweep.overrides + list(extra_overrides or []))
    raw = base.model_dump(mode="json")
    for key, spec in sweep.parameters.items():
        for value in spec.samples():
            trial = apply_overrides(yaml.safe_load(yaml.safe_dump(raw)), [f"{key}={json_value(value)}"])
            try:
                validate_recipe(trial)
            except ConfigError as exc:
                raise ConfigError(f"{path}: parameters.{key}={value!r} gives an invalid recipe: {exc}") from None
    if sweep.scheduler.type == "pbt":
        _check_pbt(path, sweep, base)
    return sweep, base


def _check_pbt(path: str, sweep: SweepConfig, base: Any) -> None:
    mutable = pbt_fields(base.kind)
    for key in sweep.parameters:
        if key not in mutable:
            why = " (which fix it)" if key not in mutable_fields(base.kind) else ""
            raise ConfigError(f"{path}: parameters.{key}: PBT continues trials from other trials' checkpoints{why}, "
                              f"so it can only vary {', '.join(mutable)}")
    s, t = sweep.scheduler, base.train
    interval = s.perturbation_interval or t.checkpoint_interval
    if interval % t.checkpoint_interval:
        raise ConfigError(f"{path}: scheduler.perturbation_interval={interval} is not a multiple of the base "
                          f"recipe's train.checkpoint_interval={t.checkpoint_interval} (PBT clones checkpoints)")
    if interval % t.eval_interval:
        raise ConfigError(f"{path}: scheduler.perturbation_interval={interval} is not a multiple of the base "
                          f"recipe's train.eval_interval={t.eval_interval} (PBT compares fresh {sweep.metric})")
    if interval >= t.max_steps:
        raise ConfigError(f"{path}: scheduler.perturbation_interval={interval} must be below train.max_steps="
                          f"{t.max_steps}, or PBT never acts")
    grid = math.prod(len(spec.grid) for spec in sweep.parameters.values() if spec.grid)
    if sweep.num_samples * grid < 2:
        raise ConfigError(f"{path}: num_samples: PBT needs a population of at least 2 trials")


def json_value(value: Any) -> str:
    """A value as `--set` text that reads back as the same YAML value."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
