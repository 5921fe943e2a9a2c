"""Tokenized corpora on disk: packed token shards that pretraining reads.

:func:`tokenize_corpus` streams the documents of a source through a tokenizer
(no special tokens: the objectives add their own), splits them into train and
validation by a seeded hash of the document index, and writes::

    out_dir/
      meta.json                     format, dtype, vocab size, tokenizer sha256, counts, source
      tokenizer/                    the tokenizer (tokenizer.json + tokenizer_config.json)
      train_00000.bin ...           raw little-endian uint16 (vocab <= 65536) or uint32 token ids,
      val_00000.bin ...               at most shard_tokens each; a document may continue in the next file
      train_doc_starts.npy          int64 offsets of the documents in the split's token stream,
      val_doc_starts.npy              n_docs + 1 of them (the last is n_tokens)

The directory is one atomic save (:func:`llmkit.utils.atomic_directory`:
written as a temporary sibling, then swapped in), with meta.json written last,
so an interrupted run leaves no half corpus and a directory with a meta.json
is complete. :class:`TokenShards` reads a split through ``np.memmap``: a split
larger than memory streams from the page cache. :func:`prepare_corpus` keeps
such corpora in a cache keyed by the source files and the tokenizer; opening a
cached entry checks it (meta.json, shard sizes, document offsets, the
tokenizer's sha256) and rebuilds a damaged one, with a warning.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from array import array
from pathlib import Path
from typing import Sequence

import numpy as np

from llmkit.utils import atomic_directory, get_logger, progress_bar

from ._cache import build_lock, remove_leftovers
from .sources import describe_source, document_count_hint, iter_documents, source_identity
from .tokenizer import Tokenizer

_log = get_logger(__name__)

FORMAT = "llmkit-token-corpus"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
_BATCH_DOCUMENTS = 2048        # documents per encode_batch call (the Rust side runs them in parallel)
_BATCH_CHARS = 8 << 20         # ... or fewer, when they are long


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's tokenizer.json text (what decides the token ids)."""
    return hashlib.sha256(_as_tokenizer(tokenizer).backend.to_str().encode("utf-8")).hexdigest()


def _as_tokenizer(tokenizer) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return Tokenizer.from_file(tokenizer)
    if type(tokenizer).__module__.startswith("tokenizers"):  # a bare tokenizers.Tokenizer
        return Tokenizer(tokenizer)
    raise TypeError(f"tokenizer must be an llmkit.data.tokenizer.Tokenizer, a tokenizers.Tokenizer or a "
                    f"path to a tokenizer.json / tokenizer directory, got {type(tokenizer).__name__}")


