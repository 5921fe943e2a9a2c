"""Tokenizer: a Hugging Face ``tokenizer.json`` with its special tokens.

The tokenization itself is the `tokenizers` library's (Rust BPE / WordPiece /
Unigram, normalizers, pre-tokenizers, post-processors such as BERT's
[CLS] ... [SEP]); this class adds what transformers' tokenizer classes add on
top and what the models and :mod:`llmkit.generate` need: the named special
tokens (bos, eos, pad, unk, mask, cls, sep) read from
``tokenizer_config.json`` / ``special_tokens_map.json``, batch encoding into
padded tensors, and saving a directory both libraries load.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "cls_token", "sep_token")


def _content(token) -> str | None:
    """transformers writes a special token as a string or as {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token


class Tokenizer:
    """A `tokenizers.Tokenizer` plus named special tokens.

    Args:
        backend: the `tokenizers.Tokenizer`.
        **special_tokens: ``eos_token="</s>"`` etc.; each must be in the vocabulary.
    """

    def __init__(self, backend, **special_tokens):
        self.backend = backend
        self.special_tokens: dict[str, str] = {}
        for name, token in special_tokens.items():
            if name not in SPECIAL_TOKEN_NAMES:
                raise ValueError(f"unknown special token name {name!r}; expected one of {SPECIAL_TOKEN_NAMES}")
            token = _content(token)
            if token is None:
                continue
            if backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
            self.special_tokens[name] = token
        self.padding_side = "right"

    # ------------------------------------------------------------ loading --
    @classmethod
    def from_file(cls, path, **special_tokens) -> "Tokenizer":
        """Load a tokenizer.json, or a directory holding one (and, optionally,
        tokenizer_config.json / special_tokens_map.json naming the special
        tokens). Keyword arguments override the files' special tokens."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        try:
            backend = Backend.from_file(str(file))
        except Exception as err:  # the Rust error names the JSON problem
            raise ValueError(f"{file} is not a valid tokenizer.json: {err}") from None
        found: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            config_file = directory / name
            if config_file.is_file():
                config = json.loads(config_file.read_text())
                for key in SPECIAL_TOKEN_NAMES:
                    if _content(config.get(key)) is not None:
                        found[key] = _content(config[key])
        found.update({k: v for k, v in special_tokens.items() if v is not None})
        tokenizer = cls(backend, **found)
        if path.is_dir() and (directory / "tokenizer_config.json").is_file():
            side = json.loads((directory / "tokenizer_config.json").read_text()).get("padding_side")
            if side in ("left", "right"):
                tokenizer.padding_side = side
        return tokenizer

    def save(self, directory) -> Path:
        """Write tokenizer.json and tokenizer_config.json (atomically) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": self.padding_side,
                  **self.special_tokens}
        for name, text in (("tokenizer.json", self.backend.to_str()),
                           ("tokenizer_config.json", json.dumps(config, indent=2) + "\n")):
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, directory / name)
        return directory

    # --------------------------------------------------------- vocabulary --
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def __getattr__(self, name: str):
        # bos_token / bos_token_id, eos_token / eos_token_id, ... (None when not set).
        if name in SPECIAL_TOKEN_NAMES:
            return self.__dict__.get("special_tokens", {}).get(name)
        if name.endswith("_id") and name[:-3] in SPECIAL_TOKEN_NAMES:
            token = self.__dict__.get("special_tokens", {}).get(name[:-3])
            return None if token is None else self.backend.token_to_id(token)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    @property
    def all_special_ids(self) -> list[int]:
        return sorted({self.backend.token_to_id(t) for t in self.special_tokens.values()})

    # ----------------------------------------------------------- encoding --
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch takes a list of str")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __call__(self, texts, add_special_tokens: bool = True, max_length: int | None = None,
                 padding_side: str | None = None) -> dict[str, torch.Tensor]:
        """Encode a str or a list of str into padded tensors: input_ids and
        attention_mask (batch, longest), truncated to max_length if given."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise ValueError("no texts to encode")
        ids = self.encode_batch(batch, add_special_tokens)
        if max_length is not None:
            ids = [seq[:max_length] for seq in ids]
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        longest = max(len(seq) for seq in ids)
        pad_id = self.pad_token_id
        if pad_id is None:
            if any(len(seq) != longest for seq in ids):
                raise ValueError("this tokenizer has no pad_token: set one (e.g. pad_token=eos_token) "
                                 "to pad a batch of different lengths")
            pad_id = 0
        input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, seq in enumerate(ids):
            span = slice(longest - len(seq), longest) if side == "left" else slice(0, len(seq))
            input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"
