"""word2vec (Mikolov et al. 2013): skip-gram / CBOW with negative sampling.

gensim 4.4's ``Word2Vec`` API -- the same parameters, in the same order, with
the same defaults (CBOW, ``sg=0``; ``workers=3``; ``compute_loss=False``), so a
gensim call site runs unchanged and trains the same kind of model -- on
word2vec.c's training conventions and a C++ trainer (``llmkit._C.word2vec``:
threads without the GIL, Hogwild updates; csrc/word2vec/). Python here owns
what is cheap: reading and counting the corpus, the vocabulary (gensim's
``min_count``, ``max_vocab_size`` pruning, ``max_final_vocab``, ``trim_rule``,
``sorted_vocab``), the subsampling probabilities, gensim's cumulative noise
table (unigram^0.75), the learning-rate schedule across chunks, callbacks and
the progress bar.

Persistence: ``save`` / ``load`` write and read one safetensors file (arrays)
with JSON metadata (vocabulary order, counts, every hyperparameter), so that
``train()`` continues after ``load()`` as it does in gensim; never a pickle.
``to_gensim()`` / ``from_gensim()`` convert to and from a gensim ``Word2Vec``.

What gensim offers and llmkit does not train -- hierarchical softmax
(``hs=1``), ``null_word``, fixed windows (``shrink_windows=False``), vocabulary
updates (``build_vocab(update=True)``) -- raises NotImplementedError naming the
option. ``hashfxn``, ``batch_words``, ``queue_factor``, ``report_delay`` and
``word_count`` are accepted and have no effect here (gensim 4.4's training does
not use ``hashfxn`` either; the others tune its job queue and logging).

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
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch

from llmkit.utils import get_logger, progress_bar

from . import _storage

logger = get_logger(__name__)

MAX_SENTENCE_WORDS = 10000  # gensim's MAX_WORDS_IN_BATCH: longer lines are cut into pieces
MAX_WORDS_IN_BATCH = MAX_SENTENCE_WORDS  # gensim's name (batch_words' default)
NOISE_DOMAIN = 2**31 - 1  # gensim's cum_table scale
# gensim.utils' trim_rule verdicts (same values, so rules written for gensim work unchanged)
RULE_DEFAULT, RULE_DISCARD, RULE_KEEP = 0, 1, 2


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


def _restartable(sentences, passes: int = 2) -> Iterable[list[str]]:
    """`sentences` checked to be readable `passes` times (a one-shot iterator is read once)."""
    if sentences is None:
        raise ValueError("give sentences (an iterable of token lists) or corpus_file")
    if isinstance(sentences, (str, bytes, os.PathLike)):
        raise TypeError(f"sentences must be an iterable of token lists, got {type(sentences).__name__} "
                        f"{str(sentences)[:60]!r} (a path goes to corpus_file=)")
    try:
        one_shot = iter(sentences) is sentences
    except TypeError:
        raise TypeError(f"sentences must be an iterable of token lists, got {type(sentences).__name__}") from None
    if one_shot and passes > 1:
        raise TypeError(f"sentences must be restartable (a list, LineSentence, or an object whose __iter__ starts "
                        f"over): it is read {passes} times (vocabulary and/or epochs); a generator is consumed")
    return sentences


# -------------------------------------------------------------- vocabulary --


def keep_vocab_item(word, count: int, min_count: int, trim_rule=None) -> bool:
    """gensim's ``utils.keep_vocab_item``: ``count >= min_count`` unless `trim_rule(word, count,
    min_count)` says RULE_KEEP (2) or RULE_DISCARD (1)."""
    if trim_rule is None:
        return count >= min_count
    verdict = trim_rule(word, count, min_count)
    if verdict == RULE_KEEP:
        return True
    if verdict == RULE_DISCARD:
        return False
    return count >= min_count


def count_words(sentences: Iterable[list[str]], max_vocab_size: int | None = None,
                trim_rule=None) -> tuple[Counter, int, int]:
    """(word counts, total words, sentences). Over max_vocab_size distinct words, words
    are pruned with a rising threshold exactly as gensim 4.4's ``prune_vocab``: the n-th
    pruning drops the words counted fewer than n times (so the first drops nothing) that
    `trim_rule` does not keep; the counts of pruned words are lost, not approximated."""
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
            for word in [w for w, c in counts.items() if not keep_vocab_item(w, c, min_reduce, trim_rule)]:
                del counts[word]
            min_reduce += 1
    return counts, total, n_sentences


class Vocabulary(NamedTuple):
    """What :func:`select_vocabulary` keeps of a corpus."""

    words: list[str]
    counts: np.ndarray  # int64, one per word
    total_words: int  # raw words of the corpus (every token, kept or not)
    sentences: int
    effective_min_count: int  # min_count, raised by max_final_vocab (gensim's name)
    raw_counts: Counter  # every word's count before min_count (gensim's raw_vocab)


def select_vocabulary(sentences, min_count: int, max_vocab_size: int | None = None, *, trim_rule=None,
                      max_final_vocab: int | None = None, sorted_vocab: bool = True) -> Vocabulary:
    """The words gensim 4.4's ``build_vocab`` keeps, in its order. Shared by Word2Vec and GloVe.

    Words with count >= the effective min_count (`trim_rule` may keep or drop others), where
    `max_final_vocab` raises min_count to one more than the count of the (max_final_vocab+1)-th
    most frequent word, as gensim (ties can leave fewer words than max_final_vocab). With
    `sorted_vocab`, most frequent first, ties in reverse first-seen order (gensim sorts with
    lexsort((-index, -count))); without, in first-seen order. Clear errors for an empty corpus
    or one with no word frequent enough."""
    counts, total, n_sentences = count_words(sentences, max_vocab_size, trim_rule)
    if total == 0:
        raise ValueError("the corpus is empty (no tokens)")
    effective = min_count
    if max_final_vocab is not None and max_final_vocab < len(counts):
        by_count = sorted(counts.values(), reverse=True)
        effective = max(min_count, by_count[max_final_vocab] + 1)
    kept = [(w, c) for w, c in counts.items() if keep_vocab_item(w, c, effective, trim_rule)]  # first-seen order
    if not kept:
        most = f", the most frequent {counts.most_common(1)[0][1]} times" if counts else ""
        pruned = f" after pruning to max_vocab_size={max_vocab_size}" if max_vocab_size is not None else ""
        final = f" (max_final_vocab={max_final_vocab} raised it from {min_count})" if effective != min_count else ""
        raise ValueError(f"no word occurs at least min_count={effective} times{final} "
                         f"({len(counts)} distinct words{pruned}{most})")
    if sorted_vocab:
        order = sorted(range(len(kept)), key=lambda i: (-kept[i][1], -i))
        kept = [kept[i] for i in order]
    return Vocabulary([w for w, _ in kept], np.array([c for _, c in kept], dtype=np.int64), total, n_sentences,
                      effective, counts)


def encode_chunks(sentences, key_to_index: dict, chunk_words: int,
                  with_raw: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """(ids int32, offsets int64) of about chunk_words words each, the trainers' input;
    out-of-vocabulary words dropped (sentence s is ids[offsets[s]:offsets[s + 1]]).
    `with_raw` adds a third item: the chunk's raw word count (out-of-vocabulary words included)."""
    ids: list[int] = []
    offsets = [0]
    raw = 0
    for sentence in sentences:
        if isinstance(sentence, str):
            raise TypeError("each sentence must be a list of tokens, got a str (split it first)")
        ids.extend(i for i in (key_to_index.get(w) for w in sentence) if i is not None)
        offsets.append(len(ids))
        raw += len(sentence)
        if len(ids) >= chunk_words:
            chunk = torch.tensor(ids, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int64)
            yield (*chunk, raw) if with_raw else chunk
            ids, offsets, raw = [], [0], 0
    if ids or (with_raw and raw):
        chunk = torch.tensor(ids, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int64)
        yield (*chunk, raw) if with_raw else chunk


def keep_probabilities(counts: np.ndarray, sample: float) -> np.ndarray:
    """word2vec.c's subsampling: keep a word of count c with probability
    (sqrt(c / t) + 1) t / c, capped at 1, where t = sample N (N: retained words); gensim's
    shorthand for sample >= 1: t = int(sample (3 + sqrt 5) / 2), words counted more than
    about `sample` times are downsampled."""
    if sample <= 0:
        return np.ones(len(counts))
    threshold = sample * counts.sum() if sample < 1.0 else float(int(sample * (3 + math.sqrt(5)) / 2))
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

# gensim's constructor settings that a saved model keeps (all but the corpus, trim_rule,
# callbacks -- which gensim does not keep either -- and hashfxn, which gensim 4.4 does not use)
GENSIM_SETTINGS = ("vector_size", "alpha", "window", "min_count", "max_vocab_size", "sample", "seed", "workers",
                   "min_alpha", "sg", "hs", "negative", "ns_exponent", "cbow_mean", "epochs", "null_word",
                   "sorted_vocab", "batch_words", "compute_loss", "comment", "max_final_vocab", "shrink_windows")
LLMKIT_SETTINGS = ("shared_negatives", "chunk_words", "cache_words")


class Word2Vec:
    """Word2vec with negative sampling: CBOW (``sg=0``, gensim's default) or skip-gram (``sg=1``).

    ``Word2Vec(sentences=None, corpus_file=None, vector_size=100, alpha=0.025, window=5,
    min_count=5, max_vocab_size=None, sample=1e-3, seed=1, workers=3, min_alpha=0.0001, sg=0,
    hs=0, negative=5, ns_exponent=0.75, cbow_mean=1, hashfxn=hash, epochs=5, null_word=0,
    trim_rule=None, sorted_vocab=1, batch_words=10000, compute_loss=False, callbacks=(),
    comment=None, max_final_vocab=None, shrink_windows=True)`` is gensim 4.4's signature,
    argument for argument. Given a corpus it builds the vocabulary and trains at once (as
    gensim); the vectors are in ``.wv`` (:class:`~llmkit.embeddings.KeyedVectors`), the output
    weights in ``.syn1neg``. Training is deterministic with ``workers=1`` and a seed.

    llmkit's own options are keyword-only: ``device`` ("cpu" or "cuda": the CUDA trainer),
    ``progress`` (the progress bar), ``shared_negatives`` (skip-gram: one draw of negatives per
    window, pWord2Vec's HogBatch -- on the shipped corpus 1.7x faster than word2vec.c's draws per
    pair at equal quality; False gives the per-pair loop), ``chunk_words`` (words per trainer
    call) and ``cache_words`` (encoded words kept in memory for later epochs).

    Raises NotImplementedError for gensim options llmkit does not train (``hs=1``,
    ``null_word=1``, ``shrink_windows=False``); ValueError / TypeError for bad values.
    """

    def __init__(self, sentences=None, corpus_file=None, vector_size=100, alpha=0.025, window=5, min_count=5,
                 max_vocab_size=None, sample=1e-3, seed=1, workers=3, min_alpha=0.0001,
                 sg=0, hs=0, negative=5, ns_exponent=0.75, cbow_mean=1, hashfxn=hash, epochs=5, null_word=0,
                 trim_rule=None, sorted_vocab=1, batch_words=MAX_WORDS_IN_BATCH, compute_loss=False, callbacks=(),
                 comment=None, max_final_vocab=None, shrink_windows=True, *, device="cpu", progress=True,
                 shared_negatives=True, chunk_words=1_000_000, cache_words=200_000_000):
        _check_positive_int("vector_size", vector_size)
        _check_positive_int("window", window)
        _check_positive_int("epochs", epochs)
        _check_int("min_count", min_count, 0)
        _check_positive_int("workers", workers)
        _check_positive_int("batch_words", batch_words)
        _check_positive_int("chunk_words", chunk_words)
        _check_int("cache_words", cache_words, 0)
        _check_int("seed", seed, 0)
        for name, value in (("max_vocab_size", max_vocab_size), ("max_final_vocab", max_final_vocab)):
            if value is not None:
                _check_positive_int(name, value)
        _check_flag("sg", sg, "0 (CBOW) or 1 (skip-gram)")
        _check_flag("hs", hs, "0 (negative sampling) or 1 (hierarchical softmax)")
        _check_flag("cbow_mean", cbow_mean, "0 (sum of the context vectors) or 1 (their mean)")
        _check_flag("sorted_vocab", sorted_vocab, "0 (first-seen order) or 1 (most frequent first)")
        _check_flag("null_word", null_word, "0 or 1")
        if hs:
            raise NotImplementedError("hs=1 (hierarchical softmax) is not implemented in llmkit; train with negative "
                                      "sampling: hs=0 (the default) and negative >= 1 (default 5)")
        _check_int("negative", negative, 0)
        if negative == 0:
            raise ValueError("negative=0 with hs=0 trains nothing (gensim refuses it too); llmkit trains negative "
                             "sampling: use negative >= 1 (default 5)")
        if null_word:
            raise NotImplementedError("null_word=1 (a padding word for concatenated contexts, Doc2Vec's dm_concat) "
                                      "is not implemented in llmkit; use null_word=0 (the default)")
        if not shrink_windows:
            raise NotImplementedError("shrink_windows=False (every context uses the full window) is not implemented "
                                      "in llmkit's trainers, which shrink windows at random as word2vec.c does; use "
                                      "shrink_windows=True (the default)")
        _check_alphas(alpha, min_alpha)
        _check_number("sample", sample, minimum=0.0)
        _check_number("ns_exponent", ns_exponent)
        if not callable(hashfxn):
            raise TypeError(f"hashfxn must be a function (gensim's default: hash), got {hashfxn!r}")
        if trim_rule is not None and not callable(trim_rule):
            raise TypeError(f"trim_rule must be None or a function (word, count, min_count) -> RULE_DISCARD / "
                            f"RULE_KEEP / RULE_DEFAULT, got {trim_rule!r}")
        callbacks = _check_callbacks(callbacks)
        if comment is not None and not isinstance(comment, str):
            raise TypeError(f"comment must be None or a str, got {type(comment).__name__}")
        self.device = _check_device(device)
        if self.device.type == "cuda" and sg and not shared_negatives:
            raise ValueError("the CUDA trainer always shares one draw of negatives per window "
                             "(shared_negatives=True); the per-pair loop is CPU only")
        if sentences is not None and corpus_file is not None:
            raise ValueError("give sentences or corpus_file, not both")

        self.vector_size, self.alpha, self.window, self.min_count = vector_size, float(alpha), window, min_count
        self.max_vocab_size, self.sample, self.seed, self.workers = max_vocab_size, float(sample), seed, workers
        self.min_alpha, self.sg, self.hs, self.negative = float(min_alpha), int(sg), int(hs), negative
        self.ns_exponent, self.cbow_mean, self.hashfxn = float(ns_exponent), int(cbow_mean), hashfxn
        self.epochs = epochs
        self.null_word, self.sorted_vocab, self.batch_words = int(null_word), int(sorted_vocab), batch_words
        self.compute_loss, self.comment, self.max_final_vocab = bool(compute_loss), comment, max_final_vocab
        self.shrink_windows = bool(shrink_windows)
        self.progress = progress
        self.shared_negatives = bool(shared_negatives)
        self.chunk_words, self.cache_words = chunk_words, cache_words
        # vocabulary and training state (build_vocab / train / load fill them)
        self.wv = None
        self.syn1neg: torch.Tensor | None = None  # on the CPU (a CUDA run trains a copy and writes it back)
        self.key_to_index: dict = {}
        self.counts: np.ndarray | None = None
        self.raw_vocab: Counter | None = None
        self.corpus_count = self.corpus_total_words = self.retained_words = 0
        self.effective_min_count = min_count
        self.running_training_loss = 0.0
        self.min_alpha_yet_reached = self.alpha
        self.train_count = 0
        self.training_stats: list[dict] = []
        self._cache: list[tuple[torch.Tensor, torch.Tensor, int]] | None = None
        self._cache_source = None
        if corpus_file is not None:
            sentences = LineSentence(corpus_file)
        if sentences is not None:
            sentences = _restartable(sentences, passes=epochs + 1)
            self.build_vocab(sentences, trim_rule=trim_rule)
            self.train(sentences, total_examples=self.corpus_count, total_words=self.corpus_total_words,
                       epochs=self.epochs, start_alpha=self.alpha, end_alpha=self.min_alpha,
                       compute_loss=self.compute_loss, callbacks=callbacks)
        elif trim_rule is not None or callbacks:
            logger.warning("trim_rule and callbacks are used only when the constructor trains (a corpus is given); "
                           "pass them to build_vocab() / train() (gensim does not keep them either)")

    def __str__(self) -> str:
        return f"{type(self).__name__}<vocab={len(self.key_to_index)}, vector_size={self.vector_size}, " \
               f"alpha={self.alpha:g}>"

    __repr__ = __str__

    # ----------------------------------------------------------- vocabulary --

    def _corpus(self, corpus_iterable, corpus_file, passes: int):
        if corpus_iterable is not None and corpus_file is not None:
            raise ValueError("give corpus_iterable (sentences) or corpus_file, not both")
        if corpus_file is not None:
            return LineSentence(corpus_file)
        return _restartable(corpus_iterable, passes=passes)

    def build_vocab(self, corpus_iterable=None, corpus_file=None, update=False, progress_per=10000,
                    keep_raw_vocab=False, trim_rule=None, **kwargs) -> "Word2Vec":
        """Count the corpus and keep its vocabulary as gensim 4.4 does (``min_count``,
        ``max_vocab_size`` pruning, ``max_final_vocab``, `trim_rule`, ``sorted_vocab``: most frequent
        first, ties in reverse first-seen order), then initialise the weights as word2vec.c
        (input vectors uniform in [-0.5, 0.5) / vector_size, output weights zero).

        gensim's signature; `progress_per` is accepted (gensim's log cadence). `keep_raw_vocab`
        keeps every word's count in ``.raw_vocab``. ``update=True`` (growing a trained
        vocabulary) raises NotImplementedError. Returns the model (gensim: None)."""
        if kwargs:
            raise TypeError(f"build_vocab() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
        if update:
            raise NotImplementedError("build_vocab(update=True) (adding words to a trained vocabulary) is not "
                                      "implemented in llmkit; build the vocabulary once, from the whole corpus")
        if trim_rule is not None and not callable(trim_rule):
            raise TypeError(f"trim_rule must be None or a function (word, count, min_count), got {trim_rule!r}")
        sentences = self._corpus(corpus_iterable, corpus_file, passes=1)
        vocab = select_vocabulary(sentences, self.min_count, self.max_vocab_size, trim_rule=trim_rule,
                                  max_final_vocab=self.max_final_vocab, sorted_vocab=bool(self.sorted_vocab))
        self.corpus_count, self.corpus_total_words = vocab.sentences, vocab.total_words
        self.effective_min_count = vocab.effective_min_count
        self.raw_vocab = vocab.raw_counts if keep_raw_vocab else None
        gen = torch.Generator().manual_seed(self.seed)
        syn0 = (torch.rand(len(vocab.words), self.vector_size, generator=gen) - 0.5) / self.vector_size
        self._set_vocabulary(vocab.words, vocab.counts, syn0.numpy(), np.zeros_like(syn0.numpy()))
        logger.info("word2vec vocabulary: %d words kept of %d distinct (effective min_count %d), %d of %d raw words "
                    "in %d sentences", len(vocab.words), len(vocab.raw_counts), self.effective_min_count,
                    self.retained_words, self.corpus_total_words, self.corpus_count)
        return self

    def _set_vocabulary(self, words: list, counts, syn0, syn1neg) -> None:
        """Install a vocabulary (most frequent first or not: the order is kept), its counts and both
        weight matrices (copied), and the tables derived from them."""
        from .keyed_vectors import KeyedVectors

        counts = np.asarray(counts, dtype=np.int64)
        if len(words) == 0:
            raise ValueError("the vocabulary is empty")
        if counts.shape != (len(words),) or (counts <= 0).any():
            raise ValueError(f"need one positive count per word ({len(words)} words), got counts of shape "
                             f"{counts.shape} with minimum {counts.min() if counts.size else None}")
        for name, matrix in (("vectors", syn0), ("syn1neg", syn1neg)):
            if np.shape(matrix) != (len(words), self.vector_size):
                raise ValueError(f"{name} must have shape ({len(words)}, {self.vector_size}), got {np.shape(matrix)}")
        self.counts = counts
        self.key_to_index = {w: i for i, w in enumerate(words)}
        self.retained_words = int(counts.sum())
        self._keep = keep_thresholds(keep_probabilities(counts, self.sample))
        self._noise = noise_table(counts, self.ns_exponent)
        self.wv = KeyedVectors(self.vector_size)
        self.wv.add_vectors(list(words), np.asarray(syn0, dtype=np.float32), extras={"count": counts})
        # Taken after add_vectors (which replaces the array): training updates .wv in place.
        self._syn0 = torch.from_numpy(self.wv.vectors)
        self.syn1neg = torch.from_numpy(np.array(syn1neg, dtype=np.float32, copy=True))
        # Encoded chunks of the corpus object `_cache_source`, reused by later epochs and train() calls on it.
        self._cache, self._cache_source = None, None

    # --------------------------------------------------------------- corpus --

    def _epoch_chunks(self, sentences) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        if self._cache is not None and self._cache_source is sentences:
            yield from self._cache
            return
        self._cache, self._cache_source = None, sentences  # another corpus: encode it afresh
        cache: list | None = [] if self.retained_words <= self.cache_words else None
        for chunk in encode_chunks(sentences, self.key_to_index, self.chunk_words, with_raw=True):
            if cache is not None:
                cache.append(chunk)
            yield chunk
        if cache is not None:
            self._cache = cache

    def _epoch_words(self, sentences, total_examples, total_words) -> int:
        """In-vocabulary words an epoch of `sentences` holds, for the learning-rate schedule: exact
        for a corpus already encoded, else estimated from gensim's total_words / total_examples
        (which a gensim call site passes), else the vocabulary corpus's."""
        if self._cache is not None and self._cache_source is sentences:
            return max(1, sum(ids.numel() for ids, _, _ in self._cache))
        if total_words is not None and self.corpus_total_words:
            return max(1, round(total_words * self.retained_words / self.corpus_total_words))
        if total_examples is not None and self.corpus_count:
            return max(1, round(total_examples * self.retained_words / self.corpus_count))
        return max(1, self.retained_words)

    # ------------------------------------------------------------- training --

    def train(self, corpus_iterable=None, corpus_file=None, total_examples=None, total_words=None, epochs=None,
              start_alpha=None, end_alpha=None, word_count=0, queue_factor=2, report_delay=1.0,
              compute_loss=False, callbacks=(), **kwargs) -> tuple[int, int]:
        """Train `epochs` epochs over a corpus (gensim 4.4's signature and semantics).

        The learning rate falls linearly from `start_alpha` (default ``alpha``) to `end_alpha`
        (default ``min_alpha``) over the call; as in gensim both, and `epochs`, become the model's
        settings. `total_words` (raw words) or `total_examples` (sentences) of the corpus set the
        schedule when it is not the vocabulary corpus (gensim requires one of them; llmkit
        assumes the vocabulary corpus's size when both are missing). `compute_loss` (gensim's
        default False) sums the loss into :meth:`get_latest_training_loss`. `callbacks` get
        ``on_train_begin``, ``on_epoch_begin``, ``on_epoch_end`` and ``on_train_end`` with the model
        (gensim's ``CallbackAny2Vec``; the vectors are current at each call). `word_count`,
        `queue_factor` and `report_delay` are accepted and have no effect (gensim's job queue and
        logging). Returns ``(trained words, raw words)``: words after subsampling, and every token
        read, over all epochs (gensim's pair)."""
        from llmkit import _C

        if kwargs:
            raise TypeError(f"train() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
        if self.wv is None:
            raise RuntimeError("build_vocab() first (or pass the corpus to Word2Vec(...), or load a saved model)")
        if epochs is not None:
            _check_positive_int("epochs", epochs)
        for name, value in (("total_examples", total_examples), ("total_words", total_words)):
            if value is not None:
                _check_int(name, value, 0)
        alpha = float(start_alpha) if start_alpha else self.alpha  # gensim: `start_alpha or self.alpha`
        min_alpha = float(end_alpha) if end_alpha else self.min_alpha
        _check_alphas(alpha, min_alpha)
        callbacks = _check_callbacks(callbacks)
        sentences = self._corpus(corpus_iterable, corpus_file, passes=epochs or self.epochs)
        self.alpha, self.min_alpha = alpha, min_alpha
        if epochs is not None:
            self.epochs = epochs
        epochs = self.epochs
        self.compute_loss = bool(compute_loss)
        total = epochs * self._epoch_words(sentences, total_examples, total_words)
        on_gpu = self.device.type == "cuda"
        if on_gpu:  # the weights, thresholds and noise table live on the GPU for the run
            syn0, syn1neg = self._syn0.to(self.device), self.syn1neg.to(self.device)
            keep, noise = self._keep.to(self.device), self._noise.to(self.device)
            device_chunks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        else:
            syn0, syn1neg, keep, noise = self._syn0, self.syn1neg, self._keep, self._noise

        def write_back():  # .wv and syn1neg are the CPU copies of what the GPU trains
            if on_gpu:
                self._syn0.copy_(syn0.cpu())
                self.syn1neg.copy_(syn1neg.cpu())

        done = raw_done = examples = trained = 0
        self.running_training_loss = 0.0
        start = time.perf_counter()
        bar = progress_bar(total=total, unit="word", unit_scale=True, desc="word2vec", disable=not self.progress)
        for callback in callbacks:
            _notify(callback, "on_train_begin", self)
        try:
            with bar:
                for epoch in range(epochs):
                    for callback in callbacks:
                        _notify(callback, "on_epoch_begin", self)
                    for number, (ids, offsets, raw) in enumerate(self._epoch_chunks(sentences)):
                        raw_done += raw
                        n = ids.numel()
                        if n == 0:
                            continue
                        a0 = alpha - (alpha - min_alpha) * min(1.0, done / total)
                        a1 = alpha - (alpha - min_alpha) * min(1.0, (done + n) / total)
                        seed = (self.seed * 1_000_003 + self.train_count * 104_729 + epoch * 7919 + done) % 2**63
                        if on_gpu:
                            # Encoded chunks stay on the GPU across epochs when they fit the cache budget.
                            if number not in device_chunks:
                                moved = (ids.to(self.device), offsets.to(self.device))
                                if self.retained_words <= self.cache_words:
                                    device_chunks[number] = moved
                            else:
                                moved = device_chunks[number]
                            stats = _C.word2vec.train_chunk_cuda(
                                syn0, syn1neg, moved[0], moved[1], keep, noise, self.window, self.negative, a0, a1,
                                seed, bool(self.sg), bool(self.cbow_mean), self.compute_loss)
                        else:
                            stats = _C.word2vec.train_chunk(
                                syn0, syn1neg, ids, offsets, keep, noise, self.window, self.negative, a0, a1,
                                self.workers, seed, bool(self.sg), bool(self.cbow_mean), self.compute_loss,
                                self.shared_negatives)
                        done += n
                        examples += stats["examples"]
                        trained += stats["trained_words"]
                        self.running_training_loss += stats["loss"]
                        self.min_alpha_yet_reached = a1
                        bar.update(n)
                        elapsed = time.perf_counter() - start
                        postfix = {"words/s": f"{done / max(elapsed, 1e-9):,.0f}"}
                        if self.compute_loss and examples:
                            postfix["loss"] = f"{self.running_training_loss / examples:.3f}"
                        bar.set_postfix(postfix)
                    if callbacks:
                        write_back()
                        self.wv.fill_norms(force=True)
                        for callback in callbacks:
                            _notify(callback, "on_epoch_end", self)
        finally:  # also on an interrupt or error: keep what the GPU trained
            write_back()
        elapsed = time.perf_counter() - start
        self.train_count += 1
        self.training_stats.append({"epochs": epochs, "words": done, "raw_words": raw_done, "trained_words": trained,
                                    "examples": examples, "seconds": elapsed,
                                    "words_per_second": done / max(elapsed, 1e-9),
                                    "loss_per_example": self.running_training_loss / max(examples, 1),
                                    "device": str(self.device)})
        self.wv.fill_norms(force=True)  # the vectors changed in place: recompute cached norms
        logger.info("word2vec: %d epoch(s), %d words (%d after subsampling) in %.1f s, %.0f words/s", epochs, done,
                    trained, elapsed, done / max(elapsed, 1e-9))
        for callback in callbacks:
            _notify(callback, "on_train_end", self)
        return trained, raw_done

    def get_latest_training_loss(self) -> float:
        """Sum of the negative-sampling losses of the last train() (gensim's name; 0 unless
        ``compute_loss=True``)."""
        return self.running_training_loss

    # ---------------------------------------------------------- persistence --

    def _settings(self) -> dict:
        values = {name: getattr(self, name) for name in GENSIM_SETTINGS + LLMKIT_SETTINGS}
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in values.items()}

    def save(self, fname) -> None:
        """Save the whole model to one file (gensim's ``model.save("w2v.model")``): vocabulary in its
        order, counts, input vectors, output weights (``syn1neg``), every hyperparameter and the
        training counters, so that :meth:`load` then :meth:`train` continues as gensim's does.
        llmkit's format: safetensors arrays plus JSON metadata (no pickle), written atomically (an
        interrupted save leaves the previous file). ``hashfxn`` is not saved (gensim 4.4 does not
        use it); callbacks and trim_rule are not kept (nor by gensim)."""
        header: dict = {"config": self._settings(), "state": {
            "corpus_count": self.corpus_count, "corpus_total_words": self.corpus_total_words,
            "effective_min_count": self.effective_min_count, "running_training_loss": self.running_training_loss,
            "min_alpha_yet_reached": self.min_alpha_yet_reached, "train_count": self.train_count,
            "training_stats": self.training_stats, "has_vocabulary": self.wv is not None}}
        tensors: dict = {}
        if self.wv is not None:
            tensors, header["wv"] = self.wv._to_tensors(prefix="wv.")
            tensors["syn1neg"] = self.syn1neg.numpy()
        _storage.write(fname, "Word2Vec", header, tensors)

    @classmethod
    def load(cls, fname, mmap=None, *, device="cpu", progress=True) -> "Word2Vec":
        """A model saved by :meth:`save`, ready to query (``.wv``) or to :meth:`train` further (on
        `device`). Refuses a gensim pickle (convert it with :meth:`from_gensim`: llmkit never
        unpickles), a file of another kind and a damaged file, with a ValueError saying which.
        `mmap` must be None (training updates the arrays in place; ``KeyedVectors.load(...,
        mmap="r")`` maps vectors saved with ``model.wv.save``)."""
        if mmap is not None:
            raise NotImplementedError("Word2Vec.load(mmap=...) is not supported: training updates the arrays in "
                                      "place; save model.wv and map it with KeyedVectors.load(path, mmap='r')")
        from .keyed_vectors import KeyedVectors

        header, tensors = _storage.read(fname, "Word2Vec")
        config, state = header.get("config"), header.get("state")
        if not isinstance(config, dict) or not isinstance(state, dict):
            raise ValueError(f"{fname}: no config / state in the llmkit metadata (damaged file)")
        try:
            model = cls(**{k: config[k] for k in GENSIM_SETTINGS + LLMKIT_SETTINGS if k in config},
                        device=device, progress=progress)
        except (TypeError, ValueError, NotImplementedError) as err:
            raise ValueError(f"{fname}: the saved settings are refused: {err}") from None
        if state.get("has_vocabulary"):
            if not isinstance(header.get("wv"), dict):
                raise ValueError(f"{fname}: the vocabulary header is missing (damaged file)")
            kv = KeyedVectors._from_tensors(header["wv"], tensors, fname, prefix="wv.")
            if "count" not in kv.expandos:
                raise ValueError(f"{fname}: the word counts are missing (damaged file)")
            syn1neg = _storage.need(tensors, "syn1neg", fname, (len(kv), kv.vector_size))
            try:
                model._set_vocabulary(kv.index_to_key, kv.expandos["count"], kv.vectors, syn1neg)
            except ValueError as err:
                raise ValueError(f"{fname}: {err} (damaged file)") from None
            for attr, values in kv.expandos.items():  # attributes a user set on .wv besides the counts
                if attr != "count":
                    model.wv.expandos[attr] = np.array(values)
        for name in ("corpus_count", "corpus_total_words", "effective_min_count", "train_count"):
            setattr(model, name, int(state.get(name, getattr(model, name))))
        for name in ("running_training_loss", "min_alpha_yet_reached"):
            setattr(model, name, float(state.get(name, getattr(model, name))))
        model.training_stats = list(state.get("training_stats", []))
        return model

    def to_gensim(self):
        """This model as a ``gensim.models.Word2Vec``: the same settings, vocabulary (same order),
        counts, input vectors and ``syn1neg``, and gensim's own sampling and noise tables built from
        them, so gensim can query it or continue training it. Needs gensim (ImportError naming it)."""
        from llmkit.utils import require

        gensim_models = require("gensim.models", "embeddings", "Word2Vec.to_gensim()")
        model = gensim_models.Word2Vec(**{name: getattr(self, name) for name in GENSIM_SETTINGS},
                                       hashfxn=self.hashfxn)  # no corpus: gensim trains nothing
        for name in ("corpus_count", "corpus_total_words", "effective_min_count", "running_training_loss",
                     "min_alpha_yet_reached", "train_count"):
            setattr(model, name, getattr(self, name))
        if self.wv is None:
            return model
        words = list(self.wv.index_to_key)
        model.wv.index_to_key = words
        model.wv.key_to_index = {w: i for i, w in enumerate(words)}
        model.wv.vectors = np.array(self.wv.vectors, dtype=np.float32, copy=True)
        model.wv.norms = None
        model.wv.allocate_vecattrs(attrs=["count", "sample_int"], types=[np.int64, np.uint32])
        model.wv.expandos["count"][:] = self.counts
        # gensim's prepare_vocab: sample_int = uint32(keep probability * (2^32 - 1))
        model.wv.expandos["sample_int"][:] = (keep_probabilities(self.counts, self.sample) * (2**32 - 1)).astype(
            np.uint32)
        model.syn1neg = self.syn1neg.numpy().copy()
        model.make_cum_table()
        return model

    @classmethod
    def from_gensim(cls, model, *, device="cpu", progress=True, shared_negatives=True, chunk_words=1_000_000,
                    cache_words=200_000_000) -> "Word2Vec":
        """An llmkit model from a ``gensim.models.Word2Vec`` (negative sampling): its settings,
        vocabulary in its order, counts, vectors and ``syn1neg``, ready to query or to train further.
        For a gensim ``save()`` file: ``Word2Vec.from_gensim(gensim.models.Word2Vec.load(path))`` -- gensim
        unpickles it, so only for files you trust. NotImplementedError for a model llmkit cannot
        continue (hierarchical softmax, null_word, fixed windows); TypeError for FastText / Doc2Vec
        or anything that is not a gensim Word2Vec."""
        from llmkit.utils import require

        gensim_models = require("gensim.models", "embeddings", "Word2Vec.from_gensim()")
        if not isinstance(model, gensim_models.Word2Vec) or isinstance(model, (gensim_models.FastText,
                                                                               gensim_models.Doc2Vec)):
            raise TypeError(f"from_gensim takes a gensim.models.Word2Vec, got {type(model).__module__}."
                            f"{type(model).__name__} (gensim KeyedVectors convert with KeyedVectors.from_gensim)")
        if model.hs:
            raise NotImplementedError("this gensim model was trained with hierarchical softmax (hs=1), which "
                                      "llmkit does not implement; only negative-sampling models (hs=0) convert")
        defaults = {"shrink_windows": True, "max_final_vocab": None, "comment": None, "null_word": 0,
                    "sorted_vocab": 1, "batch_words": MAX_WORDS_IN_BATCH, "compute_loss": False}
        settings = {name: getattr(model, name, defaults.get(name)) for name in GENSIM_SETTINGS}
        settings = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in settings.items()}
        ours = cls(**settings, hashfxn=getattr(model, "hashfxn", hash), device=device, progress=progress,
                   shared_negatives=shared_negatives, chunk_words=chunk_words, cache_words=cache_words)
        if len(model.wv.index_to_key):
            words = list(model.wv.index_to_key)
            if not all(isinstance(w, str) for w in words):
                raise ValueError("the gensim model has non-string keys; a Word2Vec vocabulary holds words")
            if "count" not in model.wv.expandos:
                raise ValueError("the gensim model's vocabulary has no counts (wv 'count' attribute)")
            syn1neg = getattr(model, "syn1neg", None)
            if syn1neg is None:
                raise ValueError("the gensim model has no syn1neg (output weights of negative sampling)")
            ours._set_vocabulary(words, model.wv.expandos["count"], model.wv.vectors, syn1neg)
        for name in ("corpus_count", "corpus_total_words", "effective_min_count", "train_count"):
            setattr(ours, name, int(getattr(model, name, getattr(ours, name)) or 0))
        ours.running_training_loss = float(getattr(model, "running_training_loss", 0.0))
        ours.min_alpha_yet_reached = float(getattr(model, "min_alpha_yet_reached", ours.alpha))
        return ours


# ------------------------------------------------------------------ checks --


def _notify(callback, event: str, model) -> None:
    method = getattr(callback, event, None)
    if method is not None:
        method(model)


def _check_callbacks(callbacks) -> tuple:
    if callbacks is None:
        return ()
    try:
        callbacks = tuple(callbacks)
    except TypeError:
        raise TypeError(f"callbacks must be a sequence of callback objects (gensim's CallbackAny2Vec), got "
                        f"{type(callbacks).__name__}") from None
    events = ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_end")
    for callback in callbacks:
        if not any(callable(getattr(callback, e, None)) for e in events):
            raise TypeError(f"callback {callback!r} has none of the methods {', '.join(events)}")
    return callbacks


def _check_device(device) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if parsed.type == "cuda":
        _check_cuda_trainer(parsed)
    return parsed


def _check_cuda_trainer(device: torch.device) -> None:
    from llmkit import _C

    if not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: torch sees no CUDA device here")
    if not hasattr(_C.word2vec, "train_chunk_cuda"):
        raise ValueError(f"device={str(device)!r}: this llmkit build has no CUDA kernels (rebuild with nvcc and a "
                         "CUDA build of torch)")


def _check_int(name: str, value, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_flag(name: str, value, meaning: str) -> None:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return
    raise ValueError(f"{name} must be {meaning}, got {value!r}")


def _check_number(name: str, value, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def _check_alphas(alpha, min_alpha) -> None:
    _check_number("alpha", alpha)
    _check_number("min_alpha", min_alpha)
    if not (alpha > 0 and 0 <= min_alpha <= alpha):
        raise ValueError(f"need alpha > 0 and 0 <= min_alpha <= alpha, got alpha={alpha}, min_alpha={min_alpha}")


__all__ = ["Word2Vec", "LineSentence", "Vocabulary", "count_words", "select_vocabulary", "encode_chunks",
           "keep_probabilities", "keep_vocab_item", "noise_table", "keep_thresholds", "RULE_DEFAULT",
           "RULE_DISCARD", "RULE_KEEP", "GENSIM_SETTINGS"]
