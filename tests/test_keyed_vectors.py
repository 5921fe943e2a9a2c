"""llmkit.embeddings.KeyedVectors against gensim 4.4's KeyedVectors: same queries, same analogy and
word-pair scores, word2vec text/binary files both ways, clear errors."""

import os
import sys

import numpy as np
import pytest
import torch

from llmkit.embeddings import CorrelationResult, KeyedVectors
from llmkit.embeddings import keyed_vectors as kvmod


def _gensim():
    return pytest.importorskip("gensim.models.keyedvectors")


def _datapath(name):
    utils = pytest.importorskip("gensim.test.utils")
    return utils.datapath(name)


def _pair(keys, vectors, counts=None):
    """The same vectors in ours and in gensim's KeyedVectors."""
    gensim_kv = _gensim().KeyedVectors(vectors.shape[1])
    gensim_kv.add_vectors(keys, vectors)
    ours = KeyedVectors(vectors.shape[1])
    ours.add_vectors(keys, vectors)
    if counts is not None:
        for key, count in zip(keys, counts):
            gensim_kv.set_vecattr(key, "count", int(count))
            ours.set_vecattr(key, "count", int(count))
    return ours, gensim_kv


@pytest.fixture(scope="module")
def random_kv():
    rng = np.random.default_rng(5)
    keys = [f"w{i}" for i in range(397)] + ["café", "naïve", "東京", "Ωmega", "😀"]
    vectors = rng.standard_normal((len(keys), 19)).astype(np.float32)
    return keys, vectors


@pytest.fixture(scope="module")
def analogy_setup(tmp_path_factory):
    """Vectors over questions-words.txt's vocabulary where each section is (mostly) an offset, so a
    good share of analogies is right; lower-case variants and noise words make case folding and
    restrict_vocab matter. The question file is every 5th question of questions-words.txt."""
    path = _datapath("questions-words.txt")
    sections, lines = {}, []
    for i, line in enumerate(open(path, encoding="utf8")):
        if line.startswith(": "):
            current = sections.setdefault(line[2:].strip(), [])
            lines.append(line)
        else:
            current.append(line.split())
            if i % 5 == 0:
                lines.append(line)
    lines.insert(3, "not a question\n")  # gensim skips lines that are not four words
    subset = tmp_path_factory.mktemp("analogies") / "questions-subset.txt"
    subset.write_text("".join(lines), encoding="utf8")

    rng = np.random.default_rng(0)
    words = sorted({w for qs in sections.values() for q in qs for w in q})
    index = {w: i for i, w in enumerate(words)}
    dim = 16
    vecs = rng.standard_normal((len(words), dim)).astype(np.float32)
    for qs in sections.values():
        offset = 1.5 * rng.standard_normal(dim).astype(np.float32)
        for q in qs:
            for a, b in ((q[0], q[1]), (q[2], q[3])):
                vecs[index[b]] = vecs[index[a]] + offset + 0.3 * rng.standard_normal(dim).astype(np.float32)
    extra = [w.lower() for w in words if w[0].isupper()][::3] + [f"noise{i}" for i in range(600)]
    keys = words + extra
    vecs = np.vstack([vecs, rng.standard_normal((len(extra), dim)).astype(np.float32)])
    order = rng.permutation(len(keys))
    keys = [keys[i] for i in order]
    return str(subset), _pair(keys, vecs[order])


# ------------------------------------------------------------------------------------------------
# queries


