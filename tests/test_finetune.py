"""Fine-tuning from a pretrained Hugging Face model (`--init-from`): a dataset prepared with the model's tokenizer,
runs that start from its weights under ZeRO-3 (GPT-2) and ZeRO-0 (Llama, sharded weights), and an export that
transformers loads with the model's tokenizer. The models are small random ones saved by transformers itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it: everything loads from local folders

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from conftest import run_job
from genai.data.hf_tokenizer import hf_tokenizer_files
from genai.data.tokenizers import BPETokenizer
from genai.sampling import load_model

CONTEXT = 64
# arch -> the ZeRO stage of its fine-tune. The Llama model is saved in shards (its index names them).
MODELS = {"gpt2": 3, "llama": 0}
TEXT = "ROMEO: But soft, what light through yonder window breaks?"
NO_RAY = {"RAY_ADDRESS": "127.0.0.1:9"}  # an address nobody listens on: a job that would start Ray fails instead
# 4 steps on 2 workers at a negligible learning rate: the weights stay the pretrained ones.
FINETUNE = ["train.seq_len=32", "train.micro_batch_size=4", "train.max_steps=4", "train.warmup_steps=1",
            "train.lr=1e-12", "train.min_lr=0", "train.eval_interval=2", "train.eval_batches=2",
            "train.checkpoint_interval=2", "train.sample_interval=4", "train.sample_tokens=8", "cluster.num_workers=2",
            "cluster.cpus_per_worker=0.5", "cluster.torch_threads=1"]


def finetune(init: Path, data: Path, storage: Path, zero_stage: int, env: dict | None = None):
    sets = [*FINETUNE, f"deepspeed.zero_stage={zero_stage}"]
    return run_job("train_nlg.py", "--recipe", "finetune", "--init-from", str(init), "--data", str(data), "--storage",
                   str(storage), "--name", "ft", *[a for s in sets for a in ("--set", s)], env=env)


def hf_model(arch: str, vocab_size: int, eot_id: int):
    torch.manual_seed(0)
    if arch == "gpt2":  # exact GELU and LayerNorm eps 1e-5: what genai/models/gpt.py computes
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                                          activation_function="gelu_new", layer_norm_epsilon=1e-5, eos_token_id=eot_id,
                                          bos_token_id=eot_id))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, max_position_embeddings=CONTEXT, hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                        eos_token_id=eot_id, bos_token_id=eot_id))


@pytest.fixture(scope="module")
def corpus(corpus_file, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ft-corpus") / "corpus.txt"
    path.write_text(corpus_file.read_text()[:300_000])
    return path


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory) -> dict[str, Path]:
    """{arch: folder} of random GPT2LMHeadModel and LlamaForCausalLM saved with save_pretrained, with one BPE
    tokenizer (trained on the corpus, in Hugging Face's format, end-of-text as eos)."""
    tok = BPETokenizer.train([corpus.read_text()], vocab_size=300)
    folders = {}
    for arch in MODELS:
        folder = tmp_path_factory.mktemp("pretrained") / arch
        shard = {"max_shard_size": "20KB"} if arch == "llama" else {}
        hf_model(arch, 320, tok.eot_id).save_pretrained(folder, **shard)
        for name, text in hf_tokenizer_files(tok, CONTEXT).items():
            (folder / name).write_text(text)
        folders[arch] = folder
    assert (folders["llama"] / "model.safetensors.index.json").exists()
    return folders


@pytest.fixture(scope="module")
def ft_dataset(corpus, pretrained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft-data") / "corpus-ft"
    r = run_job("prepare_data.py", "--source", str(corpus), "--tokenizer", str(pretrained["gpt2"]), "--out", str(out),
                "--chunk-tokens", "256", "--workers", "0", env=NO_RAY)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


@pytest.fixture(scope="module", params=list(MODELS))
def finetuned(request, pretrained, ft_dataset, tmp_path_factory) -> tuple[str, Path]:
    """(arch, run folder) of the fine-tune of the arch's model (FINETUNE): its export must equal the model."""
    arch = request.param
    storage = tmp_path_factory.mktemp(f"ft-{arch}")
    r = finetune(pretrained[arch], ft_dataset, storage, MODELS[arch])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "done: run ft at step 4" in r.stdout
    return arch, storage / "ft"


def test_prepare_data_tokenizes_with_the_models_tokenizer(corpus, pretrained, ft_dataset):
    manifest = json.loads((ft_dataset / "manifest.json").read_text())
    hf_tok = AutoTokenizer.from_pretrained(pretrained["gpt2"])
    assert manifest["tokenizer"]["kind"] == "hf" and manifest["tokenizer"]["eot_id"] == hf_tok.eos_token_id
    assert manifest["vocab_size"] == len(hf_tok)
    import pyarrow.parquet as pq

    first = pq.read_table(sorted((ft_dataset / "train").glob("*.parquet"))[0]).column("tokens")[0].as_py()
    assert first[:40] == hf_tok(corpus.read_text()[:400])["input_ids"][:40]


@pytest.mark.slow
def test_a_finetune_starts_from_the_pretrained_weights(pretrained, finetuned):
    arch, run = finetuned
    original = AutoModelForCausalLM.from_pretrained(pretrained[arch]).state_dict()
    exported, info = AutoModelForCausalLM.from_pretrained(run / "export" / "hf", output_loading_info=True)
    assert not any(info.values()), info  # every weight found, none left over, none mismatched
    exported = exported.state_dict()
    assert set(exported) == set(original)
    assert max((exported[k] - original[k]).abs().max().item() for k in original) <= 1e-6
    assert f"init_from: {pretrained[arch]}" in (run / "export" / "recipe.yaml").read_text()


@pytest.mark.slow
def test_the_export_computes_our_logits_with_the_models_tokenizer(pretrained, finetuned):
    arch, run = finetuned
    hf = AutoModelForCausalLM.from_pretrained(run / "export" / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(run / "export" / "hf")
    original_tok = AutoTokenizer.from_pretrained(pretrained[arch])
    ours = load_model(str(run))
    ids = hf_tok(TEXT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == ours.tokenizer.encode(TEXT).tolist() == original_tok(TEXT)["input_ids"]
    with torch.no_grad():
        assert (ours.model(ids, ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_a_resumed_finetune_keeps_its_init_model(pretrained, ft_dataset, finetuned):
    arch, run = finetuned
    other = pretrained["llama" if arch == "gpt2" else "gpt2"]  # the same tokenizer: only init_from differs
    r = finetune(other, ft_dataset, run.parent, MODELS[arch], env=NO_RAY)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"exists with model.init_from={pretrained[arch]}, this recipe has model.init_from={other}" in r.stderr