# ------------------------------------------------------------------ reading --
class TokenShards:
    """One split of a tokenized corpus: a token stream (one or more arrays,
    memory-mapped shard files on disk) and the documents' start offsets.

    Attributes:
        n_tokens, n_docs, vocab_size: sizes.
        doc_starts: int64, ``n_docs + 1`` entries, ``doc_starts[0] == 0``,
            ``doc_starts[-1] == n_tokens``; document i is
            ``tokens(doc_starts[i], doc_starts[i + 1])``.
    """

    def __init__(self, shards: Sequence[np.ndarray], doc_starts, vocab_size: int):
        self._shards = [s for s in shards if len(s)]
        # Memory-mapped shards pickle as (file, dtype, length), so a DataLoader
        # worker or another process maps the files instead of copying them.
        self._files = [(s.filename, s.dtype.str, len(s)) for s in self._shards
                       if isinstance(s, np.memmap) and s.filename and s.offset == 0]
        if len(self._files) != len(self._shards):
            self._files = None
        for shard in self._shards:
            if shard.ndim != 1:
                raise ValueError(f"token shards must be 1-D arrays, got shape {shard.shape}")
        lengths = [len(s) for s in self._shards]
        self._offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        self.n_tokens = int(self._offsets[-1])
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        self.vocab_size = int(vocab_size)
        ds = self.doc_starts
        if ds.ndim != 1 or len(ds) < 1 or ds[0] != 0 or ds[-1] != self.n_tokens or np.any(np.diff(ds) < 0):
            raise ValueError(f"doc_starts must be non-decreasing int offsets from 0 to n_tokens={self.n_tokens}, "
                             f"got {len(ds)} values" + (f" from {ds[0]} to {ds[-1]}" if len(ds) else ""))
        self.n_docs = len(ds) - 1

    @classmethod
    def from_documents(cls, docs: Sequence[Sequence[int]], vocab_size: int) -> "TokenShards":
        """An in-memory split holding `docs` (lists / arrays of token ids), for tests and small data."""
        lengths = [len(d) for d in docs]
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=sum(lengths))
        if len(flat) and (flat.min() < 0 or flat.max() >= vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size}), got values in "
                             f"[{flat.min()}, {flat.max()}]")
        doc_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return cls([flat.astype(token_dtype(vocab_size))], doc_starts, vocab_size)

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_starts)

    @property
    def dtype(self) -> np.dtype:
        return self._shards[0].dtype if self._shards else token_dtype(self.vocab_size)

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the split as a fresh int64 array (crossing shard files as needed)."""
        start, end = int(start), int(end)
        if not 0 <= start <= end <= self.n_tokens:
            raise IndexError(f"token range [{start}, {end}) is outside [0, {self.n_tokens}]")
        out = np.empty(end - start, dtype=np.int64)
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos = start
        while pos < end:
            first = int(self._offsets[shard])
            stop = min(end, int(self._offsets[shard + 1]))
            out[pos - start:stop - start] = self._shards[shard][pos - first:stop - first]
            pos, shard = stop, shard + 1
        return out

    def document(self, i: int) -> np.ndarray:
        """The tokens of document i (negative i counts from the end) as int64."""
        i = int(i)
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} is out of range for {self.n_docs} documents")
        i %= self.n_docs
        return self.tokens(self.doc_starts[i], self.doc_starts[i + 1])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._files is not None:
            state["_shards"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._shards is None:
            self._shards = [np.memmap(f, dtype=np.dtype(d), mode="r", shape=(n,)) for f, d, n in self._files]

    def __repr__(self) -> str:
        return (f"TokenShards(n_tokens={self.n_tokens}, n_docs={self.n_docs}, vocab_size={self.vocab_size}, "
                f"shards={len(self._shards)})")


class TokenizedCorpus:
    """A corpus written by :func:`tokenize_corpus`: ``train`` and ``val``
    (:class:`TokenShards`), the ``tokenizer`` that made it, ``meta`` (the
    parsed meta.json) and its ``path``. Open one with :meth:`open`."""

    def __init__(self, path, meta: dict, train: TokenShards, val: TokenShards, tokenizer: Tokenizer):
        self.path = None if path is None else Path(path)
        self.meta = meta
        self.train = train
        self.val = val
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @classmethod
    def open(cls, path) -> "TokenizedCorpus":
        """Open a corpus directory, checking meta.json, the shard files' sizes and the tokenizer's hash."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no tokenized corpus at {str(path)!r}")
        meta_file = path / "meta.json"
        not_corpus = (f"{str(path)!r} is not a tokenized corpus (expected a directory written by "
                      f"llmkit.data.tokenize_corpus, with a meta.json)")
        if not path.is_dir() or not meta_file.is_file():
            raise ValueError(not_corpus)
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{not_corpus}: meta.json is not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(not_corpus)
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{str(path)!r} is a tokenized corpus of format version {meta.get('version')}; "
                             f"this llmkit reads version {FORMAT_VERSION}: tokenize the source again")
        damaged = f"{str(path)!r} is a damaged tokenized corpus"
        try:
            dtype = np.dtype(meta["dtype"])
            vocab_size = int(meta["vocab_size"])
            splits = {name: cls._open_split(path, name, meta["splits"][name], dtype, vocab_size)
                      for name in SPLITS}
        except (KeyError, TypeError) as err:
            raise ValueError(f"{damaged}: meta.json lacks or garbles {err}; tokenize the source again") from None
        try:
            tokenizer = Tokenizer.from_file(path / "tokenizer")
        except (OSError, ValueError) as err:
            raise ValueError(f"{damaged}: its tokenizer cannot be read ({err}); tokenize the source again") from None
        if tokenizer_sha256(tokenizer) != meta.get("tokenizer_sha256"):
            raise ValueError(f"{damaged}: tokenizer/tokenizer.json does not match the sha256 in meta.json")
        return cls(path, meta, splits["train"], splits["val"], tokenizer)

    @staticmethod
    def _open_split(path: Path, name: str, split: dict, dtype: np.dtype, vocab_size: int) -> TokenShards:
        damaged = f"{str(path)!r} is a damaged tokenized corpus"
        shards = []
        for entry in split["shards"]:
            file, n = path / entry["file"], int(entry["n_tokens"])
            if not file.is_file() or file.stat().st_size != n * dtype.itemsize:
                raise ValueError(f"{damaged}: shard {entry['file']} is missing or not {n} {dtype} tokens "
                                 f"long; tokenize the source again")
            shards.append(np.memmap(file, dtype=dtype, mode="r", shape=(n,)) if n else np.empty(0, dtype))
        try:
            doc_starts = np.load(path / split["doc_starts"], allow_pickle=False)
            shards = TokenShards(shards, doc_starts, vocab_size)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"{damaged}: {split['doc_starts']} is missing or wrong ({err}); "
                             f"tokenize the source again") from None
        if shards.n_docs != split["n_docs"] or shards.n_tokens != split["n_tokens"]:
            raise ValueError(f"{damaged}: the {name} split does not match meta.json's counts; "
                             f"tokenize the source again")
        return shards

    def __repr__(self) -> str:
        return (f"TokenizedCorpus({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"train={self.train.n_tokens} tokens / {self.train.n_docs} docs, "
                f"val={self.val.n_tokens} tokens / {self.val.n_docs} docs)")


