"""The export in Hugging Face format (`<run>/export/hf/`): transformers loads it offline, its GPT2LMHeadModel
computes what our GPT computes (logits and greedy tokens), and its tokenizer gives our ids and text back."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it: everything loads from local folders

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.storage import resolve
from genai.data.tokenizers import BPETokenizer, CharTokenizer
from genai.export import write_gpt_export
from genai.models.gpt import GPT, GPTConfig, generate
from genai.models.hf_gpt2 import from_hf_state_dict, gpt_config_from_hf, hf_config, to_hf_state_dict
from genai.sampling import load_model, sample_text

from conftest import run_job


@dataclass(frozen=True)
class Case:
    """A model shape and the tokenizer it is trained with."""

    tokenizer: str  # char | char-eot | bpe
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    bias: bool
    pad_vocab_to: int | None  # the embedding table's rows, None = the tokenizer's vocabulary exactly


CASES = {
    "char-padded-no-bias": Case("char", 2, 2, 32, 64, bias=False, pad_vocab_to=128),
    "char-eot-bias": Case("char-eot", 1, 4, 32, 48, bias=True, pad_vocab_to=None),
    "bpe-padded-bias": Case("bpe", 3, 4, 48, 64, bias=True, pad_vocab_to=448),
}


@pytest.fixture(scope="module")
def text(corpus_file) -> str:
    return corpus_file.read_text()[:200_000]


@pytest.fixture(scope="module")
def tokenizers(text) -> dict:
    chars = sorted(set(text))
    return {"char": CharTokenizer(chars), "char-eot": CharTokenizer(chars, eot=True),
            "bpe": BPETokenizer.train([text], vocab_size=400)}


def random_gpt(cfg: GPTConfig, seed: int = 0) -> GPT:
    """Our GPT with weights large enough that logits are far from ties (greedy decoding is then well defined)."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
            elif name.endswith("weight"):  # LayerNorm gains
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    return model


@dataclass
class Exported:
    model: GPT
    tokenizer: object
    export: Path  # our export folder; its hf/ is the Hugging Face one


def export_case(name: str, tokenizers: dict, folder: Path) -> Exported:
    """A random GPT of case `name` exported (our export and its hf/) into `folder`, as a run's rank 0 does."""
    case = CASES[name]
    tok = tokenizers[case.tokenizer]
    cfg = GPTConfig(vocab_size=case.pad_vocab_to or tok.vocab_size, block_size=case.block_size,
                    n_layer=case.n_layer, n_head=case.n_head, n_embd=case.n_embd, bias=case.bias)
    model = random_gpt(cfg)
    write_gpt_export(resolve(str(folder)), model.state_dict(), cfg, tok.to_json(), "model: {}\n")
    return Exported(model, tok, folder)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def exported(request, tokenizers, tmp_path_factory) -> Exported:
    return export_case(request.param, tokenizers, tmp_path_factory.mktemp(request.param) / "export")


def load_hf(exported: Exported):
    model, info = AutoModelForCausalLM.from_pretrained(exported.export / "hf", output_loading_info=True)
    assert not any(info.values()), info  # every weight found, none left over, none mismatched
    return model.eval(), AutoTokenizer.from_pretrained(exported.export / "hf")


def prompt_ids(exported: Exported, text: str, n: int) -> torch.Tensor:
    return torch.as_tensor(exported.tokenizer.encode(text[:4 * n])[:n], dtype=torch.long)[None, :]