def test_most_similar_matches_gensim(random_kv):
    keys, vectors = random_kv
    ours, theirs = _pair(keys, vectors)
    q = vectors[7] - vectors[3]
    cases = [
        dict(positive="w1"),
        dict(positive=["w1", "w2"], negative=["w3"]),
        dict(positive=["w1", "w2"], negative=["w3"], topn=25),
        dict(negative="東京", topn=4),
        dict(positive=[("w5", 2.0), "café"], negative=[("w6", -0.5)]),
        dict(positive=[q, "w8"], topn=6),
        dict(positive=q),
        dict(positive=["w10", "w11"], negative="w12", restrict_vocab=50),
        dict(positive=["w200"], restrict_vocab=100),
        dict(positive=[5, "w9"]),  # an int that is not a key is a row index
    ]
    for kwargs in cases:
        assert ours.most_similar(**kwargs) == theirs.most_similar(**kwargs), kwargs
    for kwargs in (dict(positive=["w1", "w2"], negative=["w3"]), dict(positive="w4", restrict_vocab=30)):
        got = ours.most_similar(topn=None, **kwargs)
        want = theirs.most_similar(topn=None, **kwargs)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert ours.most_similar("w1", topn=0) == []
    assert ours.similar_by_vector(q, topn=7) == theirs.similar_by_vector(q, topn=7)
    assert ours.similar_by_vector(torch.from_numpy(q), topn=7) == theirs.similar_by_vector(q, topn=7)
    assert ours.similar_by_key("naïve", topn=3) == theirs.similar_by_key("naïve", topn=3)
    assert all(k not in ("w1", "w2", "w3") for k, _ in ours.most_similar(["w1", "w2"], ["w3"], topn=len(keys)))
    assert len(ours.most_similar(["w1", "w2"], ["w3"], topn=len(keys))) == len(keys) - 3


@pytest.mark.filterwarnings("ignore:Call to deprecated `init_sims`:DeprecationWarning")
def test_cosmul_and_pairwise_queries_match_gensim(random_kv):
    keys, vectors = random_kv
    ours, theirs = _pair(keys, vectors)
    for kwargs in (dict(positive=["w1", "w2"], negative=["w3"]), dict(positive="w4", topn=3),
                   dict(positive=["w1", vectors[9]], negative=["café"], topn=12)):
        assert ours.most_similar_cosmul(**kwargs) == theirs.most_similar_cosmul(**kwargs)
        kwargs["topn"] = None
        got, want = ours.most_similar_cosmul(**kwargs), theirs.most_similar_cosmul(**kwargs)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    # gensim ignores restrict_vocab in most_similar_cosmul; ours searches the first keys only
    full = theirs.most_similar_cosmul("w4", topn=None)[:20]
    want = [(keys[i], float(full[i])) for i in np.argsort(-full) if keys[i] != "w4"][:10]
    assert ours.most_similar_cosmul("w4", restrict_vocab=20) == want
    for a, b in (("w1", "w2"), ("東京", "😀"), ("w3", "w3")):
        assert ours.similarity(a, b) == theirs.similarity(a, b)
        assert ours.distance(a, b) == theirs.distance(a, b)
    assert ours.n_similarity(["w1", "w2"], ["w3", "café"]) == theirs.n_similarity(["w1", "w2"], ["w3", "café"])
    assert np.array_equal(ours.distances("w1"), theirs.distances("w1"))
    assert np.array_equal(ours.distances(vectors[3], ["w4", "w5"]), theirs.distances(vectors[3], ["w4", "w5"]))
    group = ["w1", "w2", "w3", "w4", "naïve"]
    assert ours.doesnt_match(group) == theirs.doesnt_match(group)
    assert ours.rank_by_centrality(group) == theirs.rank_by_centrality(group)
    assert ours.closer_than("w1", "w2") == theirs.closer_than("w1", "w2")
    assert ours.rank("w1", "w2") == theirs.rank("w1", "w2")
    assert np.array_equal(ours.get_normed_vectors(), theirs.get_normed_vectors())
    assert np.array_equal(ours.get_vector("Ωmega", norm=True), theirs.get_vector("Ωmega", norm=True))
    assert np.array_equal(ours[["w1", "東京"]], theirs[["w1", "東京"]])
    assert np.array_equal(ours.get_mean_vector(["w1", "w2"]), theirs.get_mean_vector(["w1", "w2"]))


