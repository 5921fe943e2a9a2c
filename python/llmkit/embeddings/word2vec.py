"""word2vec (Mikolov et al. 2013): skip-gram / CBOW with negative sampling.

gensim 4.4's ``Word2Vec`` API and word2vec.c's training conventions, on a C++
trainer (``llmkit._C.word2vec``: threads without the GIL, Hogwild updates;
csrc/word2vec/). Python here owns what is cheap: reading and counting the
corpus, the vocabulary (``min_count``, ``max_vocab_size`` pruning as gensim),
word2vec.c's subsampling probabilities, gensim's cumulative noise table
(unigram^0.75), the learning-rate schedule across chunks, and the progress bar.

The corpus streams: sentences are read twice per run (vocabulary, then
training), encoded to int32 ids in chunks of about ``chunk_words`` words; up
to ``cache_words`` encoded words are kept in memory so later epochs skip the
tokenizing. A corpus may therefore be larger than memory.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

MAX_SENTENCE_WORDS = 10000  # gensim's MAX_WORDS_IN_BATCH: longer lines are cut into pieces
NOISE_DOMAIN = 2**31 - 1  # gensim's cum_table scale


# ------------------------------------------------------------------ corpus --


def _read_lines(path: Path) -> Iterator[list[str]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: line {number} is not valid UTF-8 ({err.reason} at byte {err.start}); "
                                 "word2vec reads UTF-8 text") from None
            words = line.split()
            for start in range(0, len(words), MAX_SENTENCE_WORDS):
                yield words[start:start + MAX_SENTENCE_WORDS]


class LineSentence:
    """Sentences of a text file or of every file in a folder (sorted by name):
    one sentence per line, tokens split on whitespace, lines longer than
    10000 words cut into pieces (gensim's ``LineSentence`` / ``PathLineSentences``)."""

    def __init__(self, source: str | os.PathLike):
        self.source = Path(source)
        if not self.source.exists():
            raise FileNotFoundError(f"corpus {self.source} does not exist")
        if self.source.is_dir():
            self.files = sorted(p for p in self.source.iterdir() if p.is_file())
            if not self.files:
                raise ValueError(f"corpus folder {self.source} has no files")
        else:
            self.files = [self.source]

    def __iter__(self) -> Iterator[list[str]]:
        for path in self.files:
            yield from _read_lines(path)


def _restartable(sentences) -> Iterable[list[str]]:
    if sentences is None:
        raise ValueError("give sentences (an iterable of token lists) or corpus_file")
    if iter(sentences) is sentences:
        raise TypeError("sentences must be restartable (a list, LineSentence, or an object whose __iter__ starts "
                        "over): it is read once for the vocabulary and once per epoch; a generator is consumed")
    return sentences


# -------------------------------------------------------------- vocabulary --


def count_words(sentences: Iterable[list[str]], max_vocab_size: int | None = None) -> tuple[Counter, int, int]:
    """(word counts, total words, sentences). Over max_vocab_size distinct
    words, the rarest are pruned with a rising threshold, as gensim's
    ``prune_vocab`` does (so counts of pruned words are lost, not approximated)."""
    counts: Counter = Counter()
    total = n_sentences = 0
    min_reduce = 1
    for sentence in sentences:
        if isinstance(sentence, str):
            raise TypeError("each sentence must be a list of tokens, got a str (split it first)")
        counts.update(sentence)
        total += len(sentence)
        n_sentences += 1
        if max_vocab_size is not None and len(counts) > max_vocab_size:
            for word in [w for w, c in counts.items() if c <= min_reduce]:
                del counts[word]
            min_reduce += 1
    return counts, total, n_sentences


def select_vocabulary(sentences, min_count: int, max_vocab_size: int | None = None):
    """(words, counts int64, total words, sentences) of the words with count >= min_count,
    most frequent first, ties in reverse first-seen order (gensim 4.4's order: it sorts
    with lexsort((-index, -count))); clear errors for an empty corpus or one with no
    word frequent enough. Shared by Word2Vec and GloVe."""
    counts, total, n_sentences = count_words(sentences, max_vocab_size)
    if total == 0:
        raise ValueError("the corpus is empty (no tokens)")
    kept = [(w, c) for w, c in counts.items() if c >= min_count]  # a Counter keeps first-seen order
    if not kept:
        most = f", the most frequent {counts.most_common(1)[0][1]} times" if counts else ""
        pruned = f" after pruning to max_vocab_size={max_vocab_size}" if max_vocab_size is not None else ""
        raise ValueError(f"no word occurs at least min_count={min_count} times "
                         f"({len(counts)} distinct words{pruned}{most})")
    order = sorted(range(len(kept)), key=lambda i: (-kept[i][1], -i))
    kept = [kept[i] for i in order]
    return [w for w, _ in kept], np.array([c for _, c in kept], dtype=np.int64), total, n_sentences


def encode_chunks(sentences, key_to_index: dict, chunk_words: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids int32, offsets int64) of about chunk_words words each, the trainers' input;
    out-of-vocabulary words dropped (sentence s is ids[offsets[s]:offsets[s + 1]])."""
    ids: list[int] = []
    offsets = [0]
    for sentence in sentences:
        ids.extend(i for i in (key_to_index.get(w) for w in sentence) if i is not None)
        offsets.append(len(ids))
        if len(ids) >= chunk_words:
            yield torch.tensor(ids, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int64)
            ids, offsets = [], [0]
    if ids:
        yield torch.tensor(ids, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int64)


def keep_probabilities(counts: np.ndarray, sample: float) -> np.ndarray:
    """word2vec.c's subsampling: keep a word of count c with probability
    (sqrt(c / (sample N)) + 1) (sample N) / c, capped at 1 (N: retained words)."""
    if sample <= 0:
        return np.ones(len(counts))
    threshold = sample * counts.sum()
    c = counts.astype(np.float64)
    return np.minimum(1.0, (np.sqrt(c / threshold) + 1.0) * threshold / c)


def keep_thresholds(probabilities: np.ndarray) -> torch.Tensor:
    """The trainer's form: keep when a 32-bit draw < p * 2^32 (0xFFFFFFFF: always), as int32 bits."""
    scaled = np.round(probabilities * 2.0**32)
    thresholds = np.where(probabilities >= 1.0, 2**32 - 1, np.minimum(scaled, 2**32 - 1)).astype(np.uint32)
    return torch.from_numpy(thresholds.view(np.int32).copy())


def noise_table(counts: np.ndarray, exponent: float = 0.75) -> torch.Tensor:
    """gensim's cum_table: cumulative count^exponent scaled to 2^31 - 1 (int32)."""
    weights = counts.astype(np.float64) ** exponent
    cumulative = np.round(np.cumsum(weights) / weights.sum() * NOISE_DOMAIN)
    return torch.from_numpy(cumulative.astype(np.int64).astype(np.int32))


# ------------------------------------------------------------------- model --


class Word2Vec:
    """Skip-gram (``sg=1``) or CBOW (``sg=0``) with negative sampling; gensim's parameters.

    ``Word2Vec(sentences=..., vector_size=100, window=5, min_count=5, sample=1e-3,
    negative=5, alpha=0.025, min_alpha=1e-4, epochs=5, workers=..., sg=1, seed=1)``
    builds the vocabulary and trains at once when a corpus is given (as gensim);
    the vectors are in ``.wv`` (:class:`~llmkit.embeddings.KeyedVectors`).
    Training is deterministic with ``workers=1`` and a seed.
    """

    def __init__(self, sentences=None, corpus_file=None, vector_size: int = 100, window: int = 5,
                 min_count: int = 5, max_vocab_size: int | None = None, sample: float = 1e-3, negative: int = 5,
                 alpha: float = 0.025, min_alpha: float = 1e-4, epochs: int = 5, workers: int | None = None,
                 sg: int = 1, cbow_mean: int = 1, seed: int = 1, ns_exponent: float = 0.75, device: str = "cpu",
                 compute_loss: bool = True, progress: bool = True, shared_negatives: bool = True,
                 chunk_words: int = 1_000_000,
                 cache_words: int = 200_000_000):
        _check_positive_int("vector_size", vector_size)
        _check_positive_int("window", window)
        _check_positive_int("epochs", epochs)
        _check_positive_int("min_count", min_count)
        if isinstance(negative, bool) or not isinstance(negative, int) or negative < 0:
            raise ValueError(f"negative must be an int >= 0, got {negative!r}")
        if negative == 0:
            raise ValueError("negative=0 means hierarchical softmax, which llmkit does not implement; use negative >= 1")
        if not (alpha > 0 and min_alpha >= 0 and min_alpha <= alpha):
            raise ValueError(f"need alpha > 0 and 0 <= min_alpha <= alpha, got alpha={alpha}, min_alpha={min_alpha}")
        if sample < 0:
            raise ValueError(f"sample must be >= 0, got {sample}")
        if max_vocab_size is not None:
            _check_positive_int("max_vocab_size", max_vocab_size)
        if sg not in (0, 1):
            raise ValueError(f"sg must be 0 (CBOW) or 1 (skip-gram), got {sg!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}") from None
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if self.device.type == "cuda":
            _check_cuda_trainer(self.device)
            if sg and not shared_negatives:
                raise ValueError("the CUDA trainer always shares one draw of negatives per window "
                                 "(shared_negatives=True); the per-pair loop is CPU only")
        if sentences is not None and corpus_file is not None:
            raise ValueError("give sentences or corpus_file, not both")
        self.vector_size, self.window, self.min_count = vector_size, window, min_count
        self.max_vocab_size, self.sample, self.negative = max_vocab_size, sample, negative
        self.alpha, self.min_alpha, self.epochs = alpha, min_alpha, epochs
        self.workers = workers if workers is not None else max(1, torch.get_num_threads())
        _check_positive_int("workers", self.workers)
        self.sg, self.cbow_mean, self.seed, self.ns_exponent = sg, cbow_mean, seed, ns_exponent
        self.compute_loss, self.progress = compute_loss, progress
        # Skip-gram only: one draw of negatives per window, the window's updates as
        # small matrix products (pWord2Vec's HogBatch); see csrc/word2vec/sgns_cpu.cpp.
        # The default: on the shipped corpus (5 epochs, 2 workers) it trained 1.7x
        # faster than the per-pair loop with equal or better analogy / wordsim scores.
        self.shared_negatives = bool(shared_negatives)
        self.chunk_words, self.cache_words = chunk_words, cache_words
        self.wv = None
        self.syn1neg: torch.Tensor | None = None  # on the CPU (a CUDA run trains a copy and writes it back)
        self.corpus_total_words = 0
        self.running_training_loss = 0.0
        self.training_stats: list[dict] = []
        if corpus_file is not None:
            sentences = LineSentence(corpus_file)
        if sentences is not None:
            self.build_vocab(sentences)
            self.train(sentences)

    # ----------------------------------------------------------- vocabulary --

    def build_vocab(self, sentences) -> "Word2Vec":
        """Count the corpus, keep words with count >= min_count (most frequent first,
        ties in reverse first-seen order, as gensim), and initialise the weights."""
        from .keyed_vectors import KeyedVectors

        sentences = _restartable(sentences)
        words, self.counts, total, n_sentences = select_vocabulary(sentences, self.min_count, self.max_vocab_size)
        self.key_to_index = {w: i for i, w in enumerate(words)}
        self.corpus_total_words = total
        self.corpus_count = n_sentences
        self.retained_words = int(self.counts.sum())
        self._keep = keep_thresholds(keep_probabilities(self.counts, self.sample))
        self._noise = noise_table(self.counts, self.ns_exponent)
        # word2vec.c's init: syn0 uniform in [-0.5, 0.5) / dim, syn1neg zeros.
        gen = torch.Generator().manual_seed(self.seed)
        syn0 = (torch.rand(len(words), self.vector_size, generator=gen) - 0.5) / self.vector_size
        self.syn1neg = torch.zeros(len(words), self.vector_size)
        self.wv = KeyedVectors(self.vector_size)
        self.wv.add_vectors(words, syn0.numpy(), extras={"count": self.counts})
        # Taken after add_vectors (which replaces the array): training updates .wv in place.
        self._syn0 = torch.from_numpy(self.wv.vectors)
        # Encoded chunks of the corpus object `_cache_source`, reused by later epochs and train() calls on it.
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._cache_source = None
        return self

    # --------------------------------------------------------------- corpus --

    def _encoded_chunks(self, sentences) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return encode_chunks(sentences, self.key_to_index, self.chunk_words)

    def _epoch_chunks(self, sentences) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._cache is not None and self._cache_source is sentences:
            yield from self._cache
            return
        self._cache, self._cache_source = None, sentences  # another corpus: encode it afresh
        cache: list | None = [] if self.retained_words <= self.cache_words else None
        for chunk in self._encoded_chunks(sentences):
            if cache is not None:
                cache.append(chunk)
            yield chunk
        if cache is not None:
            self._cache = cache

    # ------------------------------------------------------------- training --

    def train(self, sentences=None, corpus_file=None, epochs: int | None = None) -> "Word2Vec":
        """Train for `epochs` (default the constructor's) over the corpus the vocabulary came from."""
        from llmkit import _C
        from tqdm import tqdm

        if self.wv is None:
            raise RuntimeError("build_vocab() first (or pass the corpus to Word2Vec(...))")
        if corpus_file is not None:
            sentences = LineSentence(corpus_file)
        sentences = _restartable(sentences)
        epochs = self.epochs if epochs is None else epochs
        _check_positive_int("epochs", epochs)
        total = epochs * self.retained_words
        on_gpu = self.device.type == "cuda"
        if on_gpu:  # the weights, thresholds and noise table live on the GPU for the run
            syn0, syn1neg = self._syn0.to(self.device), self.syn1neg.to(self.device)
            keep, noise = self._keep.to(self.device), self._noise.to(self.device)
            device_chunks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        else:
            syn0, syn1neg, keep, noise = self._syn0, self.syn1neg, self._keep, self._noise
        done = 0
        self.running_training_loss = 0.0
        examples = trained = 0
        start = time.perf_counter()
        bar = tqdm(total=total, unit="word", unit_scale=True, desc="word2vec", disable=not self.progress,
                   dynamic_ncols=True)
        try:
            with bar:
                for epoch in range(epochs):
                    for number, (ids, offsets) in enumerate(self._epoch_chunks(sentences)):
                        n = ids.numel()
                        a0 = self.alpha - (self.alpha - self.min_alpha) * min(1.0, done / total)
                        a1 = self.alpha - (self.alpha - self.min_alpha) * min(1.0, (done + n) / total)
                        seed = (self.seed * 1_000_003 + epoch * 7919 + done) % 2**63
                        if on_gpu:
                            # Encoded chunks stay on the GPU across epochs when they fit the cache budget.
                            if number not in device_chunks:
                                moved = (ids.to(self.device), offsets.to(self.device))
                                if self.retained_words <= self.cache_words:
                                    device_chunks[number] = moved
                            else:
                                moved = device_chunks[number]
                            stats = _C.word2vec.train_chunk_cuda(
                                syn0, syn1neg, moved[0], moved[1], keep, noise, self.window, self.negative, a0, a1, seed,
                                bool(self.sg), bool(self.cbow_mean), self.compute_loss)
                        else:
                            stats = _C.word2vec.train_chunk(
                                syn0, syn1neg, ids, offsets, keep, noise, self.window, self.negative, a0, a1,
                                self.workers, seed, bool(self.sg), bool(self.cbow_mean), self.compute_loss,
                                self.shared_negatives)
                        done += n
                        examples += stats["examples"]
                        trained += stats["trained_words"]
                        self.running_training_loss += stats["loss"]
                        bar.update(n)
                        elapsed = time.perf_counter() - start
                        postfix = {"words/s": f"{done / max(elapsed, 1e-9):,.0f}"}
                        if self.compute_loss and examples:
                            postfix["loss"] = f"{self.running_training_loss / examples:.3f}"
                        bar.set_postfix(postfix)
        finally:  # also on an interrupt or error: keep what the GPU trained (.wv and syn1neg are the CPU copies)
            if on_gpu:
                self._syn0.copy_(syn0.cpu())
                self.syn1neg.copy_(syn1neg.cpu())
        elapsed = time.perf_counter() - start
        self.training_stats.append({"epochs": epochs, "words": done, "trained_words": trained,
                                    "examples": examples, "seconds": elapsed,
                                    "words_per_second": done / max(elapsed, 1e-9),
                                    "loss_per_example": self.running_training_loss / max(examples, 1),
                                    "device": str(self.device)})
        if hasattr(self.wv, "fill_norms"):
            self.wv.fill_norms(force=True)  # the vectors changed in place: recompute cached norms
        return self

    def get_latest_training_loss(self) -> float:
        """Sum of the negative-sampling losses of the last train() (gensim's name)."""
        return self.running_training_loss


def _check_cuda_trainer(device: torch.device) -> None:
    from llmkit import _C

    if not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: torch sees no CUDA device here")
    if not hasattr(_C.word2vec, "train_chunk_cuda"):
        raise ValueError(f"device={str(device)!r}: this llmkit build has no CUDA kernels (rebuild with nvcc and a "
                         "CUDA build of torch)")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


__all__ = ["Word2Vec", "LineSentence", "count_words", "select_vocabulary", "encode_chunks", "keep_probabilities",
           "noise_table", "keep_thresholds"]
