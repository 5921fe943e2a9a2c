"""Saving and loading embeddings: llmkit's native files and gensim's objects.

- Word2Vec / GloVe / KeyedVectors ``save`` + ``load`` round trips are exact (vocabulary
  order, counts, vectors, output weights, settings, counters), and a loaded model
  continues training exactly as the model that was never saved;
- saves are atomic (a failure leaves the previous file), and loading refuses, with a
  message saying what to do, a gensim pickle (without ever unpickling it), a file of
  another kind, a word2vec-format file and damaged files;
- ``to_gensim()`` gives gensim the same vocabulary, counts, vectors and syn1neg, and
  gensim's own tables: its most_similar equals ours and it trains further;
  ``from_gensim()`` takes a gensim model back, and continues training it.
"""

import os
import pickle

import numpy as np
import pytest
import torch

from llmkit.embeddings import GloVe, KeyedVectors, Word2Vec


def two_topics(n=300, seed=0):
    rng = np.random.default_rng(seed)
    topics = [[f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)], ["the", "of"]]
    return [[str(w) for w in rng.choice(topics[s % 2] + topics[2], size=11)] for s in range(n)]


W2V = dict(vector_size=12, min_count=1, workers=1, progress=False, seed=7)


def assert_same_model(a: Word2Vec, b: Word2Vec, stats: str = "equal"):
    """`stats`: "equal" (a round trip), "counts" (both trained since: all but the timings), "skip"."""
    assert a.wv.index_to_key == b.wv.index_to_key and a.key_to_index == b.key_to_index
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.wv.vectors, b.wv.vectors)
    assert torch.equal(a.syn1neg, b.syn1neg)
    assert a._settings() == b._settings()
    assert torch.equal(a._keep, b._keep) and torch.equal(a._noise, b._noise)
    for name in ("corpus_count", "corpus_total_words", "effective_min_count", "train_count",
                 "running_training_loss", "min_alpha_yet_reached"):
        assert getattr(a, name) == getattr(b, name), name
    if stats == "equal":
        assert a.training_stats == b.training_stats
    elif stats == "counts":
        untimed = [[{k: v for k, v in s.items() if k not in ("seconds", "words_per_second")} for s in m.training_stats]
                   for m in (a, b)]
        assert untimed[0] == untimed[1]


# ------------------------------------------------------------------------------------------ Word2Vec


@pytest.mark.parametrize("kw", [dict(sg=0), dict(sg=1, sorted_vocab=0, compute_loss=True, comment="run 1"),
                                dict(sg=1, shared_negatives=False, sample=0, max_final_vocab=15)],
                         ids=["cbow", "skipgram-unsorted", "per-pair"])
def test_word2vec_round_trip_is_exact_and_training_continues_identically(tmp_path, kw):
    corpus = two_topics()
    model = Word2Vec(corpus, epochs=2, **W2V, **kw)
    path = tmp_path / "w2v.model"
    model.save(path)
    loaded = Word2Vec.load(path, progress=False)
    assert_same_model(model, loaded)
    # continued training after the round trip equals continued training without it
    model.train(corpus, total_examples=model.corpus_count, epochs=2)
    loaded.train(corpus, total_examples=loaded.corpus_count, epochs=2)
    assert_same_model(model, loaded, stats="counts")
    assert model.train_count == 2
    assert loaded.wv.most_similar("a0", topn=3) == model.wv.most_similar("a0", topn=3)


def test_word2vec_without_vocabulary_and_with_extra_attributes(tmp_path):
    empty = Word2Vec(vector_size=5, window=3, sg=1, progress=False)
    empty.save(tmp_path / "empty.model")
    back = Word2Vec.load(tmp_path / "empty.model")
    assert back.wv is None and back._settings() == empty._settings()
    back.build_vocab(two_topics(50))
    back.train(two_topics(50), total_examples=50, epochs=1)
    model = Word2Vec(two_topics(50), **W2V)
    model.wv.set_vecattr("a0", "tag", 3)
    model.save(tmp_path / "tagged.model")
    assert Word2Vec.load(tmp_path / "tagged.model").wv.get_vecattr("a0", "tag") == 3


def test_save_is_atomic_and_keeps_the_file_mode(tmp_path, monkeypatch):
    from llmkit.utils import atomic

    path = tmp_path / "w2v.model"
    path.write_bytes(b"previous model")
    os.chmod(path, 0o640)
    model = Word2Vec(two_topics(60), **W2V)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == b"previous model" and os.listdir(tmp_path) == ["w2v.model"]
    monkeypatch.undo()
    model.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert Word2Vec.load(path).wv.index_to_key == model.wv.index_to_key
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.save(tmp_path / "missing" / "w2v.model")
    with pytest.raises(IsADirectoryError):
        model.save(tmp_path)