def test_vocabulary_and_counts(random_kv):
    keys, vectors = random_kv
    counts = np.random.default_rng(1).integers(1, 40, len(keys))  # many ties
    ours, theirs = _pair(keys, vectors, counts)
    assert len(ours) == len(keys) and ours.vectors.dtype == np.float32
    assert ours.index_to_key == keys and ours.key_to_index["東京"] == keys.index("東京")
    assert "café" in ours and "cafe" not in ours and ours.get_index("w3") == 3
    assert ours.get_vecattr("w7", "count") == counts[7]
    ours.sort_by_descending_frequency()
    theirs.sort_by_descending_frequency()
    assert ours.index_to_key == theirs.index_to_key
    assert np.array_equal(ours.vectors, theirs.vectors)
    assert np.array_equal(ours.expandos["count"], theirs.expandos["count"])
    assert all(np.diff(ours.expandos["count"]) <= 0)
    assert ours.most_similar("w1") == theirs.most_similar("w1")

    kv = KeyedVectors(4)
    kv.add_vectors(["a", "b"], torch.ones(2, 4), extras={"count": np.array([5, 9])})
    kv.add_vectors(["b", "c"], np.full((2, 4), 2.0, np.float32), extras={"count": np.array([1, 3])})
    assert kv.index_to_key == ["a", "b", "c"] and list(kv.expandos["count"]) == [5, 9, 3]
    assert np.array_equal(kv["b"], np.ones(4, np.float32))  # kept: replace=False
    kv["b"] = np.zeros(4, np.float32)
    assert np.array_equal(kv["b"], np.zeros(4, np.float32))
    assert kv.add_vector("d", [1, 2, 3, 4]) == 3 and kv.get_vecattr("d", "count") == 0


def test_errors(random_kv):
    keys, vectors = random_kv
    kv = KeyedVectors(vectors.shape[1])
    kv.add_vectors(keys, vectors)
    with pytest.raises(KeyError, match="'nosuchword'"):
        kv["nosuchword"]
    with pytest.raises(KeyError, match="'nosuchword'"):
        kv.most_similar(positive=["w1", "nosuchword"])
    with pytest.raises(KeyError, match="'nosuchword'"):
        kv.similarity("w1", "nosuchword")
    with pytest.raises(KeyError, match="'nosuchword'"):
        kv.n_similarity(["w1"], ["nosuchword"])  # gensim skips it silently
    with pytest.raises(ValueError, match="at least one positive or negative"):
        kv.most_similar()
    with pytest.raises(ValueError, match="at least one positive or negative"):
        kv.most_similar(positive=[], negative=[])
    with pytest.raises(ValueError, match="at least one positive"):
        kv.most_similar_cosmul(negative=["w1"])
    with pytest.raises(ValueError, match="topn must be >= 0"):
        kv.most_similar("w1", topn=-1)
    with pytest.raises(ValueError, match="topn must be >= 0"):
        kv.most_similar_cosmul("w1", topn=-3)
    with pytest.raises(ValueError, match=r"shape \(19,\)"):
        kv.most_similar(positive=[np.zeros(5, np.float32)])
    with pytest.raises(ValueError, match=r"shape \(2, 19\)"):
        kv.add_vectors(["x", "y"], np.zeros((2, 18), np.float32))
    with pytest.raises(ValueError, match="more than once"):
        kv.add_vectors(["x", "x"], np.zeros((2, 19), np.float32))
    with pytest.raises(ValueError, match="vector_size"):
        KeyedVectors(0)
    with pytest.raises(ValueError, match="shape"):
        kv.vectors = np.zeros((3, 4))


# ------------------------------------------------------------------------------------------------
# evaluation


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(restrict_vocab=700),
    dict(case_insensitive=False, dummy4unknown=True),
])
def test_evaluate_word_analogies_matches_gensim(analogy_setup, kwargs):
    path, (ours, theirs) = analogy_setup
    score, sections = ours.evaluate_word_analogies(path, **kwargs)
    want_score, want_sections = theirs.evaluate_word_analogies(path, **kwargs)
    assert score == want_score
    assert sections == want_sections
    assert sections[-1]["section"] == "Total accuracy"
    assert 0.05 < score < 0.95  # not trivially 0 or 1


