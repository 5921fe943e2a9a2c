"""PackedBlocks: a corpus as one token stream cut into fixed-length blocks.

Documents follow each other with ``separator_id`` after every one (so the
boundaries stay visible to the model: GPT-2's <|endoftext|>, RoBERTa's
FULL-SENTENCES </s>), and the stream is cut into consecutive,
non-overlapping blocks of ``block_len - len(prefix) - len(suffix)`` tokens;
each block gets ``prefix`` and ``suffix`` around it ([CLS] ... [SEP]). The
trailing partial block is dropped, so every block is full (no padding).

The stream is never built: stream position p lies in document
``searchsorted(doc_starts + index, p)``, so a block costs one
``shards.tokens`` read of its tokens plus the separators inserted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class PackedBlocks:
    """Block i (0 <= i < len): ``prefix + stream[i*n:(i+1)*n] + suffix`` as int64,
    with n = block_len - len(prefix) - len(suffix)."""

    def __init__(self, shards, block_len: int, separator_id: int, prefix: Sequence[int] = (),
                 suffix: Sequence[int] = ()):
        self.shards = shards
        self.prefix = np.asarray(list(prefix), dtype=np.int64)
        self.suffix = np.asarray(list(suffix), dtype=np.int64)
        if isinstance(block_len, bool) or not isinstance(block_len, (int, np.integer)):
            raise ValueError(f"block_len must be an int, got {block_len!r}")
        self.block_len = int(block_len)
        self.n = self.block_len - len(self.prefix) - len(self.suffix)
        if self.n < 1:
            raise ValueError(f"block_len {block_len} leaves no room for corpus tokens after a prefix of "
                             f"{len(self.prefix)} and a suffix of {len(self.suffix)} tokens")
        if separator_id is None or int(separator_id) < 0:
            raise ValueError(f"separator_id must be a token id, got {separator_id!r}")
        self.separator_id = int(separator_id)
        doc_starts = np.asarray(shards.doc_starts, dtype=np.int64)
        if doc_starts.ndim != 1 or len(doc_starts) != shards.n_docs + 1 or doc_starts[0] != 0 \
                or doc_starts[-1] != shards.n_tokens:
            raise ValueError("shards.doc_starts must hold n_docs + 1 offsets from 0 to n_tokens")
        self.doc_starts = doc_starts
        # Stream position of each document's separator: its end plus the separators before it.
        self.sep_positions = doc_starts[1:] + np.arange(shards.n_docs, dtype=np.int64)
        self.stream_len = int(shards.n_tokens) + int(shards.n_docs)

    def __len__(self) -> int:
        return self.stream_len // self.n

    def stream(self, start: int, end: int) -> np.ndarray:
        """Stream positions [start, end): corpus tokens with the separators inserted."""
        if not 0 <= start <= end <= self.stream_len:
            raise IndexError(f"stream range [{start}, {end}) is outside [0, {self.stream_len})")
        seps_before = np.searchsorted(self.sep_positions, [start, end], side="left")
        tokens = self.shards.tokens(start - int(seps_before[0]), end - int(seps_before[1]))
        out = np.empty(end - start, dtype=np.int64)
        is_sep = np.zeros(end - start, dtype=bool)
        is_sep[self.sep_positions[seps_before[0]:seps_before[1]] - start] = True
        out[is_sep] = self.separator_id
        out[~is_sep] = tokens
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"PackedBlocks is indexed by int, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} is outside [0, {len(self)})")
        body = self.stream(i * self.n, (i + 1) * self.n)
        return np.concatenate([self.prefix, body, self.suffix])

    def __repr__(self) -> str:
        return (f"PackedBlocks({len(self)} blocks of {self.block_len} tokens, separator {self.separator_id}, "
                f"prefix {self.prefix.tolist()}, suffix {self.suffix.tolist()})")