def test_load_never_unpickles_and_says_how_to_convert(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.model"
    evil.write_bytes(pickle.dumps(Payload(), protocol=4))
    for loader in (Word2Vec.load, KeyedVectors.load, GloVe.load):
        with pytest.raises(ValueError, match="pickle.*never unpickles.*from_gensim|pickle.*never unpickles"):
            loader(evil)
    assert not marker.exists()


def test_load_refuses_other_files(tmp_path):
    model = Word2Vec(two_topics(60), **W2V)
    kv_file, w2v_file = tmp_path / "vectors.kv", tmp_path / "w2v.model"
    model.wv.save(kv_file)
    model.save(w2v_file)
    with pytest.raises(ValueError, match="llmkit.KeyedVectors.*KeyedVectors.load"):
        Word2Vec.load(kv_file)
    with pytest.raises(ValueError, match="llmkit.Word2Vec.*Word2Vec.load"):
        KeyedVectors.load(w2v_file)
    with pytest.raises(ValueError, match="llmkit.Word2Vec.*Word2Vec.load"):
        GloVe.load(w2v_file)
    text = tmp_path / "vectors.txt"
    model.wv.save_word2vec_format(text)
    with pytest.raises(ValueError, match="not an llmkit Word2Vec file.*load_word2vec_format"):
        Word2Vec.load(text)
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="without llmkit's metadata"):
        Word2Vec.load(foreign)
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(w2v_file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not an llmkit Word2Vec file"):
        Word2Vec.load(truncated)
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match="not an llmkit"):
        Word2Vec.load(tmp_path / "empty.model")
    with pytest.raises(FileNotFoundError):
        Word2Vec.load(tmp_path / "missing.model")
    with pytest.raises(IsADirectoryError, match="directory"):
        Word2Vec.load(tmp_path)
    with pytest.raises(NotImplementedError, match="mmap"):
        Word2Vec.load(w2v_file, mmap="r")


def test_load_refuses_damaged_content(tmp_path):
    """A file whose metadata and tensors disagree (written by hand here) is refused, not half-loaded."""
    from llmkit.embeddings import _storage

    model = Word2Vec(two_topics(60), **W2V)
    tensors, wv_header = model.wv._to_tensors(prefix="wv.")
    header = {"config": model._settings(), "state": {"has_vocabulary": True}, "wv": wv_header}
    path = tmp_path / "bad.model"
    _storage.write(path, "Word2Vec", header, tensors)  # syn1neg missing
    with pytest.raises(ValueError, match="'syn1neg' is missing"):
        Word2Vec.load(path)
    tensors["syn1neg"] = np.zeros((3, 12), np.float32)
    _storage.write(path, "Word2Vec", header, tensors)
    with pytest.raises(ValueError, match="syn1neg.*shape"):
        Word2Vec.load(path)
    tensors["syn1neg"] = model.syn1neg.numpy()
    tensors["wv.keys.offsets"] = tensors["wv.keys.offsets"][::-1].copy()
    _storage.write(path, "Word2Vec", header, tensors)
    with pytest.raises(ValueError, match="offsets"):
        Word2Vec.load(path)
    _storage.write(path, "Word2Vec", dict(header, config=dict(header["config"], hs=1)), model.wv._to_tensors("wv.")[0])
    with pytest.raises(ValueError, match="saved settings are refused.*hs=1"):
        Word2Vec.load(path)
    _storage.write(path, "Word2Vec", dict(header, version=99), {})
    with pytest.raises(ValueError, match="newer"):
        Word2Vec.load(path)


# ------------------------------------------------------------------------------------------ gensim