def test_evaluate_word_analogies_gensim_quirks(tmp_path):
    """When the five best candidates are all case variants of question words, gensim's answer is
    the fifth of them (its loop variable after the loop), so "ab cd ef Ef" counts as correct;
    invalid lines are skipped and empty sections listed."""
    dim = 8
    rng = np.random.default_rng(3)
    keys = ["ab", "cd", "ef", "gh", "Ab", "aB", "AB", "Cd", "cD", "CD", "Ef", "eF", "EF"]
    keys += [f"n{i}" for i in range(20)]
    vectors = rng.standard_normal((len(keys), dim)).astype(np.float32)
    target = vectors[1] - vectors[0] + vectors[2]
    vectors[4:13] = target + 0.05 * rng.standard_normal((9, dim)).astype(np.float32)
    path = tmp_path / "q.txt"
    path.write_text(": one\nab cd ef gh\nab cd ef ab\nab cd ef Ef\nab cd\n: empty\n: two\n"
                    "gh n1 n2 n3\nx y z w\nn4 n4 n4 n4\n", encoding="utf8")
    ours, theirs = _pair(keys, vectors)
    score, sections = ours.evaluate_word_analogies(str(path))
    assert ("AB", "CD", "EF", "EF") in sections[0]["correct"]
    assert [s["section"] for s in sections] == ["one", "empty", "two", "Total accuracy"]
    assert (score, sections) == theirs.evaluate_word_analogies(str(path))
    for kwargs in (dict(case_insensitive=False), dict(dummy4unknown=True), dict(restrict_vocab=12)):
        assert ours.evaluate_word_analogies(str(path), **kwargs) == theirs.evaluate_word_analogies(str(path), **kwargs)
    bad = tmp_path / "bad.txt"
    bad.write_text("a b c d\n", encoding="utf8")
    with pytest.raises(ValueError, match="Missing section header"):
        ours.evaluate_word_analogies(str(bad))
    bad.write_text(": only\n", encoding="utf8")
    with pytest.raises(ValueError, match="no analogy questions"):
        ours.evaluate_word_analogies(str(bad))


@pytest.fixture(scope="module")
def pairs_setup():
    """Vectors over wordsim353's words whose cosines follow the human scores, some words missing,
    a capitalised variant ranked first."""
    path = _datapath("wordsim353.tsv")
    rows = [line.rstrip("\n").split("\t") for line in open(path, encoding="utf8") if not line.startswith("#")]
    words = sorted({w for a, b, _ in rows for w in (a, b)})
    rng = np.random.default_rng(2)
    dim = 24
    index = {w: i for i, w in enumerate(words)}
    vecs = rng.standard_normal((len(words), dim)).astype(np.float32)
    for a, b, score in rows:
        t = float(score) / 10.0
        vecs[index[b]] = (1 - 0.5 * t) * vecs[index[b]] + 0.5 * t * vecs[index[a]]
    keep = [w for i, w in enumerate(words) if i % 13]
    keys = ["Tiger"] + keep
    vectors = np.vstack([rng.standard_normal((1, dim)).astype(np.float32), vecs[[index[w] for w in keep]]])
    return path, _pair(keys, vectors)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(dummy4unknown=True),
    dict(restrict_vocab=200, case_insensitive=False),
])
def test_evaluate_word_pairs_matches_gensim(pairs_setup, kwargs):
    path, (ours, theirs) = pairs_setup
    pearson, spearman, oov = ours.evaluate_word_pairs(path, **kwargs)
    want_pearson, want_spearman, want_oov = theirs.evaluate_word_pairs(path, **kwargs)
    assert isinstance(spearman, CorrelationResult) and spearman.correlation == spearman[0]
    assert (pearson[0], pearson[1]) == (want_pearson[0], want_pearson[1])
    assert (spearman.correlation, spearman.pvalue) == (want_spearman.correlation, want_spearman.pvalue)
    assert oov == want_oov and 0 < oov < 100
    assert pearson[0] > 0.2