# ------------------------------------------------------------------ writing --
class _SplitWriter:
    """Appends documents to one split's shard files, at most shard_tokens per file."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.name, self.dtype, self.shard_tokens = directory, name, dtype, shard_tokens
        self.shards: list[dict] = []
        self.doc_starts = array("q", [0])
        self.n_tokens = 0
        self._file = None

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts) - 1

    def add(self, docs: list[list[int]]) -> None:
        if not docs:
            return
        lengths = [len(d) for d in docs]
        for n in lengths:
            self.n_tokens += n
            self.doc_starts.append(self.n_tokens)
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=sum(lengths))
        flat = flat.astype(self.dtype)
        pos = 0
        while pos < len(flat):
            if self._file is None or self.shards[-1]["n_tokens"] == self.shard_tokens:
                self._next_file()
            room = self.shard_tokens - self.shards[-1]["n_tokens"]
            chunk = flat[pos:pos + room]
            chunk.tofile(self._file)
            self.shards[-1]["n_tokens"] += len(chunk)
            pos += len(chunk)

    def _next_file(self) -> None:
        self._close_file()
        name = f"{self.name}_{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "n_tokens": 0})

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> dict:
        self._close_file()
        doc_starts = f"{self.name}_doc_starts.npy"
        np.save(self.directory / doc_starts, np.frombuffer(self.doc_starts, dtype=np.int64))
        return {"n_tokens": self.n_tokens, "n_docs": self.n_docs, "doc_starts": doc_starts,
                "shards": self.shards}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _is_val(index: int, seed: int, val_fraction: float) -> bool:
    """Seeded hash of the document index -> uniform [0, 1) < val_fraction: the
    split depends only on (seed, index), not on the tokenizer or the batching."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{str(out_dir)!r} exists and is not a directory: choose another out_dir")
    if out_dir.exists() and not overwrite and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{str(out_dir)!r} already exists and is not empty; pass overwrite=True to "
                              f"replace it, or choose another out_dir")


