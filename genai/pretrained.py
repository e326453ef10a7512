"""A pretrained Hugging Face model (a local folder or s3:// prefix) as the start of a GPT run: `model.init_from`.

The folder is what `save_pretrained` writes for a GPT2LMHeadModel or LlamaForCausalLM: config.json, the weights
(model.safetensors, or shards named by model.safetensors.index.json) and the tokenizer (tokenizer.json,
tokenizer_config.json). Its config.json gives the model's shape (through genai/models/hf_gpt2.py and hf_llama.py),
its weights the starting weights, and the dataset must have been prepared with its tokenizer
(`jobs/prepare_data.py --tokenizer <folder>`).

The driver checks all of it from the files' headers (`init_recipe`), so a mismatch is one line before Ray starts;
each worker then reads the weights into its model before deepspeed.initialize (`load_init_weights`), so every ZeRO
stage partitions them as it partitions fresh ones.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors

from cluster.storage import Location, StorageError, resolve
from genai.config import PLACEHOLDER, ConfigError, ModelConfig, NLGRecipe, validate_recipe
from genai.data.hf_tokenizer import tokenizer_from_hf_folder
from genai.data.text_dataset import TextManifest
from genai.data.tokenizers import TOKENIZER_FILE, tokenizer_from_json
from genai.models import ARCHS, DecoderConfig, build_model, hf_mapping

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights: {"weight_map": {tensor: file}}


def init_recipe(recipe: NLGRecipe, manifest: TextManifest) -> NLGRecipe:
    """The recipe with its model section taken from model.init_from's config.json, once the folder has been checked
    against the recipe and the dataset: the vocabulary fits, the dataset's tokenizer is the folder's, every weight
    is there with its shape. Raises ConfigError naming the file and field."""
    m = recipe.model
    where = f"model.init_from={m.init_from}"
    if PLACEHOLDER in m.init_from:
        raise ConfigError(f"{where}: this recipe starts from a pretrained model: give its Hugging Face folder or "
                          "s3:// prefix with --init-from")
    cfg = init_model_config(m.init_from, m.dropout)
    shape = model_fields(cfg)
    defaults = ModelConfig()
    clash = [f"model.{k}={getattr(m, k)}" for k, v in shape.items() if getattr(m, k) not in (v, getattr(defaults, k))]
    if clash:
        raise ConfigError(f"{', '.join(clash)}: the model's shape comes from {where} (its {CONFIG_FILE}); "
                          "remove from the recipe")
    if manifest.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{where}: its {CONFIG_FILE} has vocab_size={cfg.vocab_size}, smaller than the vocabulary "
                          f"of the dataset {manifest.uri} ({manifest.vocab_size})")
    if recipe.train.seq_len is not None and recipe.train.seq_len > cfg.block_size:
        raise ConfigError(f"train.seq_len={recipe.train.seq_len} is larger than the context of {where} "
                          f"({cfg.block_size} positions in its {CONFIG_FILE})")
    check_init_weights(m.init_from, cfg)
    check_init_tokenizer(m.init_from, manifest)
    data = recipe.model_dump(mode="json")
    data["model"].update(shape)
    return validate_recipe(data, cls=NLGRecipe)


def init_model_config(uri: str, dropout: float) -> DecoderConfig:
    """Our model config for the folder's config.json (GPT-2 or Llama family). ConfigError naming the field that our
    models cannot compute."""
    where = f"model.init_from={uri}"
    loc = resolve(uri)
    if not loc.is_dir():
        raise ConfigError(f"{where}: {uri} {'is not a folder' if loc.exists() else 'does not exist'}")
    try:
        config = json.loads(loc.join(CONFIG_FILE).read_text())
    except StorageError:
        raise ConfigError(f"{where}: no {CONFIG_FILE} (a Hugging Face model folder holds {CONFIG_FILE}, "
                          f"{WEIGHTS_FILE} and {TOKENIZER_FILE})") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ConfigError(f"{where}: {CONFIG_FILE} has model_type={model_type!r}; supported: {', '.join(ARCHS)}")
    hf = hf_mapping(model_type)
    architectures = config.get("architectures") or [hf.ARCHITECTURE]
    if architectures != [hf.ARCHITECTURE]:
        raise ConfigError(f"{where}: {CONFIG_FILE} has architectures={architectures}; a {model_type} model starts a "
                          f"run only as {hf.ARCHITECTURE}")
    try:
        return hf.config_from_hf(config, dropout=dropout)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{where}: {CONFIG_FILE}: {exc}") from None


def model_fields(cfg: DecoderConfig) -> dict:
    """The recipe's model-shape fields (genai/config.py ModelConfig) of a model config."""
    fields = {"arch": cfg.arch, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
              "block_size": cfg.block_size, "vocab_size": cfg.vocab_size}
    if cfg.arch == "gpt2":
        return {**fields, "bias": cfg.bias, "activation": cfg.activation, "tie_embeddings": True}
    return {**fields, "bias": False, "n_kv_head": cfg.n_kv_head, "intermediate_size": cfg.intermediate_size,
            "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "tie_embeddings": cfg.tie_embeddings}


def check_init_weights(uri: str, cfg: DecoderConfig) -> None:
    """Every tensor the model needs is in the folder's safetensors file(s) with its shape, read from their headers
    (nothing else is downloaded). ConfigError naming the file and tensor."""
    where = f"model.init_from={uri}"
    ours = _meta_state(cfg)
    expected = hf_mapping(cfg.arch).to_hf_state_dict(ours, cfg)  # names and shapes only: meta tensors
    files = _weight_files(uri)
    shapes = {}
    for loc in files:
        shapes.update({name: (loc, shape) for name, shape in _header(uri, loc).items()})
    for name, tensor in expected.items():
        # The Hub's gpt2 stores GPT2Model's bare names (genai/models/hf_gpt2.py adds the prefix on loading).
        found = shapes.get(name) or shapes.get(name.removeprefix("transformer."))
        if found is None:
            raise ConfigError(f"{where}: {name} is missing from its weights "
                              f"({', '.join(loc.uri.rsplit('/', 1)[-1] for loc in files)})")
        loc, shape = found
        if tuple(shape) != tuple(tensor.shape):
            raise ConfigError(f"{where}: {name} in {loc.uri.rsplit('/', 1)[-1]} has shape {tuple(shape)}; its "
                              f"{CONFIG_FILE} needs {tuple(tensor.shape)}")


def check_init_tokenizer(uri: str, manifest: TextManifest) -> None:
    """The dataset was tokenized with the folder's tokenizer (the same tokenizer.json and end-of-text token).
    DatasetError when the folder has no readable tokenizer."""
    where = f"model.init_from={uri}"
    pretrained = tokenizer_from_hf_folder(uri)
    dataset = tokenizer_from_json(resolve(manifest.uri).join(TOKENIZER_FILE).read_text())
    if dataset.to_json() != pretrained.to_json():  # both written by this tokenizers version: equal when the same
        raise ConfigError(f"{where}: the dataset {manifest.uri} was tokenized with another tokenizer ("
                          f"{dataset.kind}, vocabulary {dataset.vocab_size}) than the model's {TOKENIZER_FILE} "
                          f"(vocabulary {pretrained.vocab_size}); prepare it with jobs/prepare_data.py "
                          f"--tokenizer {uri}")


def load_init_weights(uri: str, cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """The folder's weights as our model's state dict (genai/models/hf_*.py from_hf_state_dict)."""
    state = {}
    for loc in _weight_files(uri):
        state.update(load_safetensors(loc.read_bytes()))
    return hf_mapping(cfg.arch).from_hf_state_dict(state, cfg)


def _meta_state(cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Our model's parameters as meta tensors (no memory), a tied output head left out as the export leaves it."""
    with torch.device("meta"):
        model = build_model(cfg)
    tied = cfg.arch == "gpt2" or cfg.tie_embeddings
    return {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def _weight_files(uri: str) -> list[Location]:
    """The safetensors file, or the shards its index names. ConfigError when neither is there."""
    loc = resolve(uri)
    where = f"model.init_from={uri}"
    if loc.join(WEIGHTS_INDEX).exists():
        try:
            weight_map = json.loads(loc.join(WEIGHTS_INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{where}: {WEIGHTS_INDEX} has no readable weight_map ({exc})") from None
        return [loc.join(name) for name in sorted(set(weight_map.values()))]
    if not loc.join(WEIGHTS_FILE).exists():
        raise ConfigError(f"{where}: no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX} naming its shards): the weights are "
                          "missing (only safetensors weights are read)")
    return [loc.join(WEIGHTS_FILE)]


def _header(uri: str, loc: Location) -> dict[str, list[int]]:
    """{tensor name: shape} from a safetensors file's header: 8 bytes of length, then that much JSON."""
    try:
        with loc.fs.open_input_file(loc.path) as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}
    except FileNotFoundError:
        raise ConfigError(f"model.init_from={uri}: {loc.uri} is missing (its shard index names it)") from None
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise ConfigError(f"model.init_from={uri}: {loc.uri} is not a safetensors file ({exc})") from None