def test_correlations_without_scipy(pairs_setup, monkeypatch):
    """The numpy fallback (no scipy installed) gives scipy's numbers, ties included."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    for n in (3, 7, 60, 353):
        x = np.round(rng.standard_normal(n), 1)  # ties in both
        y = np.round(x + rng.standard_normal(n), 1)
        for ours, theirs in ((kvmod._pearsonr_numpy(x, y), stats.pearsonr(x, y)),
                             (kvmod._spearmanr_numpy(x, y), stats.spearmanr(x, y))):
            np.testing.assert_allclose(ours, (theirs[0], theirs[1]), rtol=1e-9, atol=1e-300)
    assert kvmod._spearmanr_numpy([1, 2, 3, 4], [2, 4, 6, 8]) == (1.0, 0.0)
    path, (ours_kv, theirs_kv) = pairs_setup
    want = theirs_kv.evaluate_word_pairs(path)
    monkeypatch.setitem(sys.modules, "scipy", None)  # importing scipy or scipy.stats now raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert kvmod.optional("scipy.stats") is None
    got = ours_kv.evaluate_word_pairs(path)
    np.testing.assert_allclose([*got[0], *got[1], got[2]], [*want[0], *want[1], want[2]], rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# word2vec files


@pytest.mark.parametrize("binary", [False, True])
def test_save_load_interop_with_gensim(random_kv, tmp_path, binary):
    gensim_kv_cls = _gensim().KeyedVectors
    keys, vectors = random_kv
    vectors = vectors.copy()
    vectors[0, :4] = [1e-8, 3.4e38, -0.0, 123456.78]  # exponents, signed zero, big values
    counts = np.random.default_rng(6).integers(1, 20, len(keys))
    for with_counts in (False, True):
        ours, theirs = _pair(keys, vectors, counts if with_counts else None)
        mine, gensims = tmp_path / "ours.w2v", tmp_path / "gensim.w2v"
        ours.save_word2vec_format(mine, binary=binary)
        theirs.save_word2vec_format(str(gensims), binary=binary)
        assert mine.read_bytes() == gensims.read_bytes()
        loaded_by_gensim = gensim_kv_cls.load_word2vec_format(str(mine), binary=binary)
        loaded_by_us = KeyedVectors.load_word2vec_format(gensims, binary=binary)
        for kv in (loaded_by_gensim, loaded_by_us):
            order = [keys.index(k) for k in kv.index_to_key]
            assert sorted(order) == list(range(len(keys)))
            assert np.array_equal(kv.vectors.view(np.int32), vectors[order].view(np.int32))  # bit-identical
        assert loaded_by_us.index_to_key == loaded_by_gensim.index_to_key
        assert np.array_equal(loaded_by_us.expandos["count"], loaded_by_gensim.expandos["count"])
        # a loaded model saves back to the same bytes, in both libraries
        again = tmp_path / "again.w2v"
        loaded_by_us.save_word2vec_format(again, binary=binary)
        assert again.read_bytes() == gensims.read_bytes()
    limited = KeyedVectors.load_word2vec_format(mine, binary=binary, limit=5)
    theirs_limited = gensim_kv_cls.load_word2vec_format(str(mine), binary=binary, limit=5)
    assert limited.index_to_key == theirs_limited.index_to_key and np.array_equal(limited.vectors,
                                                                                 theirs_limited.vectors)


def test_word2vec_c_files_vocab_and_no_header(tmp_path):
    """word2vec.c's writers: text rows end in a space, binary vectors in a newline; its
    -save-vocab file; GloVe's headerless text."""
    gensim_kv_cls = _gensim().KeyedVectors
    rng = np.random.default_rng(7)
    words = ["</s>", "the", "köln", "x"]
    vecs = rng.standard_normal((4, 5)).astype(np.float32)
    text = tmp_path / "c.txt"
    text.write_bytes(b"4 5\n" + b"".join(w.encode() + b" " + b"".join(b"%f " % v for v in row) + b"\n"
                                         for w, row in zip(words, vecs)))
    binary = tmp_path / "c.bin"
    binary.write_bytes(b"4 5\n" + b"".join(w.encode() + b" " + row.astype("<f4").tobytes() + b"\n"
                                           for w, row in zip(words, vecs)))
    for path, is_binary in ((text, False), (binary, True)):
        ours = KeyedVectors.load_word2vec_format(path, binary=is_binary)
        theirs = gensim_kv_cls.load_word2vec_format(str(path), binary=is_binary)
        assert ours.index_to_key == words == theirs.index_to_key
        assert np.array_equal(ours.vectors, theirs.vectors)
    assert np.array_equal(KeyedVectors.load_word2vec_format(binary, binary=True).vectors, vecs)

    kv = KeyedVectors(5)
    kv.add_vectors(words, vecs, extras={"count": np.array([50, 40, 30, 30])})
    vocab = tmp_path / "vocab.txt"
    kv.save_word2vec_format(tmp_path / "v.txt", fvocab=vocab)
    assert vocab.read_text(encoding="utf8") == "</s> 50\nthe 40\nköln 30\nx 30\n"
    theirs = gensim_kv_cls.load_word2vec_format(str(tmp_path / "v.txt"), fvocab=str(vocab))
    ours = KeyedVectors.load_word2vec_format(tmp_path / "v.txt", fvocab=vocab)
    assert [theirs.get_vecattr(w, "count") for w in words] == [ours.get_vecattr(w, "count") for w in words]

    glove = tmp_path / "glove.txt"
    kv.save_word2vec_format(glove, write_header=False)
    ours = KeyedVectors.load_word2vec_format(glove, no_header=True)
    theirs = gensim_kv_cls.load_word2vec_format(str(glove), no_header=True)
    assert ours.index_to_key == theirs.index_to_key and np.array_equal(ours.vectors, theirs.vectors)


