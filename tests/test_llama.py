"""The Llama-family decoder (model.arch: llama): what it computes, what it counts, the recipe fields that choose it,
and its Hugging Face export: transformers loads export/hf as a LlamaForCausalLM offline that gives the same logits
and greedy tokens, and its weights map back to ours. Pure torch and transformers: no Ray."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it: everything loads from local folders

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from transformers import LlamaConfig as HFLlamaConfig

from cluster.storage import resolve
from genai.config import ConfigError, load_recipe
from genai.data.tokenizers import BPETokenizer, CharTokenizer
from genai.export import write_gpt_export
from genai.models import GPTConfig, build_model, config_from_dict, hf_mapping
from genai.models.decoder import generate
from genai.models.hf_llama import from_hf_state_dict, hf_config, llama_config_from_hf, to_hf_state_dict
from genai.models.llama import Llama, LlamaConfig, default_intermediate_size
from genai.sampling import load_model
from genai.train.nlg import decoder_config

SMALL = LlamaConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48)


def random_llama(cfg: LlamaConfig, seed: int = 0, std: float = 0.3) -> Llama:
    """Our Llama with weights large enough that logits are far from ties (greedy decoding is then well defined)."""
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std) if p.dim() > 1 else p.normal_(1.0, 0.2)  # matrices; RMSNorm gains
    return model


def hf_model_of(model: Llama) -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM built from our hf_config, holding our weights through to_hf_state_dict."""
    fields = {k: v for k, v in hf_config(model.config).items() if k not in ("model_type", "architectures")}
    hf = LlamaForCausalLM(HFLlamaConfig(**fields)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if model.config.tie_embeddings else [])
    return hf


# --- the model ---------------------------------------------------------------------------------------------------

def test_forward_shapes_and_a_near_uniform_loss_at_init():
    torch.manual_seed(0)
    model = Llama(SMALL)
    x, y = torch.randint(0, 50, (2, 3, 16))
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5
    logits, loss = model(x)
    assert logits.shape == (3, 1, 50) and loss is None
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_attention_is_causal():
    model = random_llama(SMALL)
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 50
    with torch.no_grad():
        la, lb = model(x, x)[0], model(y, y)[0]
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-6)
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads():
    """n_kv_head=2 of 4 query heads computes what n_kv_head=4 computes when heads 2i and 2i+1 have kv head i's
    weights (query head h reads kv head h // (n_head / n_kv_head), as transformers' repeat_kv)."""
    gqa = random_llama(SMALL)
    mha = Llama(replace(SMALL, n_kv_head=4)).eval()
    hs, state = SMALL.head_size, dict(gqa.state_dict())
    for i in range(SMALL.n_layer):
        q, k, v = state[f"blocks.{i}.attn.qkv.weight"].split([4 * hs, 2 * hs, 2 * hs])
        repeat = (lambda w: w.view(2, hs, -1).repeat_interleave(2, dim=0).reshape(4 * hs, -1))
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(state)
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x, x)[0], mha(x, x)[0], rtol=0, atol=1e-5)
    assert gqa.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * hs, 32)


@pytest.mark.parametrize("tie", [True, False])
def test_tied_or_untied_embeddings_and_what_is_counted(tie):
    cfg = replace(SMALL, tie_embeddings=tie)
    model = Llama(cfg)
    assert (model.lm_head.weight is model.wte.weight) == tie
    total = sum(p.numel() for p in model.parameters())  # shared parameters once
    assert model.num_params(non_embedding=False) == total
    # An untied input table is a lookup (no FLOPs); tied, it is also the output head's matmul.
    assert model.num_params() == (total if tie else total - 50 * 32)
    # 6N + 12 L H Q T, H Q = n_head x head size = n_embd
    assert model.flops_per_token(16) == 6 * model.num_params() + 12 * 2 * 4 * 8 * 16


@pytest.mark.parametrize("shape, millions", [
    # Llama-2-7B: 4096 wide, 32 layers, 32 heads, MLP 11008, 32000 tokens, untied
    (dict(vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_kv_head=32, n_embd=4096,
          intermediate_size=11008, tie_embeddings=False), 6738.4),
    # TinyLlama-1.1B: grouped-query attention, 4 kv heads of 32
    (dict(vocab_size=32000, block_size=2048, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048,
          intermediate_size=5632, tie_embeddings=False), 1100.0),
])
def test_published_llama_shapes_have_their_parameter_counts(shape, millions):
    with torch.device("meta"):
        model = Llama(LlamaConfig(**shape))
    assert model.num_params(non_embedding=False) / 1e6 == pytest.approx(millions, abs=0.1)