def test_to_gensim_equals_ours_and_gensim_trains_it():
    gensim = pytest.importorskip("gensim")
    corpus = two_topics()
    ours = Word2Vec(corpus, sg=1, epochs=3, **W2V)
    theirs = ours.to_gensim()
    assert isinstance(theirs, gensim.models.Word2Vec)
    assert theirs.wv.index_to_key == ours.wv.index_to_key
    np.testing.assert_array_equal(theirs.wv.vectors, ours.wv.vectors)
    np.testing.assert_array_equal(theirs.syn1neg, ours.syn1neg.numpy())
    np.testing.assert_array_equal(theirs.wv.expandos["count"], ours.counts)
    for name in ("sg", "window", "negative", "alpha", "min_alpha", "epochs", "sample", "vector_size",
                 "corpus_count", "corpus_total_words"):
        assert getattr(theirs, name) == getattr(ours, name), name
    # gensim's own tables from the same vocabulary: what gensim's build_vocab gives on the same corpus
    reference = gensim.models.Word2Vec(vector_size=12, min_count=1, sg=1)
    reference.build_vocab(corpus)
    assert reference.wv.index_to_key == theirs.wv.index_to_key
    np.testing.assert_array_equal(reference.wv.expandos["sample_int"], theirs.wv.expandos["sample_int"])
    np.testing.assert_array_equal(reference.cum_table, theirs.cum_table)
    for query in ("a0", "b3", "the"):
        mine, gensims = ours.wv.most_similar(query, topn=5), theirs.wv.most_similar(query, topn=5)
        assert [w for w, _ in mine] == [w for w, _ in gensims]
        np.testing.assert_allclose([s for _, s in mine], [s for _, s in gensims], rtol=0, atol=1e-6)
    before = theirs.wv.vectors.copy()
    trained, raw = theirs.train(corpus, total_examples=theirs.corpus_count, epochs=1)
    assert raw == len(corpus) * 11 and trained > 0
    assert np.isfinite(theirs.wv.vectors).all() and not np.array_equal(before, theirs.wv.vectors)


def test_from_gensim_and_back():
    gensim = pytest.importorskip("gensim")
    corpus = two_topics()
    theirs = gensim.models.Word2Vec(corpus, vector_size=10, min_count=2, window=3, sg=1, epochs=2, workers=1, seed=3)
    ours = Word2Vec.from_gensim(theirs, progress=False)
    assert ours.wv.index_to_key == theirs.wv.index_to_key
    np.testing.assert_array_equal(ours.wv.vectors, theirs.wv.vectors)
    np.testing.assert_array_equal(ours.syn1neg.numpy(), theirs.syn1neg)
    assert (ours.sg, ours.window, ours.min_count, ours.epochs, ours.workers) == (1, 3, 2, 2, 1)
    assert ours.corpus_count == theirs.corpus_count and ours.corpus_total_words == theirs.corpus_total_words
    assert ours.wv.most_similar("a1", topn=3)[0][0] == theirs.wv.most_similar("a1", topn=3)[0][0]
    before = ours.wv.vectors.copy()
    ours.train(corpus, total_examples=ours.corpus_count, epochs=1)
    assert np.isfinite(ours.wv.vectors).all() and not np.array_equal(before, ours.wv.vectors)
    again = Word2Vec.from_gensim(ours.to_gensim(), progress=False)
    assert_same_model(ours, again, stats="skip")  # gensim keeps no per-call statistics
    # the gensim pickle route that Word2Vec.load's message recommends
    with pytest.raises(NotImplementedError, match="hierarchical softmax"):
        Word2Vec.from_gensim(gensim.models.Word2Vec(corpus, vector_size=4, min_count=1, hs=1, negative=0, epochs=1))
    with pytest.raises(TypeError, match="FastText"):
        Word2Vec.from_gensim(gensim.models.FastText(corpus, vector_size=4, min_count=1, epochs=1))
    with pytest.raises(TypeError, match="gensim.models.Word2Vec"):
        Word2Vec.from_gensim(ours)


def test_gensim_saved_model_converts(tmp_path):
    gensim = pytest.importorskip("gensim")
    theirs = gensim.models.Word2Vec(two_topics(), vector_size=6, min_count=1, epochs=1, workers=1)
    theirs.save(str(tmp_path / "gensim.model"))
    with pytest.raises(ValueError, match="Word2Vec.from_gensim"):
        Word2Vec.load(tmp_path / "gensim.model")
    ours = Word2Vec.from_gensim(gensim.models.Word2Vec.load(str(tmp_path / "gensim.model")))
    np.testing.assert_array_equal(ours.wv.vectors, theirs.wv.vectors)


# ------------------------------------------------------------------------------------------ KeyedVectors