@pytest.mark.parametrize("binary", [False, True])
def test_malformed_files(tmp_path, binary):
    kv = KeyedVectors(3)
    kv.add_vectors(["a", "b", "c"], np.arange(9, dtype=np.float32).reshape(3, 3) / 7)
    good = tmp_path / "good"
    kv.save_word2vec_format(good, binary=binary)
    body = good.read_bytes().split(b"\n", 1)[1]

    def load(data, **kwargs):
        path = tmp_path / "bad"
        path.write_bytes(data)
        return KeyedVectors.load_word2vec_format(path, binary=binary, **kwargs)

    with pytest.raises(ValueError, match="declares 4 vectors but the file ends"):
        load(b"4 3\n" + body)
    with pytest.raises(ValueError, match="declares 2 vectors but the file holds more"):
        load(b"2 3\n" + body)
    assert load(b"2 3\n" + body, limit=2).index_to_key == ["a", "b"]
    assert load(b"3 3\n" + body + b"\n\n").index_to_key == ["a", "b", "c"]  # trailing newlines are fine
    with pytest.raises(ValueError, match="header"):
        load(b"three 3\n" + body)
    with pytest.raises(ValueError, match="header"):
        load(b"3\n" + body)
    if binary:
        with pytest.raises(ValueError, match="ends inside vector #3"):
            load(good.read_bytes()[:-5])
        bad_word = b"3 3\n" + body.replace(b"b ", b"\xff ", 1)
    else:
        with pytest.raises(ValueError, match="line 3: expected a word and 3 numbers, got 2"):
            load(b"3 3\na 1 2 3\nb 1 2\nc 1 2 3\n")
        with pytest.raises(ValueError, match="line 4: could not convert"):
            load(b"3 3\na 1 2 3\nb 1 2 3\nc 1 two 3\n")
        bad_word = b"3 3\na 1 2 3\n\xff 1 2 3\nc 1 2 3\n"
    with pytest.raises(UnicodeDecodeError, match="word #2|line 3"):
        load(bad_word)
    gensim_kv_cls = _gensim().KeyedVectors
    for errors in ("replace", "ignore"):
        ours = load(bad_word, unicode_errors=errors)
        theirs = gensim_kv_cls.load_word2vec_format(str(tmp_path / "bad"), binary=binary, unicode_errors=errors)
        assert ours.index_to_key == theirs.index_to_key
    with pytest.warns(UserWarning, match="duplicate word 'a'"):
        dup = load(b"3 3\n" + body.replace(b"b ", b"a ", 1))
    assert dup.index_to_key == ["a", "c"] and np.array_equal(dup["a"], kv["a"])


def test_save_is_atomic(random_kv, tmp_path, monkeypatch):
    keys, vectors = random_kv
    kv = KeyedVectors(vectors.shape[1])
    kv.add_vectors(keys, vectors)
    path = tmp_path / "vectors.bin"
    path.write_bytes(b"previous contents")
    os.chmod(path, 0o640)

    def crash(fd):
        raise OSError("disk full")

    from llmkit.utils import atomic

    monkeypatch.setattr(atomic.os, "fsync", crash)  # the shared atomic_write does every save
    with pytest.raises(OSError, match="disk full"):
        kv.save_word2vec_format(path, binary=True)
    assert path.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["vectors.bin"]  # no temporary file left behind
    monkeypatch.undo()
    kv.save_word2vec_format(path, binary=True)
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert KeyedVectors.load_word2vec_format(path, binary=True).index_to_key == keys
    bad = KeyedVectors(2)
    bad.add_vectors(["two words"], np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="space or newline"):
        bad.save_word2vec_format(tmp_path / "x.txt")
