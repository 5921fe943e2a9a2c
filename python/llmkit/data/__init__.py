"""llmkit.data: data the library ships and, later, corpus tooling for pretraining.

:data:`ENGLISH_CORPUS` is a 5.5 M-word English corpus (public domain and
CC-BY; sources and licenses in ``data/corpus/SOURCES.md``), xz-compressed, so
word2vec, GloVe and the pretraining demos work without a download.
"""
from __future__ import annotations

import lzma
from pathlib import Path
from typing import Iterator

ENGLISH_CORPUS = Path(__file__).parent / "corpus" / "english_core.txt.xz"
ENGLISH_CORPUS_WORDS = 5_496_923  # whitespace-separated tokens, as `xz -dc | wc -w` counts them


def english_corpus_lines() -> Iterator[str]:
    """The shipped corpus, line by line (UTF-8, newline stripped), decompressed on the fly."""
    with lzma.open(ENGLISH_CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def extract_english_corpus(path: str | Path) -> Path:
    """Write the decompressed corpus to `path` (for tools that want a plain file) and return it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with lzma.open(ENGLISH_CORPUS, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.replace(path)  # atomic: an interrupted extraction leaves no half file under `path`
    return path


__all__ = ["ENGLISH_CORPUS", "ENGLISH_CORPUS_WORDS", "english_corpus_lines", "extract_english_corpus"]