def test_default_intermediate_size_is_about_gpt2s_mlp():
    assert default_intermediate_size(768) == 2048 and default_intermediate_size(32) == 128
    assert 2 * 768 * 3072 <= 3 * 768 * default_intermediate_size(768) <= 1.05 * 2 * 768 * 3072


def test_activation_checkpointing_and_the_chunked_loss_give_the_same_loss_and_gradients():
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(**knobs):
        torch.manual_seed(0)
        model = Llama(SMALL, **knobs)
        _, loss = model(x, x)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    base_loss, base_grads = loss_and_grads()
    for knobs in ({"activation_checkpointing": True}, {"loss_chunk_tokens": 5},
                  {"activation_checkpointing": True, "loss_chunk_tokens": 7}):
        loss, grads = loss_and_grads(**knobs)
        torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, base_grads[name], rtol=1e-5, atol=1e-6, msg=f"{knobs} {name}")


def test_the_config_round_trips_through_its_dict_and_builds_its_architecture():
    data = json.loads(json.dumps(SMALL.to_dict()))
    assert data["arch"] == "llama"
    assert config_from_dict(data) == SMALL
    assert isinstance(build_model(SMALL), Llama)
    gpt = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    assert "arch" not in gpt.to_dict() and config_from_dict(gpt.to_dict()) == gpt  # GPT-2's files, as before
    with pytest.raises(ValueError, match="arch 'mamba' is not one of gpt2, llama"):
        config_from_dict({**SMALL.to_dict(), "arch": "mamba"})
    with pytest.raises(ValueError, match="must divide n_embd into an even head size"):
        LlamaConfig(n_head=4, n_kv_head=3)


# --- recipes -----------------------------------------------------------------------------------------------------

def test_a_llama_recipe_builds_a_llama_config_with_the_architectures_defaults():
    recipe = load_recipe("tiny", ["model.arch=llama", "model.n_head=4", "model.n_kv_head=1"])
    cfg = decoder_config(recipe, 128)
    assert isinstance(cfg, LlamaConfig)
    assert (cfg.n_head, cfg.n_kv_head, cfg.intermediate_size, cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_embeddings) == (
        4, 1, default_intermediate_size(32), 10000.0, 1e-5, True)
    mha = decoder_config(load_recipe("tiny", ["model.arch=llama", "model.rope_theta=500000"]), 128)
    assert mha.n_kv_head == mha.n_head == 2 and mha.rope_theta == 500000.0
    assert decoder_config(load_recipe("tiny"), 128).arch == "gpt2"  # the default, as before
    shipped = load_recipe("tiny-llama")
    assert shipped.model.arch == "llama" and not shipped.model.tie_embeddings