def test_the_hf_folder_has_the_files_transformers_expects(exported):
    names = {p.name for p in (exported.export / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((exported.export / "hf" / "config.json").read_text())
    cfg = exported.model.config
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"], config["vocab_size"]) == (
        cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.block_size, cfg.vocab_size)
    assert config["activation_function"] == "gelu" and config["tie_word_embeddings"] is True
    eps = {m.eps for m in exported.model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {config["layer_norm_epsilon"]}
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.0


def test_logits_of_the_hf_model_equal_ours(exported):
    hf, _ = load_hf(exported)
    cfg = exported.model.config
    ids = torch.randint(0, exported.tokenizer.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, _ = exported.model(ids, ids)  # with targets: the logits of every position
        theirs = hf(ids).logits
    assert theirs.shape == ours.shape == (2, cfg.block_size, cfg.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_greedy_generation_gives_the_same_tokens(exported, text):
    hf, _ = load_hf(exported)
    tok, cfg = exported.tokenizer, exported.model.config
    prompt = prompt_ids(exported, text, 8)
    new = cfg.block_size - prompt.size(1)  # transformers does not crop the context: stay within it
    ours = generate(exported.model, prompt, new, temperature=0, vocab_size=tok.vocab_size)[0].tolist()
    theirs = hf.generate(prompt, max_new_tokens=new, do_sample=False)[0].tolist()
    # transformers stops at the end-of-text token (the export's eos); ours generates on.
    stopped = len(theirs) < len(ours) and theirs[-1] == tok.eot_id
    assert theirs == (ours[:len(theirs)] if stopped else ours)
    hf.generation_config.eos_token_id = None  # without a stop, every token
    assert hf.generate(prompt, max_new_tokens=new, do_sample=False)[0].tolist() == ours
    assert max(ours) < tok.vocab_size  # ids of the padded embedding rows are never generated


def test_the_hf_tokenizer_gives_our_ids_and_text_back(exported, text):
    _, hf_tok = load_hf(exported)
    tok = exported.tokenizer
    passage = text[1000:4000]  # speakers' names, blank lines, punctuation after spaces
    ids = hf_tok(passage)["input_ids"]
    assert ids == tok.encode(passage).tolist()
    assert hf_tok.decode(ids) == passage == tok.decode(ids)


def test_the_end_of_text_token_is_eos_bos_and_pad(exported):
    _, hf_tok = load_hf(exported)
    tok = exported.tokenizer
    generation = json.loads((exported.export / "hf" / "generation_config.json").read_text())
    if tok.eot_id is None:
        assert hf_tok.eos_token is None and generation["eos_token_id"] is None
        return
    eot = "<|endoftext|>"  # GPT-2's, in both tokenizers
    assert hf_tok.eos_token == hf_tok.bos_token == hf_tok.pad_token == eot
    assert hf_tok.eos_token_id == generation["eos_token_id"] == generation["pad_token_id"] == tok.eot_id
    assert hf_tok(f"ab{eot}")["input_ids"][-1] == tok.eot_id


def test_our_export_is_safetensors_and_loads_back(exported):
    index = json.loads((exported.export / "export.json").read_text())
    assert index["weights"] == "model.safetensors" and index["hf"] == "hf"
    assert not (exported.export / "model.pt").exists()
    loaded = load_model(str(exported.export))
    for name, value in exported.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert loaded.model.lm_head.weight is loaded.model.wte.weight


def test_an_export_written_before_safetensors_still_loads(exported, tmp_path):
    """Runs exported before the move to safetensors have model.pt (a torch pickle) named by their index."""
    old = tmp_path / "export"
    old.mkdir()
    torch.save(exported.model.state_dict(), old / "model.pt")
    for name in ("model_config.json", "tokenizer.json", "recipe.yaml"):
        (old / name).write_bytes((exported.export / name).read_bytes())
    (old / "export.json").write_text(json.dumps(
        {"kind": "gpt", "weights": "model.pt", "model_config": "model_config.json", "tokenizer": "tokenizer.json",
         "recipe": "recipe.yaml", "dtype": "float32"}))
    loaded = load_model(str(old))
    assert torch.equal(loaded.model.wte.weight, exported.model.wte.weight)


def test_hf_weights_map_back_to_ours(exported):
    """The reverse mapping (for starting from pretrained weights): the HF model's state dict, mapped back, loads
    strictly into our GPT built from its config.json and computes the same logits."""
    hf, _ = load_hf(exported)
    cfg = gpt_config_from_hf(json.loads((exported.export / "hf" / "config.json").read_text()))
    assert cfg == replace(exported.model.config, bias=True)  # GPT-2 always has biases (zeros for bias=False)
    model = GPT(cfg).eval()
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    assert model.lm_head.weight is model.wte.weight
    ids = torch.randint(0, exported.tokenizer.vocab_size, (1, cfg.block_size), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, ids)[0], exported.model(ids, ids)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_the_mapping_round_trips(bias):
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=bias)
    state = random_gpt(cfg).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(state, cfg), cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert to_hf_state_dict(state, cfg)["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: (in, out)


def test_a_gpt2_with_the_hubs_tanh_gelu_computes_the_same_logits_in_our_model(one_thread):
    """GPT2Config's defaults, as the Hub's gpt2 checkpoints have them (activation_function gelu_new, biases): read
    into our GPT, which then computes transformers' logits; and written back with the same activation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    cfg = gpt_config_from_hf(hf.config.to_dict())
    assert cfg.activation == "gelu_new" and cfg.bias
    ours = GPT(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    tokens = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        # with targets: the logits of every position
        diff = (ours(tokens, tokens)[0] - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert hf_config(cfg)["activation_function"] == "gelu_new"


def test_the_mapping_refuses_what_our_model_cannot_hold():
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, bias=False)
    hf_state = to_hf_state_dict(random_gpt(cfg).state_dict(), cfg)
    hf_state["transformer.h.0.mlp.c_fc.bias"] += 1.0
    with pytest.raises(ValueError, match="c_fc.bias is not zero and the model has bias=False"):
        from_hf_state_dict(hf_state, cfg)
    with pytest.raises(ValueError, match="activation_function='relu' is not supported"):
        gpt_config_from_hf({**hf_config(cfg), "activation_function": "relu"})
    untied = {**hf_state, "lm_head.weight": torch.zeros(64, 16)}
    with pytest.raises(ValueError, match="only tied output heads"):
        from_hf_state_dict(untied, cfg)


def test_generate_job_at_temperature_0_is_hf_greedy(tokenizers, tmp_path):
    """`jobs/generate.py --temperature 0` decodes greedily (any seed, the same text), as transformers'
    model.generate(do_sample=False) does with the exported model and tokenizer."""
    exported = export_case("char-padded-no-bias", tokenizers, tmp_path / "export")
    hf, hf_tok = load_hf(exported)
    prompt, new = "ROMEO:", 40
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    expected = hf_tok.decode(hf.generate(ids, max_new_tokens=new, do_sample=False)[0])
    r = run_job("generate.py", "--checkpoint", str(exported.export), "--prompt", prompt, "--max-new-tokens", str(new),
                "--temperature", "0", "--seed", "1", "--device", "cpu", "--out", str(tmp_path / "out.txt"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.txt").read_text() == expected + "\n"
    loaded = load_model(str(exported.export))
    assert sample_text(loaded, prompt, new, 0.0, 200, seed=2) == [expected]  # another seed: the same text


@pytest.mark.slow
def test_a_trained_runs_hf_export_matches_the_generate_job(char_dataset, tmp_path):
    """A real run (Ray Train + DeepSpeed): its export/hf loads in transformers, its logits equal our loaded
    model's, and greedy text from jobs/generate.py equals transformers' greedy text."""
    from test_train_nlg import train

    train(char_dataset, tmp_path, "hf", "train.max_steps=30")
    export = tmp_path / "hf" / "export"
    hf = AutoModelForCausalLM.from_pretrained(export / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(export / "hf")
    ours = load_model(str(tmp_path / "hf"))
    prompt, new = "ROMEO:", 20  # tiny's context is 32 tokens
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == ours.tokenizer.encode(prompt).tolist()
    with torch.no_grad():
        assert (ours.model(ids, ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4
    hf.generation_config.eos_token_id = None  # jobs/generate.py does not stop at an end-of-text token
    expected = hf_tok.decode(hf.generate(ids, max_new_tokens=new, do_sample=False)[0])
    out = tmp_path / "greedy.txt"
    r = run_job("generate.py", "--checkpoint", str(tmp_path / "hf"), "--prompt", prompt, "--max-new-tokens",
                str(new), "--temperature", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_text() == expected + "\n"
