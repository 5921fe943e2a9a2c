"""GloVe (llmkit._C.glove and llmkit.embeddings.GloVe): co-occurrence counts and
one AdaGrad update against float64 references, the dense / sparse counting
paths, streaming, determinism, learning a planted two-topic corpus, bad input."""

import math
import random

import numpy as np
import pytest
import torch

from llmkit import _C
from llmkit.embeddings import GloVe
from llmkit.ops import reference


def random_corpus(seed, vocab=23, sentences=40, max_len=17):
    """Zipf-ish ids (so some pairs repeat a lot), sentences of 0..max_len words."""
    rng = random.Random(seed)
    weights = [1.0 / (r + 1) for r in range(vocab)]
    return [rng.choices(range(vocab), weights, k=rng.randint(0, max_len)) for _ in range(sentences)]


def encode(sentences):
    ids = torch.tensor([w for s in sentences for w in s], dtype=torch.int32)
    offsets = torch.tensor(np.cumsum([0] + [len(s) for s in sentences]), dtype=torch.int64)
    return ids, offsets


def as_dense(rows, cols, values, vocab):
    X = torch.zeros(vocab, vocab, dtype=torch.float64)
    X[rows.long(), cols.long()] = values.double()
    return X


def check_sorted_distinct(rows, cols, vocab):
    keys = rows.long() * vocab + cols.long()
    assert bool((keys[1:] > keys[:-1]).all()), "pairs must be sorted by (row, col) and distinct"


@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("dense_bytes", [0, 8 * 40, 1 << 20])  # all sparse, split, all dense
def test_counts_match_float64_reference(window, symmetric, workers, dense_bytes):
    vocab = 23
    sentences = random_corpus(window * 10 + workers)
    ids, offsets = encode(sentences)
    # buffer_records=7: the sparse path flushes, sorts and merges runs many times.
    rows, cols, values = _C.glove.count_cooccurrences(ids, offsets, vocab, window, symmetric, True, workers,
                                                      dense_bytes, 7)
    check_sorted_distinct(rows, cols, vocab)
    assert bool((values > 0).all())
    ref = reference.glove_cooccurrences(sentences, vocab, window, symmetric)
    torch.testing.assert_close(as_dense(rows, cols, values, vocab), ref, rtol=1e-6, atol=0)
    assert rows.numel() == int((ref != 0).sum())


