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

``save(path)`` / ``GloVe.load(path)`` keep the whole state in one file
(safetensors arrays and JSON metadata, written atomically): vocabulary,
W, C, the AdaGrad sums, the counted pairs (unless saved without them) and every
setting, so that ``train()`` continues after ``load()`` exactly as without the
round trip.
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import torch

from llmkit.utils import get_logger, progress_bar

from . import _storage
from .word2vec import LineSentence, _check_positive_int, _restartable, encode_chunks, select_vocabulary

logger = get_logger(__name__)

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
        vocab = select_vocabulary(sentences, self.min_count, self.max_vocab_size)
        words, self.counts = vocab.words, vocab.counts
        self.key_to_index = {w: i for i, w in enumerate(words)}
        self.corpus_total_words, self.corpus_count = vocab.total_words, vocab.sentences
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

        if self.wv is None:
            raise RuntimeError("build_vocab() first (or pass the corpus to GloVe(...))")
        if corpus_file is not None:
            sentences = LineSentence(corpus_file)
        sentences = _restartable(sentences)
        start = time.perf_counter()
        counter = _C.glove.CooccurrenceCounter(len(self.key_to_index), self.window, self.symmetric,
                                               self.distance_weighting, self.workers, self.dense_bytes)
        c_seconds = 0.0
        bar = progress_bar(total=self.retained_words, unit="word", unit_scale=True, desc="glove counts",
                           disable=not self.progress)
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
        self.cooccurrence_stats = {"pairs": rows.numel(), "words": counter.words,
                                   "seconds": time.perf_counter() - start,
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

        if self.cooccurrence is None:
            raise RuntimeError("count_cooccurrences() first (or pass the corpus to GloVe(...))")
        epochs = self.epochs if epochs is None else epochs
        _check_positive_int("epochs", epochs)
        rows, cols, values = self.cooccurrence
        start = time.perf_counter()
        bar = progress_bar(range(epochs), unit="epoch", desc="glove", disable=not self.progress)
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
        logger.info("glove: %d epoch(s) over %d pairs in %.1f s, cost %.4f", epochs, rows.numel(), elapsed,
                    self.losses[-1])
        return self

    def _output_vectors(self) -> np.ndarray:
        return (self.W[:, :-1] + self.C[:, :-1]).numpy()

    # ---------------------------------------------------------- persistence --

    def save(self, fname, cooccurrence: bool = True) -> None:
        """Save the model to one file: settings, vocabulary and counts, W, C (biases in their last
        column), the AdaGrad sums, the losses and, with `cooccurrence` (the default), the counted
        pairs, so that :meth:`load` then :meth:`train` continues exactly (about 12 bytes a pair;
        without them, call :meth:`count_cooccurrences` on the corpus again before training).
        llmkit's format (safetensors arrays plus JSON metadata), written atomically."""
        config = {name: getattr(self, name) for name in _SETTINGS}
        state = {"corpus_count": getattr(self, "corpus_count", 0),
                 "corpus_total_words": getattr(self, "corpus_total_words", 0),
                 "epochs_trained": self.epochs_trained, "losses": self.losses, "training_stats": self.training_stats,
                 "cooccurrence_stats": self.cooccurrence_stats, "has_vocabulary": self.wv is not None,
                 "has_cooccurrence": bool(cooccurrence) and self.cooccurrence is not None}
        header: dict = {"config": config, "state": state}
        tensors: dict = {}
        if self.wv is not None:
            tensors, header["wv"] = self.wv._to_tensors(prefix="wv.")
            for name in ("W", "C", "gradsq_W", "gradsq_C"):
                tensors[name] = getattr(self, name).numpy()
        if state["has_cooccurrence"]:
            for name, tensor in zip(("rows", "cols", "values"), self.cooccurrence):
                tensors[f"cooccurrence.{name}"] = tensor.numpy()
        _storage.write(fname, "GloVe", header, tensors)

    @classmethod
    def load(cls, fname, *, progress: bool = True) -> "GloVe":
        """A model saved by :meth:`save`; ValueError for another kind of file, a pickle or a damaged file."""
        from .keyed_vectors import KeyedVectors

        header, tensors = _storage.read(fname, "GloVe")
        config, state = header.get("config"), header.get("state")
        if not isinstance(config, dict) or not isinstance(state, dict):
            raise ValueError(f"{fname}: no config / state in the llmkit metadata (damaged file)")
        try:
            model = cls(**{k: config[k] for k in _SETTINGS if k in config}, progress=progress)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{fname}: the saved settings are refused: {err}") from None
        if state.get("has_vocabulary"):
            if not isinstance(header.get("wv"), dict):
                raise ValueError(f"{fname}: the vocabulary header is missing (damaged file)")
            model.wv = KeyedVectors._from_tensors(header["wv"], tensors, fname, prefix="wv.")
            n, d = len(model.wv), model.vector_size
            if "count" not in model.wv.expandos or model.wv.vector_size != d:
                raise ValueError(f"{fname}: the vocabulary does not match the settings (damaged file)")
            model.wv._vectors = np.array(model.wv.vectors)  # writable: train() replaces it, queries cache norms
            model.counts = np.asarray(model.wv.expandos["count"], dtype=np.int64)
            model.key_to_index = dict(model.wv.key_to_index)
            model.retained_words = int(model.counts.sum())
            for name in ("W", "C", "gradsq_W", "gradsq_C"):
                matrix = _storage.need(tensors, name, fname, (n, d + 1))
                setattr(model, name, torch.from_numpy(np.array(matrix, dtype=np.float32)))
        if state.get("has_cooccurrence"):
            if model.wv is None:
                raise ValueError(f"{fname}: co-occurrence counts without a vocabulary (damaged file)")
            parts = [torch.from_numpy(np.array(_storage.need(tensors, f"cooccurrence.{name}", fname, (-1,))))
                     for name in ("rows", "cols", "values")]
            if not parts[0].numel() == parts[1].numel() == parts[2].numel():
                raise ValueError(f"{fname}: co-occurrence rows, columns and values differ in length (damaged file)")
            for ids in parts[:2]:
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(model.wv)):
                    raise ValueError(f"{fname}: a co-occurrence index is outside the vocabulary (damaged file)")
            model.cooccurrence = tuple(parts)
        model.corpus_count = int(state.get("corpus_count", 0))
        model.corpus_total_words = int(state.get("corpus_total_words", 0))
        model.epochs_trained = int(state.get("epochs_trained", 0))
        model.losses = [float(x) for x in state.get("losses", [])]
        model.training_stats = list(state.get("training_stats", []))
        model.cooccurrence_stats = dict(state.get("cooccurrence_stats", {}))
        return model


_SETTINGS = ("vector_size", "window", "min_count", "max_vocab_size", "x_max", "alpha", "learning_rate", "epochs",
             "workers", "seed", "symmetric", "distance_weighting", "chunk_words", "dense_bytes")


__all__ = ["GloVe"]