def tokenize_corpus(source, tokenizer, out_dir, *, val_fraction: float = 0.005, seed: int = 0,
                    shard_tokens: int = 1 << 26, progress: bool = True, max_documents: int | None = None,
                    overwrite: bool = False, _extra_meta: dict | None = None) -> TokenizedCorpus:
    """Tokenize the documents of `source` (see :func:`llmkit.data.iter_documents`;
    None = the shipped corpus) into a corpus directory `out_dir` and open it.

    Args:
        tokenizer: a :class:`~llmkit.data.tokenizer.Tokenizer` (or a path to one);
            documents are encoded WITHOUT special tokens.
        val_fraction: the share of documents in the validation split, chosen by
            a hash of (seed, document index); with val_fraction > 0 and at
            least 2 documents, val gets at least one and train keeps one.
        shard_tokens: tokens per shard file at most.
        max_documents: read only the first documents.
        overwrite: replace an existing non-empty out_dir (else FileExistsError).

    Documents that encode to no token are left out (counted in meta.json).
    Memory holds one batch of documents, never the corpus.
    """
    tokenizer = _as_tokenizer(tokenizer)
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not isinstance(shard_tokens, int) or isinstance(shard_tokens, bool) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    out_dir = Path(out_dir).expanduser()
    _check_target(out_dir, overwrite)  # fail before the work, and again before the swap
    documents = iter_documents(source, max_documents=max_documents)  # checks the path now
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)

    # One atomic save: the corpus replaces out_dir whole (nothing of an old one is kept), or not at all.
    with atomic_directory(out_dir, keep_existing=False) as tmp:
        writers = {name: _SplitWriter(tmp, name, dtype, shard_tokens) for name in SPLITS}
        try:
            # The newest document of each split is held back, so that at the end
            # one can still move to an empty split (a tiny corpus still gets a val).
            held: dict[str, list[int] | None] = {name: None for name in SPLITS}
            n_read = n_empty = 0
            bar = progress_bar(total=document_count_hint(source, max_documents), unit="doc", desc="tokenizing",
                               disable=not progress)
            with bar:
                for batch in _batches(documents):
                    encodings = tokenizer.backend.encode_batch(batch, add_special_tokens=False)
                    ready: dict[str, list] = {name: [] for name in SPLITS}
                    for encoding in encodings:
                        ids = encoding.ids
                        index, n_read = n_read, n_read + 1
                        if not ids:
                            n_empty += 1
                            continue
                        if max(ids) >= vocab_size:
                            raise ValueError(f"the tokenizer produced id {max(ids)} >= its vocab_size {vocab_size}")
                        split = "val" if _is_val(index, seed, val_fraction) else "train"
                        if held[split] is not None:
                            ready[split].append(held[split])
                        held[split] = ids
                    for name in SPLITS:
                        writers[name].add(ready[name])
                    bar.update(len(batch))
                    bar.set_postfix(tokens=sum(w.n_tokens for w in writers.values()), refresh=False)
            total = sum(w.n_docs for w in writers.values()) + sum(h is not None for h in held.values())
            if total == 0:
                raise ValueError(f"empty corpus: no document of {describe_source(source)} encodes to any token")
            if held["val"] is None and total >= 2 and val_fraction > 0:
                held["val"], held["train"] = held["train"], None  # the last train document becomes val
            if held["train"] is None and writers["train"].n_docs == 0:
                held["train"], held["val"] = held["val"], None    # train must not be empty
            for name in SPLITS:
                if held[name] is not None:
                    writers[name].add([held[name]])
            splits = {name: writers[name].finish() for name in SPLITS}
        finally:
            for writer in writers.values():
                writer.abort()
        tokenizer.save(tmp / "tokenizer")
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab_size,
                "tokenizer_sha256": tokenizer_sha256(tokenizer), "source": describe_source(source),
                "documents_read": n_read, "empty_documents_skipped": n_empty,
                "val_fraction": val_fraction, "seed": seed, "max_documents": max_documents,
                "shard_tokens": shard_tokens, "add_special_tokens": False, "splits": splits,
                **(_extra_meta or {})}
        # meta.json last: a directory holding it holds everything it lists.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _check_target(out_dir, overwrite)  # another process may have written out_dir meanwhile
    corpus = TokenizedCorpus.open(out_dir)
    corpus.tokenizer = tokenizer  # the caller's object (same tokenizer.json; keeps its roles and settings)
    return corpus


