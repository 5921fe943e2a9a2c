"""llmkit.data: data the library ships and corpus tooling for pretraining
(documents, tokenizer training, tokenized shards).

:data:`ENGLISH_CORPUS` is a 5.5 M-word English corpus (public domain and
CC-BY; sources and licenses in ``data/corpus/SOURCES.md``), xz-compressed, so
word2vec, GloVe and the pretraining demos work without a download.
"""
from __future__ import annotations

import lzma
import re
from pathlib import Path
from typing import Iterator

ENGLISH_CORPUS = Path(__file__).parent / "corpus" / "english_core.txt.xz"
ENGLISH_CORPUS_WORDS = 5_496_923  # whitespace-separated tokens, as `xz -dc | wc -w` counts them


def english_corpus_lines() -> Iterator[str]:
    """The shipped corpus, line by line (UTF-8, newline stripped), decompressed on the fly."""
    with lzma.open(ENGLISH_CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


# Words as the embedding demos and `llmkit bench word2vec` see them: runs of
# letters (any script) and digits, with inner apostrophes ("don't", "o'er";
# the typographic one is read as ASCII); punctuation and case are dropped, so
# "Ship," and "ship" are one word.
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize_words(line: str) -> list[str]:
    """Lowercase word tokens of a line (punctuation dropped): the embeddings' preprocessing."""
    return _WORD.findall(line.lower().replace("\u2019", "'"))


class EnglishCorpusSentences:
    """The shipped corpus as lists of lowercase words, one per non-empty line;
    restartable (each iteration decompresses again), as Word2Vec / GloVe need."""

    def __iter__(self) -> Iterator[list[str]]:
        for line in english_corpus_lines():
            words = tokenize_words(line)
            if words:
                yield words


def english_corpus_sentences() -> EnglishCorpusSentences:
    """The shipped corpus tokenized by :func:`tokenize_words` (about 5.6 M words), restartable."""
    return EnglishCorpusSentences()


def write_english_corpus_tokens(path: str | Path, max_words: int | None = None) -> tuple[Path, int]:
    """Write the tokenized corpus (one sentence a line, words separated by spaces:
    the format of word2vec.c and gensim's corpus_file) to `path` (atomically), at
    most about `max_words` words; return the path and the word count."""
    from llmkit.utils import atomic_write

    path = Path(path)
    words = 0
    with atomic_write(path, "w") as f:
        for sentence in english_corpus_sentences():
            f.write(" ".join(sentence) + "\n")
            words += len(sentence)
            if max_words is not None and words >= max_words:
                break
    return path, words


def extract_english_corpus(path: str | Path) -> Path:
    """Write the decompressed corpus to `path` (for tools that want a plain file) and return it."""
    from llmkit.utils import atomic_write

    path = Path(path)
    # atomic: an interrupted extraction leaves no half file under `path`
    with lzma.open(ENGLISH_CORPUS, "rb") as src, atomic_write(path, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    return path


# Pretraining corpora (imported last: sources.py reads ENGLISH_CORPUS from here).
from .sources import ENGLISH_CORPUS_DOCUMENTS, iter_documents  # noqa: E402
from .tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from .shards import TokenizedCorpus, TokenShards, prepare_corpus, tokenize_corpus  # noqa: E402

__all__ = ["ENGLISH_CORPUS", "ENGLISH_CORPUS_WORDS", "english_corpus_lines", "extract_english_corpus",
           "tokenize_words", "english_corpus_sentences", "write_english_corpus_tokens",
           "ENGLISH_CORPUS_DOCUMENTS", "iter_documents", "Tokenizer", "train_tokenizer",
           "TokenShards", "TokenizedCorpus", "tokenize_corpus", "prepare_corpus"]
