"""GloVe (Pennington et al. 2014): weighted least squares on log co-occurrence counts.

Stanford GloVe's pipeline and defaults (vocab_count, cooccur, shuffle, glove)
on the C++ code in csrc/word2vec/glove_cpu.cpp (``llmkit._C.glove``):

* vocabulary: as :class:`~llmkit.embeddings.Word2Vec` (``min_count``,
  ``max_vocab_size``; most frequent first, ties in reverse first-seen order, as gensim);
* counts: X[i, j] sums 1/d over the occurrences of word j at distance
  d <= window left of word i (and right of it when ``symmetric``), inside a
  sentence; out-of-vocabulary words are dropped first. The corpus streams in
  chunks of ``chunk_words`` into one C++ counter, so it is never held whole;
* training: AdaGrad on 0.5 f(X_ij) (w_i.c_j + b_i + b'_j - log X_ij)^2, with
  f(x) = (x / x_max)^alpha capped at 1, Hogwild threads over the records
  shuffled every epoch; W, C and biases start uniform in [-0.5, 0.5) / dim
  and the AdaGrad sums at 1, as glove.c.

``.wv`` holds W + C (the word plus the context vector, no biases), Stanford's
default output (``-model 2``); the separate matrices, biases in the last
column, are ``.W`` and ``.C``.
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import torch

from .word2vec import LineSentence, _check_positive_int, _restartable, encode_chunks, select_vocabulary

DENSE_BYTES = 256 << 20  # the dense table of frequent pairs (csrc/word2vec/glove_cpu.cpp)


class GloVe:
    """GloVe vectors; Stanford's parameters.

    ``GloVe(sentences=..., vector_size=100, window=10, min_count=5, x_max=100.0,
    alpha=0.75, learning_rate=0.05, epochs=25, workers=..., seed=1)`` builds the
    vocabulary, counts the co-occurrences and trains at once when a corpus is
    given; ``train(epochs=n)`` continues (the AdaGrad state is kept). The vectors
    (W + C) are in ``.wv`` (:class:`~llmkit.embeddings.KeyedVectors`); ``.losses``
    is the cost per epoch (summed cost over the number of pairs, as glove.c
    prints). Training is deterministic with ``workers=1`` and a seed.

    Memory: the counter holds ``dense_bytes`` (a table of frequent pairs), a
    64 MiB sort buffer per worker and about 12 bytes per distinct rarer pair
    (2-3x that at the peak of a merge);
    training holds 12 bytes per pair plus four (vocab, vector_size + 1) float32
    matrices.
    """

    def __init__(self, sentences=None, corpus_file=None, vector_size: int = 100, window: int = 10,
                 min_count: int = 5, max_vocab_size: int | None = None, x_max: float = 100.0, alpha: float = 0.75,
                 learning_rate: float = 0.05, epochs: int = 25, workers: int | None = None, seed: int = 1,
                 symmetric: bool = True, distance_weighting: bool = True, progress: bool = True,
                 chunk_words: int = 1_000_000, dense_bytes: int = DENSE_BYTES):
        _check_positive_int("vector_size", vector_size)
        _check_positive_int("window", window)
        _check_positive_int("min_count", min_count)
        _check_positive_int("epochs", epochs)
        _check_positive_int("chunk_words", chunk_words)
        if max_vocab_size is not None:
            _check_positive_int("max_vocab_size", max_vocab_size)
        for name, value in (("x_max", x_max), ("learning_rate", learning_rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
        if isinstance(dense_bytes, bool) or not isinstance(dense_bytes, int) or dense_bytes < 0:
            raise ValueError(f"dense_bytes must be an int >= 0, got {dense_bytes!r}")
        if sentences is not None and corpus_file is not None:
            raise ValueError("give sentences or corpus_file, not both")
        self.vector_size, self.window, self.min_count = vector_size, window, min_count
        self.max_vocab_size, self.x_max, self.alpha = max_vocab_size, float(x_max), float(alpha)
        self.learning_rate, self.epochs, self.seed = float(learning_rate), epochs, seed
        self.workers = workers if workers is not None else max(1, torch.get_num_threads())
        _check_positive_int("workers", self.workers)
        self.symmetric, self.distance_weighting = bool(symmetric), bool(distance_weighting)
        self.progress, self.chunk_words, self.dense_bytes = progress, chunk_words, dense_bytes
        self.wv = None
        self.W = self.C = self.gradsq_W = self.gradsq_C = None
        self.cooccurrence: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.cooccurrence_stats: dict = {}
        self.losses: list[float] = []
        self.training_stats: list[dict] = []
        self.epochs_trained = 0
        if corpus_file is not None:
            sentences = LineSentence(corpus_file)
        if sentences is not None:
            self.build_vocab(sentences)
            self.count_cooccurrences(sentences)
            self.train()

    # ----------------------------------------------------------- vocabulary --

    def build_vocab(self, sentences) -> "GloVe":
        """Count the corpus and keep words with count >= min_count (as Word2Vec.build_vocab)."""
        from .keyed_vectors import KeyedVectors

        sentences = _restartable(sentences)
        words, self.counts, total, n_sentences = select_vocabulary(sentences, self.min_count, self.max_vocab_size)
        self.key_to_index = {w: i for i, w in enumerate(words)}
        self.corpus_total_words, self.corpus_count = total, n_sentences
        self.retained_words = int(self.counts.sum())
        # glove.c's init: every entry (biases too) uniform in [-0.5, 0.5) / dim; AdaGrad sums at 1.
        gen = torch.Generator().manual_seed(self.seed)
        shape = (len(words), self.vector_size + 1)
        self.W = (torch.rand(shape, generator=gen) - 0.5) / self.vector_size
        self.C = (torch.rand(shape, generator=gen) - 0.5) / self.vector_size
        self.gradsq_W, self.gradsq_C = torch.ones(shape), torch.ones(shape)
        self.wv = KeyedVectors(self.vector_size)
        self.wv.add_vectors(words, self._output_vectors(), extras={"count": self.counts})
        self.cooccurrence = None
        self.losses, self.epochs_trained = [], 0
        return self

    def _encoded_chunks(self, sentences) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return encode_chunks(sentences, self.key_to_index, self.chunk_words)

    # --------------------------------------------------------------- counts --

    def count_cooccurrences(self, sentences=None, corpus_file=None) -> "GloVe":
        """Stream the corpus through the C++ counter; keeps the pairs in ``.cooccurrence``
        ((rows, cols, values), sorted by (row, col) until training shuffles them)."""
        from llmkit import _C
        from tqdm import tqdm

        if self.wv is None:
            raise RuntimeError("build_vocab() first (or pass the corpus to GloVe(...))")
        if corpus_file is not None:
            sentences = LineSentence(corpus_file)
        sentences = _restartable(sentences)
        start = time.perf_counter()
        counter = _C.glove.CooccurrenceCounter(len(self.key_to_index), self.window, self.symmetric,
                                               self.distance_weighting, self.workers, self.dense_bytes)
        c_seconds = 0.0
        bar = tqdm(total=self.retained_words, unit="word", unit_scale=True, desc="glove counts",
                   disable=not self.progress, dynamic_ncols=True)
        with bar:
            for ids, offsets in self._encoded_chunks(sentences):
                t = time.perf_counter()
                counter.add(ids, offsets)
                c_seconds += time.perf_counter() - t
                bar.update(ids.numel())
            t = time.perf_counter()
            rows, cols, values = counter.result()
            c_seconds += time.perf_counter() - t
        if rows.numel() == 0:
            raise ValueError("no co-occurring pairs: every sentence has fewer than 2 words in the vocabulary "
                             f"(min_count={self.min_count})")
        self.cooccurrence = (rows, cols, values)
        self.cooccurrence_stats = {"pairs": rows.numel(), "words": counter.words, "seconds": time.perf_counter() - start,
                                   "counting_seconds": c_seconds, "dense_cells": counter.dense_cells,
                                   "dense_product": counter.dense_product}
        return self

    @property
    def cooccurrence_count(self) -> int:
        """Number of distinct (word, context) pairs with a nonzero count."""
        return 0 if self.cooccurrence is None else int(self.cooccurrence[0].numel())

    # ------------------------------------------------------------- training --

    def train(self, epochs: int | None = None) -> "GloVe":
        """Run `epochs` more AdaGrad epochs (default the constructor's) over the counted pairs."""
        from llmkit import _C
        from tqdm import tqdm

        if self.cooccurrence is None:
            raise RuntimeError("count_cooccurrences() first (or pass the corpus to GloVe(...))")
        epochs = self.epochs if epochs is None else epochs
        _check_positive_int("epochs", epochs)
        rows, cols, values = self.cooccurrence
        start = time.perf_counter()
        bar = tqdm(range(epochs), unit="epoch", desc="glove", disable=not self.progress, dynamic_ncols=True)
        for _ in bar:
            seed = (self.seed * 1_000_003 + self.epochs_trained * 7919) % 2**63
            cost = _C.glove.train_epoch(self.W, self.C, self.gradsq_W, self.gradsq_C, rows, cols, values,
                                        self.x_max, self.alpha, self.learning_rate, self.workers, seed, True)
            self.losses.append(cost / rows.numel())
            self.epochs_trained += 1
            bar.set_postfix(cost=f"{self.losses[-1]:.4f}")
        elapsed = time.perf_counter() - start
        self.training_stats.append({"epochs": epochs, "pairs": rows.numel(), "seconds": elapsed,
                                    "seconds_per_epoch": elapsed / epochs, "cost": self.losses[-1]})
        self.wv.vectors = self._output_vectors()
        self.wv.fill_norms(force=True)
        return self

    def _output_vectors(self) -> np.ndarray:
        return (self.W[:, :-1] + self.C[:, :-1]).numpy()


__all__ = ["GloVe"]