@pytest.mark.parametrize("override, message", [
    (["model.arch=mistral"], "model.arch: Input should be 'gpt2' or 'llama'"),
    (["model.arch=llama", "model.n_head=4", "model.n_kv_head=3"],
     "model.n_head=4 is not divisible by model.n_kv_head=3"),
    (["model.arch=llama", "model.n_kv_head=4"], "model.n_head=2 is not divisible by model.n_kv_head=4"),
    (["model.arch=llama", "model.n_kv_head=0"], "model.n_kv_head: Input should be greater than or equal to 1"),
    (["model.arch=llama", "model.bias=true"], "model.bias=true: model.arch=llama has no biases"),
    (["model.arch=llama", "model.n_embd=30", "model.n_head=2"], "model.n_embd / model.n_head = 15 is odd"),
    (["model.n_kv_head=1"], "model.n_kv_head=1 applies to model.arch=llama only"),
    (["model.intermediate_size=64"], "model.intermediate_size=64 applies to model.arch=llama only"),
    (["model.rope_theta=500000"], "model.rope_theta=500000.0 applies to model.arch=llama only"),
    (["model.tie_embeddings=false"], "model.tie_embeddings=false needs model.arch=llama"),
])
def test_bad_model_fields_are_one_line_errors_naming_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe("tiny", override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# --- the Hugging Face export -------------------------------------------------------------------------------------

CASES = {
    # tokenizer, tie, n_layer, n_head, n_kv_head, n_embd, intermediate, block, padded vocab
    "char-gqa-untied": ("char", False, 2, 4, 2, 32, 80, 64, 128),
    "char-eot-mha-tied": ("char-eot", True, 1, 2, 2, 32, 64, 48, None),
    "bpe-mqa-tied": ("bpe", True, 3, 6, 1, 48, 96, 64, 448),
}


@pytest.fixture(scope="module")
def text(corpus_file) -> str:
    return corpus_file.read_text()[:200_000]


@pytest.fixture(scope="module")
def tokenizers(text) -> dict:
    chars = sorted(set(text))
    return {"char": CharTokenizer(chars), "char-eot": CharTokenizer(chars, eot=True),
            "bpe": BPETokenizer.train([text], vocab_size=400)}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def exported(request, tokenizers, tmp_path_factory):
    tok_name, tie, n_layer, n_head, n_kv, n_embd, inter, block, pad = CASES[request.param]
    tok = tokenizers[tok_name]
    cfg = LlamaConfig(vocab_size=pad or tok.vocab_size, block_size=block, n_layer=n_layer, n_head=n_head,
                      n_kv_head=n_kv, n_embd=n_embd, intermediate_size=inter, rope_theta=500.0,
                      tie_embeddings=tie)
    model = random_llama(cfg)
    folder = tmp_path_factory.mktemp(request.param) / "export"
    write_gpt_export(resolve(str(folder)), model.state_dict(), cfg, tok.to_json(), "model: {arch: llama}\n")
    return model, tok, folder


def load_hf(folder: Path):
    model, info = AutoModelForCausalLM.from_pretrained(folder / "hf", output_loading_info=True)
    assert not any(info.values()), info  # every weight found, none left over, none mismatched
    return model.eval(), AutoTokenizer.from_pretrained(folder / "hf")


def test_the_hf_folder_is_a_llama_for_causal_lm(exported):
    model, _, folder = exported
    names = {p.name for p in (folder / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((folder / "hf" / "config.json").read_text())
    cfg = model.config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["max_position_embeddings"],
            config["vocab_size"], config["tie_word_embeddings"]) == (
        cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.intermediate_size, cfg.block_size, cfg.vocab_size,
        cfg.tie_embeddings)
    hf, _ = load_hf(folder)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta == 500.0
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == cfg.tie_embeddings


def test_logits_of_the_hf_model_equal_ours(exported):
    model, tok, folder = exported
    hf, _ = load_hf(folder)
    cfg = model.config
    ids = torch.randint(0, tok.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, _ = model(ids, ids)
        theirs = hf(ids).logits
    assert theirs.shape == ours.shape == (2, cfg.block_size, cfg.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_generation_gives_the_same_tokens(exported, text):
    model, tok, folder = exported
    hf, _ = load_hf(folder)
    prompt = torch.as_tensor(tok.encode(text[:40])[:8], dtype=torch.long)[None, :]
    new = model.config.block_size - prompt.size(1)  # transformers does not crop the context: stay within it
    ours = generate(model, prompt, new, temperature=0, vocab_size=tok.vocab_size)[0].tolist()
    hf.generation_config.eos_token_id = None  # jobs/generate.py does not stop at an end-of-text token
    assert hf.generate(prompt, max_new_tokens=new, do_sample=False)[0].tolist() == ours
    assert max(ours) < tok.vocab_size  # ids of the padded embedding rows are never generated


def test_the_hf_tokenizer_gives_our_ids_back(exported, text):
    _, tok, folder = exported
    _, hf_tok = load_hf(folder)
    passage = text[1000:3000]
    assert hf_tok(passage)["input_ids"] == tok.encode(passage).tolist()
    assert hf_tok.decode(hf_tok(passage)["input_ids"]) == passage


def test_our_export_loads_back_with_its_head_tied_or_not(exported):
    model, _, folder = exported
    loaded = load_model(str(folder))
    assert isinstance(loaded.model, Llama) and loaded.model.config == model.config
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert (loaded.model.lm_head.weight is loaded.model.wte.weight) == model.config.tie_embeddings


def test_hf_weights_map_back_to_ours(exported):
    """The reverse mapping (for starting from pretrained weights): the HF model's state dict, mapped back, loads
    strictly into our Llama built from its config.json and computes the same logits."""
    model, tok, folder = exported
    hf, _ = load_hf(folder)
    cfg = llama_config_from_hf(json.loads((folder / "hf" / "config.json").read_text()))
    assert cfg == model.config
    assert hf_mapping("llama").config_from_hf is llama_config_from_hf
    back = Llama(cfg).eval()
    back.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    assert (back.lm_head.weight is back.wte.weight) == cfg.tie_embeddings
    ids = torch.randint(0, tok.vocab_size, (1, cfg.block_size), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids, ids)[0], model(ids, ids)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_the_mapping_round_trips(tie):
    cfg = replace(SMALL, tie_embeddings=tie)
    state = random_llama(cfg).state_dict()
    hf_state = to_hf_state_dict(state, cfg)
    assert ("lm_head.weight" in hf_state) != tie
    assert hf_state["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)  # 2 kv heads of 8
    assert hf_state["model.layers.1.mlp.gate_proj.weight"].shape == (48, 32)
    back = from_hf_state_dict(hf_state, cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_the_mapping_refuses_what_our_model_cannot_hold():
    cfg = replace(SMALL, tie_embeddings=False)
    hf_state = to_hf_state_dict(random_llama(cfg).state_dict(), cfg)
    config = hf_config(cfg)
    for field, value in [("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True), ("head_dim", 16)]:
        with pytest.raises(ValueError, match=f"{field}={value!r} is not supported by genai/models/llama.py"):
            llama_config_from_hf({**config, field: value})
    scaled = {**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    with pytest.raises(ValueError, match="rope_type='llama3' is not supported"):
        llama_config_from_hf(scaled)
    with pytest.raises(ValueError, match="only llama maps"):
        llama_config_from_hf({**config, "model_type": "mistral"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight is missing"):
        from_hf_state_dict({k: v for k, v in hf_state.items() if k != "model.layers.1.mlp.up_proj.weight"}, cfg)
    with pytest.raises(ValueError, match=r"self_attn.k_proj.weight has shape \(32, 32\); the config needs \(16, 32\)"):
        from_hf_state_dict({**hf_state, "model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)}, cfg)
    with pytest.raises(ValueError, match="lm_head.weight is missing"):
        from_hf_state_dict({k: v for k, v in hf_state.items() if k != "lm_head.weight"}, cfg)
    tied = replace(SMALL, tie_embeddings=True)
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        from_hf_state_dict(hf_state, tied)


def test_a_config_saved_by_transformers_maps_to_ours(tmp_path):
    """A Llama saved by transformers itself (as a user's pretrained model is): its config.json gives our config."""
    hf = LlamaForCausalLM(HFLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                        rms_norm_eps=1e-6, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path)
    cfg = llama_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert cfg == LlamaConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                              intermediate_size=96, rope_theta=1e4, rms_norm_eps=1e-6, tie_embeddings=False)
    ours = Llama(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(ids, ids)[0] - hf.eval()(ids).logits).abs().max().item() <= 1e-5


def test_logits_agree_with_transformers_at_gpt2_small_widths():
    """Defects hide at real shapes: 768 wide, 12 query heads sharing 4 kv heads, GPT-2's 50257 tokens, 1024
    positions (RoPE angles up to 1023 radians), untied head, GPT-2's 0.02 initialisation."""
    cfg = LlamaConfig(vocab_size=50257, block_size=1024, n_layer=2, n_head=12, n_kv_head=4, n_embd=768,
                      intermediate_size=default_intermediate_size(768), tie_embeddings=False)
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:  # norm gains away from 1, so that a misplaced gain shows
            block.norm_1.weight.uniform_(0.5, 1.5)
            block.norm_2.weight.uniform_(0.5, 1.5)
    hf = hf_model_of(model)
    ids = torch.randint(0, 50257, (1, 1024), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours, theirs = model(ids, ids)[0], hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.std().item() > 0.1  # not a trivially small signal


@pytest.mark.slow
@pytest.mark.parametrize("workers, zero", [(1, 0), (2, 3)], ids=["1w-zero0", "2w-zero3"])
def test_a_trained_llama_run_exports_what_transformers_and_the_generate_job_agree_on(char_dataset, tmp_path,
                                                                                     workers, zero):
    """A real run (Ray Train + DeepSpeed) of the tiny recipe as a Llama with grouped-query attention and an untied
    head: it trains, samples with the KV cache (the final step's sample; under ZeRO-3 on every rank), exports;
    export/hf loads as a LlamaForCausalLM whose logits equal our loaded model's, greedy text from jobs/generate.py
    equals transformers' greedy text, and the last checkpoint holds the exported weights."""
    from conftest import run_job
    from test_train_nlg import train

    name = f"llama-{workers}w"
    r = train(char_dataset, tmp_path, name, "model.arch=llama", "model.n_head=4", "model.n_kv_head=2",
              "model.tie_embeddings=false", f"cluster.num_workers={workers}", f"deepspeed.zero_stage={zero}",
              "train.max_steps=20")
    assert "exported the model" in r.stdout
    run = tmp_path / name
    hf = AutoModelForCausalLM.from_pretrained(run / "export" / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(run / "export" / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    ours = load_model(str(run))
    assert isinstance(ours.model, Llama) and not ours.model.config.tie_embeddings
    prompt, new = "ROMEO:", 20  # tiny's context is 32 tokens
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (ours.model(ids, ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4
    hf.generation_config.eos_token_id = None
    expected = hf_tok.decode(hf.generate(ids, max_new_tokens=new, do_sample=False)[0])
    out = tmp_path / "greedy.txt"
    g = run_job("generate.py", "--checkpoint", str(run), "--prompt", prompt, "--max-new-tokens", str(new),
                "--temperature", "0", "--out", str(out))
    assert g.returncode == 0, g.stderr
    assert out.read_text() == expected + "\n"
    from_checkpoint = load_model(str(run / "checkpoint_00000020"))
    for key, value in ours.model.state_dict().items():
        torch.testing.assert_close(from_checkpoint.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
