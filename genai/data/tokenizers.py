"""Tokenizers saved beside the data: character-level (nanoGPT-compatible), byte-level BPE, and a pretrained model's
own Hugging Face tokenizer.

All know an end-of-text token (`eot_id`) that preparation puts between the documents of a corpus. BPE has
it as its special token `<|endoftext|>` (id 0). The character tokenizer reserves the id after its characters
for it, and only for corpora of more than one document, so that a one-document corpus (a single text file, the
builtin plays) keeps nanoGPT's vocabulary exactly: its sorted characters and nothing else. A pretrained tokenizer's
is its model's eos token (genai/data/hf_tokenizer.py reads it from the model's folder).
"""

from __future__ import annotations

import json
from typing import Protocol

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
EOT_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...

    def to_json(self) -> str: ...


class CharTokenizer:
    """One token per character, ids in sorted character order (nanoGPT's `stoi`/`itos`); with `eot`, one more
    id, after the characters, for the end-of-text token."""

    kind = "char"

    def __init__(self, chars: list[str], eot: bool = False):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = len(self.chars) if eot else None
        self.vocab_size = len(self.chars) + int(eot)
        # Code points in sorted order beside their ids: encoding is one vectorised search instead of a dict lookup
        # per character.
        self._points = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._order = np.argsort(self._points)
        self._points = self._points[self._order]

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        if not text:
            raise ValueError("cannot build a character vocabulary from an empty corpus")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.searchsorted(self._points, points)
        known = (pos < len(self._points)) & (self._points[np.minimum(pos, len(self._points) - 1)] == points)
        if not known.all():
            raise ValueError(f"character {chr(points[~known][0])!r} is not in the tokenizer's vocabulary")
        return self._order[pos].astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(EOT_TOKEN if int(i) == self.eot_id else self.chars[int(i)] for i in ids)

    def to_json(self) -> str:
        data = {"kind": "char", "chars": self.chars}
        if self.eot_id is not None:  # absent for one-document corpora, so their tokenizer file is nanoGPT's as before
            data["eot"] = EOT_TOKEN
        return json.dumps(data)


class BPETokenizer:
    """Byte-level BPE trained on the corpus with Hugging Face `tokenizers`."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.eot_id = hf_tokenizer.token_to_id(EOT_TOKEN)

    @classmethod
    def train(cls, text_iter, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[EOT_TOKEN],
            show_progress=False,
        )
        tok.train_from_iterator(text_iter, trainer=trainer)
        return cls(tok)

    # add_special_tokens=False: a pretrained tokenizer's post-processor would add its bos token to every piece of a
    # document; documents are separated by the end-of-text token instead.
    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once (in parallel threads unless TOKENIZERS_PARALLELISM=false); no offsets computed."""
        return [np.asarray(e.ids, dtype=np.int32) for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])

    def to_json(self) -> str:
        return json.dumps({"kind": "bpe", "hf": json.loads(self.hf.to_str())})


class PretrainedTokenizer(BPETokenizer):
    """A pretrained model's own tokenizer (its Hugging Face tokenizer.json, whatever its model), with the model's eos
    token as end-of-text."""

    kind = "hf"

    def __init__(self, hf_tokenizer, eot: str):
        super().__init__(hf_tokenizer)
        self.eot = eot
        self.eot_id = hf_tokenizer.token_to_id(eot)

    def to_json(self) -> str:
        return json.dumps({"kind": "hf", "hf": json.loads(self.hf.to_str()), "eot": self.eot})


def tokenizer_from_json(text: str) -> Tokenizer:
    data = json.loads(text)
    if data.get("kind") == "char":
        return CharTokenizer(data["chars"], eot="eot" in data)
    if data.get("kind") == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(data["hf"])))
    if data.get("kind") == "hf":
        from tokenizers import Tokenizer as HFTokenizer

        return PretrainedTokenizer(HFTokenizer.from_str(json.dumps(data["hf"])), data["eot"])
    raise ValueError(f"unknown tokenizer kind {data.get('kind')!r}")
