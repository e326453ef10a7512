"""Our tokenizers (genai/data/tokenizers.py) as Hugging Face tokenizer files, for `AutoTokenizer.from_pretrained`,
and a pretrained model's tokenizer read from its Hugging Face folder.

BPE and a pretrained tokenizer already are a `tokenizers.Tokenizer`. The character tokenizer becomes one: a
word-level vocabulary of its characters (id = index in its sorted characters, as ours), a pre-tokenizer that
isolates every character, newlines included, and a decoder that joins tokens with nothing between them. The
end-of-text token, when the tokenizer has one, is a special token and serves as bos, eos and pad (GPT-2's
convention).
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from cluster.storage import StorageError, resolve
from genai.data.shards import DatasetError
from genai.data.tokenizers import TOKENIZER_FILE, BPETokenizer, PretrainedTokenizer, Tokenizer

# Any one character: Oniguruma's "." stops at newlines.
_ONE_CHARACTER = r"[\s\S]"


def hf_tokenizer(tok: Tokenizer) -> HFTokenizer:
    """A `tokenizers.Tokenizer` giving the same ids as `tok.encode` and the same text from `decode`."""
    if isinstance(tok, BPETokenizer):
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
    return tok.hf.id_to_token(tok.eot_id) if isinstance(tok, BPETokenizer) else tok.decode([tok.eot_id])


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


def tokenizer_from_hf_folder(uri: str) -> PretrainedTokenizer:
    """The tokenizer of a Hugging Face model or tokenizer folder (local or s3://): its tokenizer.json, with the eos
    token of its tokenizer_config.json (else of its config.json's eos_token_id) as end-of-text. Raises DatasetError
    naming the folder or file that is missing or unreadable."""
    loc = resolve(uri)
    if not loc.is_dir():
        raise DatasetError(f"{uri} {'is not a folder' if loc.exists() else 'does not exist'} (a tokenizer is char, "
                           f"bpe, or a Hugging Face model or tokenizer folder holding {TOKENIZER_FILE})")
    try:
        hf = HFTokenizer.from_str(loc.join(TOKENIZER_FILE).read_text())
    except StorageError:
        raise DatasetError(f"{uri}: no {TOKENIZER_FILE} (a Hugging Face tokenizer folder holds one)") from None
    except Exception as exc:  # tokenizers raises its own Exception type for a file it cannot parse
        raise DatasetError(f"{loc.join(TOKENIZER_FILE).uri}: not a Hugging Face tokenizer ({exc})") from None
    eos = _eos_token(loc, hf)
    if eos is None or hf.token_to_id(eos) is None:
        raise DatasetError(f"{uri}: no eos token in its tokenizer (tokenizer_config.json's eos_token or config.json's "
                           "eos_token_id), which separates the documents")
    return PretrainedTokenizer(hf, eos)


def _eos_token(loc, hf: HFTokenizer) -> str | None:
    config = _json_file(loc.join("tokenizer_config.json"))
    eos = config.get("eos_token")
    if isinstance(eos, dict):  # an AddedToken written out
        eos = eos.get("content")
    if eos:
        return eos
    eos_id = _json_file(loc.join("config.json")).get("eos_token_id")
    if isinstance(eos_id, list):  # some models list several; the first is the end of a document
        eos_id = eos_id[0] if eos_id else None
    return hf.id_to_token(eos_id) if isinstance(eos_id, int) else None


def _json_file(loc) -> dict:
    """A JSON file's object, {} when the file is absent; DatasetError when it is not JSON."""
    if not loc.exists():
        return {}
    try:
        data = json.loads(loc.read_text())
    except ValueError as exc:
        raise DatasetError(f"{loc.uri}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