def test_dense_budget_splits_the_table():
    counter = _C.glove.CooccurrenceCounter(23, 3, True, True, 1, 8 * 40, 7)
    # The dense cells (i, j) are those with (i + 1)(j + 1) <= P, P the largest within 40 cells.
    P = counter.dense_product
    cells = sum(min(23, P // (i + 1)) for i in range(23))
    assert cells == counter.dense_cells <= 40 < sum(min(23, (P + 1) // (i + 1)) for i in range(23))
    ids, offsets = encode(random_corpus(0))
    counter.add(ids, offsets)
    counter.result()
    assert counter.sparse_pairs > 0 and counter.words == ids.numel()
    assert _C.glove.CooccurrenceCounter(23, 3, dense_bytes=1 << 20).dense_cells == 23 * 23


def test_no_distance_weighting_counts_pairs():
    sentences = random_corpus(3)
    ids, offsets = encode(sentences)
    rows, cols, values = _C.glove.count_cooccurrences(ids, offsets, 23, 4, True, False, 2, 8 * 30, 5)
    ref = reference.glove_cooccurrences(sentences, 23, 4, True, distance_weighting=False)
    torch.testing.assert_close(as_dense(rows, cols, values, 23), ref, rtol=0, atol=0)


def test_counter_streams_chunks():
    """Chunk by chunk into one counter gives the counts of the whole corpus in one go."""
    sentences = random_corpus(5, sentences=60)
    whole = _C.glove.count_cooccurrences(*encode(sentences), 23, 5, True, True, 2, 8 * 50, 11)
    counter = _C.glove.CooccurrenceCounter(23, 5, True, True, 2, 8 * 50, 11)
    for start in range(0, 60, 7):
        counter.add(*encode(sentences[start:start + 7]))
    parts = counter.result()
    for got, want in zip(parts, whole):  # bit for bit: buffers flush when full, not at chunk ends
        assert torch.equal(got, want)


def test_windows_stop_at_sentence_ends():
    ids = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    rows, cols, values = _C.glove.count_cooccurrences(ids, torch.tensor([0, 2, 4]), 4, 10)
    assert list(zip(rows.tolist(), cols.tolist(), values.tolist())) == [(0, 1, 1.0), (1, 0, 1.0), (2, 3, 1.0),
                                                                        (3, 2, 1.0)]


# ------------------------------------------------------------------ AdaGrad --


def glove_tensors(vocab, dim, seed):
    g = torch.Generator().manual_seed(seed)
    W = (torch.rand(vocab, dim + 1, generator=g) - 0.5)
    C = (torch.rand(vocab, dim + 1, generator=g) - 0.5)
    GW = 1.0 + torch.rand(vocab, dim + 1, generator=g) * 3  # a used accumulator, not the initial ones
    GC = 1.0 + torch.rand(vocab, dim + 1, generator=g) * 3
    return W, C, GW, GC


@pytest.mark.parametrize("dim", [1, 7, 8, 100, 301])  # AVX2 lanes and the scalar tail
@pytest.mark.parametrize("x", [0.25, 3.0, 250.0])  # below and above x_max
def test_one_update_matches_float64_reference(dim, x):
    W, C, GW, GC = glove_tensors(9, dim, dim)
    ref = reference.glove_step(W, C, GW, GC, 4, 6, x, x_max=100.0, alpha=0.75, learning_rate=0.05)
    cost = _C.glove.glove_step(W, C, GW, GC, 4, 6, x, 100.0, 0.75, 0.05)
    for got, want in zip((W, C, GW, GC), ref[:4]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert cost == pytest.approx(ref[4], rel=1e-5)
    # Rows not in the record are untouched.
    W0, C0, _, _ = glove_tensors(9, dim, dim)
    keep = [i for i in range(9) if i not in (4, 6)]
    assert torch.equal(W[keep], W0[keep]) and torch.equal(C[keep], C0[keep])


def test_same_word_as_row_and_context():
    W, C, GW, GC = glove_tensors(5, 16, 1)
    ref = reference.glove_step(W, C, GW, GC, 2, 2, 7.0)
    _C.glove.glove_step(W, C, GW, GC, 2, 2, 7.0)
    torch.testing.assert_close(W.double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(C.double(), ref[1], rtol=1e-5, atol=1e-6)


def test_weighting_is_capped_at_x_max():
    f = reference.glove_weighting(torch.tensor([1.0, 50.0, 100.0, 1e4]), 100.0, 0.75)
    torch.testing.assert_close(f, torch.tensor([0.01**0.75, 0.5**0.75, 1.0, 1.0], dtype=torch.float64))
    # The kernel's cost is 0.5 f(x) diff^2: for x above x_max, f = 1.
    dim = 4
    W, C = torch.zeros(3, dim + 1), torch.zeros(3, dim + 1)
    ones = torch.ones(3, dim + 1)
    for x, fx in [(1e4, 1.0), (100.0, 1.0), (10.0, 0.1**0.75), (2.0, 0.02**0.75)]:
        cost = _C.glove.glove_step(W.clone(), C.clone(), ones.clone(), ones.clone(), 0, 1, x, 100.0, 0.75, 0.05)
        assert cost == pytest.approx(0.5 * fx * math.log(x) ** 2, rel=1e-5)


def test_non_finite_record_is_skipped():
    W, C, GW, GC = glove_tensors(3, 8, 0)
    W[0, 0] = float("inf")
    before = (W.clone(), C.clone(), GW.clone(), GC.clone())
    assert _C.glove.glove_step(W, C, GW, GC, 0, 1, 5.0) == 0.0
    for got, want in zip((W, C, GW, GC), before):
        assert torch.equal(got, want)


def test_train_epoch_cost_and_shuffle_are_deterministic():
    W, C, GW, GC = glove_tensors(30, 12, 3)
    ids, offsets = encode(random_corpus(1, vocab=30, sentences=80))
    rows, cols, values = _C.glove.count_cooccurrences(ids, offsets, 30, 5)
    sorted_copy = (rows.clone(), cols.clone(), values.clone())
    # The epoch's summed cost is glove.c's cost of the records, taken before each one's update.
    state = [t.clone() for t in (W, C, GW, GC)]
    _C.glove.shuffle(rows, cols, values, 7)
    expected = 0.0
    for r, c, v in zip(rows.tolist(), cols.tolist(), values.tolist()):
        *state, cost = reference.glove_step(*state, r, c, v)
        expected += cost
    r2, c2, v2 = (t.clone() for t in sorted_copy)
    total = _C.glove.train_epoch(W, C, GW, GC, r2, c2, v2, 100.0, 0.75, 0.05, 1, 7, True)
    assert torch.equal(r2, rows) and torch.equal(c2, cols) and torch.equal(v2, values)  # same shuffle
    assert total == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(W.double(), state[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(GC.double(), state[3], rtol=1e-4, atol=1e-5)
    # A permutation of the same records.
    def key(r, c):
        return sorted(zip(r.tolist(), c.tolist()))

    assert key(r2, c2) == key(*sorted_copy[:2])


# ------------------------------------------------------------------ GloVe model --


def two_topic_corpus(seed=0, sentences=600, length=12):
    rng = random.Random(seed)
    topics = [[f"a{i}" for i in range(12)], [f"b{i}" for i in range(12)]]
    glue = ["the", "of", "and"]
    corpus = []
    for _ in range(sentences):
        topic = topics[rng.randrange(2)]
        corpus.append([rng.choice(topic) if rng.random() < 0.8 else rng.choice(glue) for _ in range(length)])
    return corpus, topics


def small_glove(corpus, **kw):
    args = dict(vector_size=16, window=4, min_count=1, x_max=10.0, epochs=20, workers=1, seed=3, progress=False)
    args.update(kw)
    return GloVe(corpus, **args)


def test_learns_two_topics_and_cost_decreases():
    corpus, (a, b) = two_topic_corpus()
    model = small_glove(corpus, epochs=25, workers=2)
    assert len(model.losses) == 25
    assert model.losses[-1] < 0.5 * model.losses[0]
    assert all(later <= earlier * 1.05 for earlier, later in zip(model.losses, model.losses[1:]))
    wv = model.wv
    within = np.mean([wv.similarity(x, y) for t in (a, b) for x in t for y in t if x != y])
    across = np.mean([wv.similarity(x, y) for x in a for y in b])
    assert within > across + 0.3, (within, across)
    nearest = wv.most_similar("a0", topn=5)
    assert all(w.startswith("a") for w, _ in nearest), nearest
    assert model.cooccurrence_count == model.cooccurrence[0].numel() > 0
    # .wv is W + C without the biases (Stanford's -model 2).
    np.testing.assert_allclose(wv.vectors, (model.W[:, :-1] + model.C[:, :-1]).numpy(), rtol=0, atol=0)
    assert wv.get_vecattr("the", "count") == model.counts[model.key_to_index["the"]]


def test_deterministic_with_one_worker_and_a_seed():
    corpus, _ = two_topic_corpus(1, sentences=150)
    m1, m2 = small_glove(corpus, epochs=3), small_glove(corpus, epochs=3)
    assert m1.wv.vectors.tobytes() == m2.wv.vectors.tobytes()
    assert m1.losses == m2.losses
    m3 = small_glove(corpus, epochs=3, seed=4)
    assert m3.wv.vectors.tobytes() != m1.wv.vectors.tobytes()


def test_train_continues():
    corpus, _ = two_topic_corpus(2, sentences=150)
    model = small_glove(corpus, epochs=2)
    before = model.wv.vectors.copy()
    model.train(epochs=3)
    assert len(model.losses) == 5 and model.epochs_trained == 5
    assert len(model.training_stats) == 2 and model.training_stats[1]["epochs"] == 3
    assert not np.array_equal(before, model.wv.vectors)
    # Five epochs at once equal 2 + 3 (the shuffles and the AdaGrad state carry over).
    once = small_glove(corpus, epochs=5)
    assert once.wv.vectors.tobytes() == model.wv.vectors.tobytes()


def test_streaming_chunks_equal_one_chunk():
    corpus, _ = two_topic_corpus(3, sentences=200)
    one = small_glove(corpus, epochs=1, chunk_words=10**9)
    many = small_glove(corpus, epochs=1, chunk_words=50)
    assert one.cooccurrence_stats["pairs"] == many.cooccurrence_stats["pairs"]
    for x, y in zip(one.cooccurrence, many.cooccurrence):
        assert torch.equal(x, y)
    assert one.wv.vectors.tobytes() == many.wv.vectors.tobytes()


def test_vocabulary_matches_word2vec_order(tmp_path):
    from llmkit.embeddings import Word2Vec

    corpus = [["b", "a", "c", "a"], ["c", "b", "d"], ["a", "e"]]
    g = GloVe(corpus, vector_size=4, min_count=2, epochs=1, progress=False)
    w = Word2Vec(corpus, vector_size=4, min_count=2, epochs=1, progress=False)
    assert g.wv.index_to_key == w.wv.index_to_key == ["a", "c", "b"]  # ties: reverse first-seen, as gensim
    # corpus_file reads the same sentences.
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(s) for s in corpus) + "\n")
    f = GloVe(corpus_file=path, vector_size=4, min_count=2, epochs=1, progress=False)
    assert f.wv.index_to_key == g.wv.index_to_key
    assert f.wv.vectors.tobytes() == g.wv.vectors.tobytes()


# ------------------------------------------------------------------ bad input --


@pytest.mark.parametrize("kwargs, message", [
    (dict(vector_size=0), "vector_size must be a positive int"),
    (dict(window=0), "window must be a positive int"),
    (dict(x_max=0.0), "x_max must be a positive number"),
    (dict(x_max=-1), "x_max must be a positive number"),
    (dict(learning_rate=0), "learning_rate must be a positive number"),
    (dict(alpha=-0.5), "alpha must be a number >= 0"),
    (dict(epochs=0), "epochs must be a positive int"),
    (dict(workers=0), "workers must be a positive int"),
    (dict(min_count=100), "no word occurs at least min_count=100 times"),
])
def test_bad_parameters(kwargs, message):
    corpus, _ = two_topic_corpus(sentences=20)
    with pytest.raises(ValueError, match=message):
        GloVe(corpus, progress=False, **{"min_count": 1, **kwargs})


def test_bad_corpora(tmp_path):
    with pytest.raises(ValueError, match="corpus is empty"):
        GloVe([[], []], min_count=1, progress=False)
    with pytest.raises(ValueError, match="no co-occurring pairs"):
        GloVe([["a"], ["b"], ["a"]], min_count=1, progress=False)
    with pytest.raises(TypeError, match="restartable"):
        GloVe((s for s in [["a", "b"]]), min_count=1, progress=False)
    with pytest.raises(TypeError, match="list of tokens"):
        GloVe(["a b c", "a b"], min_count=1, progress=False)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a b c\nd \xff e\n")
    with pytest.raises(ValueError, match="line 2 is not valid UTF-8"):
        GloVe(corpus_file=bad, min_count=1, progress=False)
    with pytest.raises(ValueError, match="not both"):
        GloVe([["a", "b"]], corpus_file=bad, progress=False)


def test_kernel_errors():
    ids, offsets = encode([[0, 1, 2]])
    with pytest.raises(ValueError, match=r"ids outside \[0, 2\)"):
        _C.glove.count_cooccurrences(ids, offsets, 2, 3)
    with pytest.raises(TypeError, match="ids must be int32"):
        _C.glove.count_cooccurrences(ids.long(), offsets, 3, 3)
    with pytest.raises(ValueError, match="offsets must start at 0 and end at 3"):
        _C.glove.count_cooccurrences(ids, torch.tensor([0, 2]), 3, 3)
    with pytest.raises(ValueError, match="window must be >= 1"):
        _C.glove.CooccurrenceCounter(3, 0)
    W, C, GW, GC = glove_tensors(4, 3, 0)
    r, c, v = (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1, 5], dtype=torch.int32),
               torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"cols hold ids outside \[0, 4\)"):
        _C.glove.train_epoch(W, C, GW, GC, r, c, v)
    with pytest.raises(ValueError, match="values must be > 0"):
        _C.glove.train_epoch(W, C, GW, GC, r, torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="same shape"):
        _C.glove.train_epoch(W, C[:3].clone(), GW, GC, r, c, v)
    with pytest.raises(TypeError, match="float32"):
        _C.glove.glove_step(W.double(), C, GW, GC, 0, 1, 1.0)
    with pytest.raises(ValueError, match="x_max must be > 0"):
        _C.glove.glove_step(W, C, GW, GC, 0, 1, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"row and col must be in \[0, 4\)"):
        _C.glove.glove_step(W, C, GW, GC, 0, 4, 1.0)
