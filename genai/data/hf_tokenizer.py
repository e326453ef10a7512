"""Our tokenizers (genai/data/tokenizers.py) as Hugging Face tokenizer files, for `AutoTokenizer.from_pretrained`.

BPE already is a `tokenizers.Tokenizer`. The character tokenizer becomes one: a word-level vocabulary of its
characters (id = index in its sorted characters, as ours), a pre-tokenizer that isolates every character,
newlines included, and a decoder that joins tokens with nothing between them. The end-of-text token, when the
tokenizer has one, is a special token and serves as bos, eos and pad (GPT-2's convention).
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from genai.data.tokenizers import Tokenizer

# Any one character: Oniguruma's "." stops at newlines.
_ONE_CHARACTER = r"[\s\S]"


def hf_tokenizer(tok: Tokenizer) -> HFTokenizer:
    """A `tokenizers.Tokenizer` giving the same ids as `tok.encode` and the same text from `decode`."""
    if tok.kind == "bpe":
        return tok.hf
    if tok.kind == "char":
        return _char_tokenizer(tok)
    raise ValueError(f"no Hugging Face form for tokenizer kind {tok.kind!r}")


def _char_tokenizer(tok) -> HFTokenizer:
    vocab = {c: i for i, c in enumerate(tok.chars)}
    eot = eot_token(tok)
    if eot is not None:
        vocab[eot] = tok.eot_id
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=None))  # an unknown character is an error, as in ours
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(_ONE_CHARACTER), behavior="isolated")
    hf.decoder = decoders.Fuse()
    if eot is not None:
        hf.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    return hf


def eot_token(tok: Tokenizer) -> str | None:
    """The end-of-text token's text, or None for a tokenizer without one."""
    if tok.eot_id is None:
        return None
    # BPE's decode skips special tokens; its vocabulary names them.
    return tok.hf.id_to_token(tok.eot_id) if tok.kind == "bpe" else tok.decode([tok.eot_id])


def special_tokens(tok: Tokenizer) -> dict[str, str]:
    """transformers' special-token roles: end-of-text as bos, eos and pad; for BPE also unk (GPT-2's choice, never
    produced by a byte-level vocabulary). Empty for a character tokenizer without end-of-text."""
    eot = eot_token(tok)
    if eot is None:
        return {}
    roles = {"bos_token": eot, "eos_token": eot, "pad_token": eot}
    return {**roles, "unk_token": eot} if tok.kind == "bpe" else roles


def hf_tokenizer_files(tok: Tokenizer, model_max_length: int) -> dict[str, str]:
    """{file name: text} of the tokenizer in Hugging Face's format: tokenizer.json, tokenizer_config.json and,
    for older transformers versions, special_tokens_map.json."""
    specials = special_tokens(tok)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        # transformers' default clean-up would remove spaces before punctuation, breaking decode(encode(text)).
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    return {
        "tokenizer.json": hf_tokenizer(tok).to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(specials, indent=2),
    }