def test_keyed_vectors_round_trip_mmap_and_int_keys(tmp_path):
    rng = np.random.default_rng(1)
    kv = KeyedVectors(7)
    kv.add_vectors(["x", "héllo", "日本", "z" * 40], rng.standard_normal((4, 7)).astype(np.float32),
                   extras={"count": np.array([9, 5, 5, 1])})
    kv.save(tmp_path / "v.kv")
    back = KeyedVectors.load(tmp_path / "v.kv")
    assert back.index_to_key == kv.index_to_key and back.vector_size == 7
    np.testing.assert_array_equal(back.vectors, kv.vectors)
    np.testing.assert_array_equal(back.expandos["count"], kv.expandos["count"])
    mapped = KeyedVectors.load(tmp_path / "v.kv", mmap="r")
    assert isinstance(mapped.vectors, np.memmap) and not mapped.vectors.flags.writeable
    assert mapped.most_similar("x", topn=2) == kv.most_similar("x", topn=2)
    with pytest.raises(ValueError, match="mmap must be None or 'r'"):
        KeyedVectors.load(tmp_path / "v.kv", mmap="w+")
    ints = KeyedVectors(3)
    ints.add_vectors([10, 20], np.ones((2, 3), np.float32))
    ints.save(tmp_path / "ints.kv")
    assert KeyedVectors.load(tmp_path / "ints.kv").index_to_key == [10, 20]
    mixed = KeyedVectors(3)
    mixed.add_vectors(["a", 2], np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="all-str or all-int"):
        mixed.save(tmp_path / "mixed.kv")
    empty = KeyedVectors(4)
    empty.save(tmp_path / "empty.kv")
    assert len(KeyedVectors.load(tmp_path / "empty.kv")) == 0


def test_keyed_vectors_gensim_both_ways():
    gensim = pytest.importorskip("gensim")
    rng = np.random.default_rng(2)
    kv = KeyedVectors(5)
    kv.add_vectors([f"w{i}" for i in range(30)], rng.standard_normal((30, 5)).astype(np.float32),
                   extras={"count": np.arange(30, 0, -1)})
    theirs = kv.to_gensim()
    assert isinstance(theirs, gensim.models.KeyedVectors) and theirs.index_to_key == kv.index_to_key
    np.testing.assert_array_equal(theirs.vectors, kv.vectors)
    assert theirs.get_vecattr("w3", "count") == 27
    assert [w for w, _ in theirs.most_similar("w0", topn=5)] == [w for w, _ in kv.most_similar("w0", topn=5)]
    back = KeyedVectors.from_gensim(theirs)
    np.testing.assert_array_equal(back.vectors, kv.vectors)
    np.testing.assert_array_equal(back.expandos["count"], kv.expandos["count"])
    with pytest.raises(TypeError, match="Word2Vec.from_gensim"):
        KeyedVectors.from_gensim(gensim.models.Word2Vec(vector_size=4))


# ------------------------------------------------------------------------------------------ GloVe


GLOVE = dict(vector_size=8, window=4, min_count=1, x_max=10.0, workers=1, seed=3, progress=False)


def test_glove_round_trip_and_continued_training_is_exact(tmp_path):
    corpus = two_topics()
    model = GloVe(corpus, epochs=2, **GLOVE)
    model.save(tmp_path / "glove.model")
    loaded = GloVe.load(tmp_path / "glove.model", progress=False)
    assert loaded.wv.index_to_key == model.wv.index_to_key
    np.testing.assert_array_equal(loaded.wv.vectors, model.wv.vectors)
    for name in ("W", "C", "gradsq_W", "gradsq_C"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    for a, b in zip(loaded.cooccurrence, model.cooccurrence):
        assert torch.equal(a, b)
    assert loaded.losses == model.losses and loaded.epochs_trained == 2
    loaded.train(epochs=3)
    uninterrupted = GloVe(corpus, epochs=5, **GLOVE)
    assert loaded.wv.vectors.tobytes() == uninterrupted.wv.vectors.tobytes()
    assert loaded.losses == uninterrupted.losses


def test_glove_saved_without_counts_needs_them_again(tmp_path):
    corpus = two_topics()
    model = GloVe(corpus, epochs=2, **GLOVE)
    model.save(tmp_path / "small.model", cooccurrence=False)
    assert (tmp_path / "small.model").stat().st_size + 12 * model.cooccurrence_count <= _saved_size(model, tmp_path)
    loaded = GloVe.load(tmp_path / "small.model")
    np.testing.assert_array_equal(loaded.wv.vectors, model.wv.vectors)
    with pytest.raises(RuntimeError, match="count_cooccurrences"):
        loaded.train(epochs=1)
    loaded.count_cooccurrences(corpus)
    loaded.train(epochs=1)
    with pytest.raises(ValueError, match="llmkit.GloVe.*GloVe.load"):
        Word2Vec.load(tmp_path / "small.model")


def _saved_size(model, tmp_path):
    model.save(tmp_path / "full.model")
    return (tmp_path / "full.model").stat().st_size