def _batches(documents):
    batch: list[str] = []
    chars = 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if len(batch) >= _BATCH_DOCUMENTS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ------------------------------------------------------------------ caching --
def default_cache_dir() -> Path:
    """$LLMKIT_CACHE/corpora, else ~/.cache/llmkit/corpora."""
    root = os.environ.get("LLMKIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "llmkit") / "corpora"


def corpus_cache_key(source, tokenizer, *, val_fraction: float = 0.005, seed: int = 0,
                     max_documents: int | None = None) -> str:
    """The hex key prepare_corpus caches under: source files (paths, sizes,
    mtimes; "builtin" for the shipped corpus), tokenizer.json's sha256, split
    settings and format version."""
    key = {"version": FORMAT_VERSION, "source": source_identity(source),
           "tokenizer_sha256": tokenizer_sha256(tokenizer), "val_fraction": float(val_fraction),
           "seed": seed, "max_documents": max_documents}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def prepare_corpus(source, tokenizer, cache_dir=None, *, val_fraction: float = 0.005, seed: int = 0,
                   shard_tokens: int = 1 << 26, progress: bool = True,
                   max_documents: int | None = None) -> TokenizedCorpus:
    """The tokenized corpus of `source` with `tokenizer`, from the cache when
    it was made before (same files, sizes and mtimes, same tokenizer.json,
    same split settings), else tokenized now (see :func:`tokenize_corpus`)
    into ``cache_dir`` (default :func:`default_cache_dir`)."""
    tokenizer = _as_tokenizer(tokenizer)
    key = corpus_cache_key(source, tokenizer, val_fraction=val_fraction, seed=seed, max_documents=max_documents)
    name = "english_core" if source is None else Path(source).name.split(".")[0]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:40] or "corpus"
    path = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / f"{name}-{key[:16]}"
    corpus = _open_cached(path, key)
    if corpus is None:
        with build_lock(path):
            # Another process may have built it while this one waited for the lock.
            corpus = _open_cached(path, key, warn=False)
            if corpus is None:
                remove_leftovers(path)
                corpus = tokenize_corpus(source, tokenizer, path, val_fraction=val_fraction, seed=seed,
                                         shard_tokens=shard_tokens, progress=progress, max_documents=max_documents,
                                         overwrite=True, _extra_meta={"cache_key": key})
    corpus.tokenizer = tokenizer
    return corpus


def _open_cached(path: Path, key: str, warn: bool = True) -> TokenizedCorpus | None:
    """The cache entry at `path`, or None when it is missing, damaged or another
    corpus (then it is rebuilt: a broken entry never fails a run for good)."""
    if not os.path.lexists(path):
        return None
    try:
        corpus = TokenizedCorpus.open(path)
    except (ValueError, OSError) as err:
        if warn:
            _log.warning("the cached corpus %s is unusable (%s): tokenizing the source again", path, err)
        return None
    if corpus.meta.get("cache_key") != key:
        if warn:
            _log.warning("the cached corpus %s was made from other data (its cache key differs): "
                         "tokenizing the source again", path)
        return None
    return corpus


__all__ = ["TokenShards", "TokenizedCorpus", "tokenize_corpus", "prepare_corpus", "token_dtype",
           "tokenizer_sha256", "default_cache_dir", "corpus_cache_key"]
