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


# ------------------------------------------------------------------ training --
# Default special tokens per kind, in id order (ids 0..4): RoBERTa's for
# byte-level BPE, BERT's for WordPiece (same roles as the pretrained models'
# tokenizers, so the models' configs and the objectives find them by role).
DEFAULT_SPECIAL_TOKENS = {
    "bpe": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
            "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"},
    "wordpiece": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"},
}
_BYTE_ALPHABET = 256  # byte-level BPE always holds every byte's symbol


def sentinel_tokens(n: int) -> list[str]:
    """T5's span-corruption sentinels ``<extra_id_0>`` .. ``<extra_id_{n-1}>``."""
    return [f"<extra_id_{i}>" for i in range(n)]


def train_tokenizer(source=None, vocab_size: int = 8192, kind: str = "bpe", special_tokens: dict | None = None,
                    *, sentinels: int = 0, min_frequency: int = 2, lowercase: bool | None = None,
                    progress: bool = True, max_documents: int | None = None) -> Tokenizer:
    """Train a tokenizer on the documents of `source` (see
    :func:`llmkit.data.iter_documents`; None = the shipped English corpus).

    Args:
        vocab_size: the final vocabulary size, special tokens and sentinels
            included (smaller when the corpus has too few merges).
        kind: "bpe" (byte-level, GPT-2/RoBERTa: never an unknown token) or
            "wordpiece" (BERT: BertNormalizer, lowercase by default).
        special_tokens: role -> token (roles of :data:`SPECIAL_TOKEN_NAMES`),
            ids given in this order from 0; None = the kind's defaults
            (bpe: ``<s> <pad> </s> <unk> <mask>``, bos=cls=<s>, eos=sep=</s>;
            wordpiece: ``[PAD] [UNK] [CLS] [SEP] [MASK]``).
        sentinels: add ``<extra_id_0>`` .. ``<extra_id_{n-1}>`` as special
            tokens at the top of the vocabulary, ``<extra_id_0>`` highest (T5).
        min_frequency: a merge / word piece must occur this often.
        lowercase: None = True for wordpiece, False for bpe.
        progress: the `tokenizers` trainer's progress bars.
        max_documents: train on the first documents only.

    Encoding with ``add_special_tokens=True`` wraps text as ``<s> A </s>``
    (bpe, RoBERTa's pair form ``<s> A </s></s> B </s>``) or
    ``[CLS] A [SEP] (B [SEP])`` (wordpiece); corpora are tokenized without.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    from .sources import document_count_hint, iter_documents

    if kind not in DEFAULT_SPECIAL_TOKENS:
        raise ValueError(f"kind must be one of {sorted(DEFAULT_SPECIAL_TOKENS)}, got {kind!r}")
    roles = dict(DEFAULT_SPECIAL_TOKENS[kind] if special_tokens is None else special_tokens)
    for name, token in roles.items():
        if name not in SPECIAL_TOKEN_NAMES:
            raise ValueError(f"unknown special token role {name!r}; expected one of {SPECIAL_TOKEN_NAMES}")
        if not isinstance(token, str) or not token:
            raise ValueError(f"special token {name} must be a non-empty string, got {token!r}")
    if not isinstance(sentinels, int) or isinstance(sentinels, bool) or sentinels < 0:
        raise ValueError(f"sentinels must be an int >= 0, got {sentinels!r}")
    extra = sentinel_tokens(sentinels)
    clash = set(extra) & set(roles.values())
    if clash:
        raise ValueError(f"special tokens {sorted(clash)} clash with the sentinels")
    ordered = list(dict.fromkeys(roles.values()))  # unique, in the order given: ids 0, 1, ...
    if kind == "wordpiece" and "unk_token" not in roles:
        raise ValueError("a wordpiece tokenizer needs an unk_token (for characters outside its alphabet)")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    floor = len(ordered) + len(extra) + (_BYTE_ALPHABET if kind == "bpe" else 1)
    if vocab_size < floor:
        what = f"{len(ordered)} special tokens + {len(extra)} sentinels + " + (
            f"the {_BYTE_ALPHABET}-symbol byte alphabet" if kind == "bpe" else "at least one piece")
        raise ValueError(f"vocab_size={vocab_size} is too small for a {kind} tokenizer: it needs at least "
                         f"{floor} ({what})")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    if lowercase is None:
        lowercase = kind == "wordpiece"

    documents = iter_documents(source, max_documents=max_documents)  # checks the path now
    train_size = vocab_size - len(extra)  # the sentinels are added after training
    if kind == "bpe":
        backend = Backend(models.BPE())
        if lowercase:
            backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=train_size, min_frequency=min_frequency,
                                      special_tokens=ordered, show_progress=progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        backend = Backend(models.WordPiece(unk_token=roles["unk_token"]))
        backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                        strip_accents=None, lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=train_size, min_frequency=min_frequency,
                                            special_tokens=ordered, show_progress=progress,
                                            continuing_subword_prefix="##")
    backend.train_from_iterator(documents, trainer, length=document_count_hint(source, max_documents))
    if extra:
        backend.add_special_tokens(extra[::-1])  # <extra_id_0> gets the highest id, as in T5
    backend.post_processor = _post_processor(kind, roles, backend)
    return Tokenizer(backend, **roles)


def _post_processor(kind: str, roles: dict, backend):
    """What add_special_tokens=True adds: RoBERTa's <s> A </s> for bpe, BERT's
    [CLS] A [SEP] for wordpiece; with custom roles, whichever of start
    (cls/bos) and end (sep/eos) tokens exist."""
    from tokenizers import processors

    start = roles.get("cls_token") or roles.get("bos_token")
    end = roles.get("sep_token") or roles.get("eos_token")
    if kind == "bpe" and start and end:
        return processors.RobertaProcessing((end, backend.token_to_id(end)),  # (sep, cls)
                                            (start, backend.token_to_id(start)),
                                            trim_offsets=True, add_prefix_space=False)
    if not start and not end:
        return processors.ByteLevel(trim_offsets=True) if kind == "bpe" else None
    head = f"{start} " if start else ""
    single = f"{head}$A" + (f" {end}" if end else "")
    pair = single + " $B:1" + (f" {end}:1" if end else "")
    used = [t for t in (start, end) if t]
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[(t, backend.token_to_id(t)) for t in used])
