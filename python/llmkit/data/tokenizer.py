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
from pathlib import Path

import torch

from llmkit.utils import atomic_directory

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "cls_token", "sep_token")


def _content(token) -> str | None:
    """transformers writes a special token as a string or as {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _read_config(file: Path) -> dict:
    """A tokenizer_config.json / special_tokens_map.json as a dict ({} when absent)."""
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


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
        configs = {name: _read_config(directory / name) for name in ("special_tokens_map.json",
                                                                      "tokenizer_config.json")}
        for config in configs.values():
            for key in SPECIAL_TOKEN_NAMES:
                if _content(config.get(key)) is not None:
                    found[key] = _content(config[key])
        found.update({k: v for k, v in special_tokens.items() if v is not None})
        tokenizer = cls(backend, **found)
        if path.is_dir():
            side = configs["tokenizer_config.json"].get("padding_side")
            if side in ("left", "right"):
                tokenizer.padding_side = side
        return tokenizer

    def save(self, directory) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory`, as one atomic save.

        Both files appear together or not at all (a kill in between never leaves
        a tokenizer.json without its special tokens); other files in `directory`
        (a model saved there) are kept.
        """
        directory = Path(directory)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": self.padding_side,
                  **self.special_tokens}
        with atomic_directory(directory) as tmp:
            (tmp / "tokenizer.json").write_text(self.backend.to_str(), encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
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

# The largest vocab_size train_tokenizer accepts: 2^24 = 16,777,216 entries.
# The `tokenizers` trainers reserve their vocabulary up front, before reading
# a word (BpeTrainer::do_train: HashMap<String, u32>::with_capacity(vocab_size)
# and Vec<String>::with_capacity(vocab_size); WordPiece trains through it):
# 24 bytes a Vec slot plus 33 bytes a hash bucket, buckets rounded up to a
# power of two above 8/7 of the capacity, i.e. 60-100 bytes an entry. At
# vocab_size = 1e9 that is a 95 GB allocation, which the Rust allocator
# answers with an abort (no Python exception). At 2^24 it is about 1.5 GB of
# address space, mostly never touched, which any machine that trains models
# grants. 2^24 is also 64x the largest vocabularies in use (256 k: Gemma,
# mT5) and the last size whose ids a float32 holds exactly.
MAX_VOCAB_SIZE = 1 << 24


def check_vocab_size(vocab_size) -> int:
    """`vocab_size` if it is an int in [1, :data:`MAX_VOCAB_SIZE`], else a ValueError that says why."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size:,} is too large: at most {MAX_VOCAB_SIZE:,} (2^24; the "
                         f"tokenizers trainer reserves memory for the whole vocabulary up front, and real "
                         f"vocabularies stay below 300,000)")
    return vocab_size


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
            included (smaller when the corpus has too few merges); at most
            :data:`MAX_VOCAB_SIZE` (2^24).
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
        progress: the `tokenizers` trainer's progress bars (shown only on a
            terminal, as :func:`llmkit.utils.progress_bar`'s).
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
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if not isinstance(sentinels, int) or isinstance(sentinels, bool) or sentinels < 0:
        raise ValueError(f"sentinels must be an int >= 0, got {sentinels!r}")
    if sentinels >= vocab_size:  # before listing them: sentinels=10**9 would fill the memory
        raise ValueError(f"sentinels={sentinels} does not fit in vocab_size={vocab_size}: the sentinels are "
                         f"part of the vocabulary, with the special tokens and the learned pieces")
    extra = sentinel_tokens(sentinels)
    clash = set(extra) & set(roles.values())
    if clash:
        raise ValueError(f"special tokens {sorted(clash)} clash with the sentinels")
    ordered = list(dict.fromkeys(roles.values()))  # unique, in the order given: ids 0, 1, ...
    if kind == "wordpiece" and "unk_token" not in roles:
        raise ValueError("a wordpiece tokenizer needs an unk_token (for characters outside its alphabet)")
    floor = len(ordered) + len(extra) + (_BYTE_ALPHABET if kind == "bpe" else 1)
    if vocab_size < floor:
        what = f"{len(ordered)} special tokens + {len(extra)} sentinels + " + (
            f"the {_BYTE_ALPHABET}-symbol byte alphabet" if kind == "bpe" else "at least one piece")
        raise ValueError(f"vocab_size={vocab_size} is too small for a {kind} tokenizer: it needs at least "
                         f"{floor} ({what})")
    check_vocab_size(vocab_size)
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    if lowercase is None:
        lowercase = kind == "wordpiece"

    documents = iter_documents(source, max_documents=max_documents)  # checks the path now
    progress = _progress_shown(progress)
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


def _progress_shown(progress: bool) -> bool:
    """The rule of llmkit.utils.progress_bar for the Rust trainer's own bars: off when
    asked, else as LLMKIT_PROGRESS forces, else only when stderr is a terminal."""
    import sys

    from llmkit.utils.progress import progress_enabled

    if not progress:
        return False
    forced = progress_enabled()
    if forced is not None:
        return forced
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


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
