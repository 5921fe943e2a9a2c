"""llmkit.embeddings.Word2Vec takes gensim 4.4's call sites unchanged.

The constructor's parameters (names, order, defaults) are gensim's, so the same
call trains the same kind of model (CBOW by default); the vocabulary options
(min_count, max_vocab_size, max_final_vocab, trim_rule, sorted_vocab, sample >= 1)
keep the words gensim keeps, in its order, with its subsampling; build_vocab()
and train() accept gensim's arguments and train() returns gensim's pair;
callbacks see each epoch; what llmkit does not implement raises
NotImplementedError naming the option.
"""

import inspect
import math

import numpy as np
import pytest

from llmkit.embeddings import Word2Vec
from llmkit.embeddings import word2vec as w2v

GENSIM_DEFAULTS = dict(sentences=None, corpus_file=None, vector_size=100, alpha=0.025, window=5, min_count=5,
                       max_vocab_size=None, sample=1e-3, seed=1, workers=3, min_alpha=0.0001, sg=0, hs=0, negative=5,
                       ns_exponent=0.75, cbow_mean=1, hashfxn=hash, epochs=5, null_word=0, trim_rule=None,
                       sorted_vocab=1, batch_words=10000, compute_loss=False, callbacks=(), comment=None,
                       max_final_vocab=None, shrink_windows=True)


def two_topics(n=400, seed=0):
    rng = np.random.default_rng(seed)
    topics = [[f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]]
    return [[str(w) for w in rng.choice(topics[s % 2], size=12)] for s in range(n)]


def zipf_corpus(n=300, seed=1):
    """Many distinct words, many tied counts: what vocabulary rules are sensitive to."""
    rng = np.random.default_rng(seed)
    return [[f"w{int(i)}" for i in rng.zipf(1.4, rng.integers(1, 14)) if i < 500] for _ in range(n)]


def small(**kw):
    return dict(dict(vector_size=8, min_count=1, workers=1, progress=False), **kw)


# ------------------------------------------------------------------------------------------- signatures


def test_constructor_takes_gensim_parameters_in_order_with_its_defaults():
    params = list(inspect.signature(Word2Vec.__init__).parameters.values())[1:]
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == list(GENSIM_DEFAULTS)
    assert {p.name: p.default for p in positional} == GENSIM_DEFAULTS
    extras = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    assert extras == ["device", "progress", "shared_negatives", "chunk_words", "cache_words"]


def test_signatures_equal_gensim_installed():
    gensim = pytest.importorskip("gensim")
    theirs = gensim.models.Word2Vec
    for method in ("__init__", "build_vocab", "train"):
        ours_params = [p for p in inspect.signature(getattr(Word2Vec, method)).parameters.values()
                       if p.kind is not p.KEYWORD_ONLY]
        their_params = list(inspect.signature(getattr(theirs, method)).parameters.values())
        assert [(p.name, p.kind) for p in ours_params] == [(p.name, p.kind) for p in their_params], method
        for a, b in zip(ours_params, their_params):
            assert a.default == b.default, (method, a.name)


def test_default_call_trains_cbow_as_gensim():
    corpus = two_topics()
    default = Word2Vec(corpus, **small())
    assert default.sg == 0 and default.workers == 1 and not default.compute_loss
    cbow = Word2Vec(corpus, **small(sg=0))
    skipgram = Word2Vec(corpus, **small(sg=1))
    np.testing.assert_array_equal(default.wv.vectors, cbow.wv.vectors)
    assert not np.array_equal(default.wv.vectors, skipgram.wv.vectors)
    assert default.get_latest_training_loss() == 0.0  # compute_loss=False, as gensim
    assert Word2Vec(corpus, **small(compute_loss=True)).get_latest_training_loss() > 0
    assert Word2Vec(progress=False).workers == 3


# ------------------------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize("kw", [
    dict(min_count=2),
    dict(min_count=1, sorted_vocab=0),
    dict(min_count=1, max_final_vocab=25),
    dict(min_count=3, max_final_vocab=7),
    dict(min_count=1, max_vocab_size=40),
    dict(min_count=2, max_vocab_size=60, sorted_vocab=0),
    dict(min_count=0),
    dict(min_count=1, sample=5),  # gensim's shorthand: sample >= 1 is a count threshold
    dict(min_count=1, sample=0),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_vocabulary_and_subsampling_equal_gensim(kw):
    gensim = pytest.importorskip("gensim")
    corpus = zipf_corpus()
    theirs = gensim.models.Word2Vec(vector_size=4, **kw)
    theirs.build_vocab(corpus)
    ours = Word2Vec(vector_size=4, progress=False, **kw).build_vocab(corpus)
    assert ours.wv.index_to_key == theirs.wv.index_to_key
    np.testing.assert_array_equal(ours.counts, theirs.wv.expandos["count"])
    assert (ours.corpus_count, ours.corpus_total_words, ours.effective_min_count) == \
        (theirs.corpus_count, theirs.corpus_total_words, theirs.effective_min_count)
    # gensim stores the keep probability as uint32(p * (2^32 - 1)); ours as p * 2^32 rounded
    ours_p = w2v.keep_probabilities(ours.counts, ours.sample)
    np.testing.assert_allclose(ours_p, theirs.wv.expandos["sample_int"] / (2**32 - 1), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(ours._noise.numpy().astype(np.int64), theirs.cum_table.astype(np.int64))


def test_trim_rule_as_gensim():
    gensim = pytest.importorskip("gensim")
    corpus = zipf_corpus()

    def rule(word, count, min_count):  # keep odd words whatever their count, drop w2, default for the rest
        if word == "w2":
            return w2v.RULE_DISCARD
        return w2v.RULE_KEEP if int(word[1:]) % 2 else w2v.RULE_DEFAULT

    assert (w2v.RULE_DEFAULT, w2v.RULE_DISCARD, w2v.RULE_KEEP) == \
        (gensim.utils.RULE_DEFAULT, gensim.utils.RULE_DISCARD, gensim.utils.RULE_KEEP)
    theirs = gensim.models.Word2Vec(vector_size=4, min_count=3, max_vocab_size=80)
    theirs.build_vocab(corpus, trim_rule=rule)
    ours = Word2Vec(vector_size=4, min_count=3, max_vocab_size=80, progress=False).build_vocab(corpus, trim_rule=rule)
    assert ours.wv.index_to_key == theirs.wv.index_to_key and "w2" not in ours.wv
    assert any(c < 3 for c in ours.counts)  # kept by the rule below min_count
    trained = Word2Vec(corpus, **small(min_count=3, max_vocab_size=80, trim_rule=rule, epochs=1))
    assert trained.wv.index_to_key == theirs.wv.index_to_key


def test_keep_raw_vocab_and_max_final_vocab_ties():
    corpus = [["a"] * 5 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3 + ["e"]]
    model = Word2Vec(vector_size=4, min_count=1, max_final_vocab=2, progress=False)
    model.build_vocab(corpus, keep_raw_vocab=True)
    # the 3rd most frequent count (3) + 1 = 4 is the effective min_count: ties leave one word, not two
    assert model.wv.index_to_key == ["a"] and model.effective_min_count == 4
    assert dict(model.raw_vocab) == {"a": 5, "b": 3, "c": 3, "d": 3, "e": 1}
    with pytest.raises(ValueError, match=r"min_count=2 times \(max_final_vocab=1 raised it from 1\)"):
        Word2Vec(vector_size=4, min_count=1, max_final_vocab=1, progress=False).build_vocab([["a", "b", "c"]])


# ------------------------------------------------------------------------------------------- training


def test_gensim_build_vocab_then_train_call_site():
    corpus = two_topics()
    model = Word2Vec(vector_size=8, min_count=1, workers=1, progress=False)
    model.build_vocab(corpus)
    result = model.train(corpus, total_examples=model.corpus_count, epochs=model.epochs)
    assert isinstance(result, tuple) and len(result) == 2
    trained, raw = result
    assert raw == model.epochs * model.corpus_total_words == 5 * 400 * 12
    assert 0 < trained < raw  # subsampling drops some words
    assert model.min_alpha_yet_reached == pytest.approx(model.min_alpha)
    # start_alpha / end_alpha / epochs become the model's settings (gensim), compute_loss is per call
    model.train(corpus, total_examples=model.corpus_count, epochs=2, start_alpha=0.01, end_alpha=0.001,
                compute_loss=True, word_count=0, queue_factor=4, report_delay=5.0)
    assert (model.alpha, model.min_alpha, model.epochs) == (0.01, 0.001, 2)
    assert model.compute_loss and model.get_latest_training_loss() > 0
    model.train(corpus, total_examples=model.corpus_count, epochs=1)
    assert not model.compute_loss and model.get_latest_training_loss() == 0.0
    assert model.train_count == 3 and model.min_alpha_yet_reached == pytest.approx(0.001)


def test_schedule_follows_total_examples_of_another_corpus():
    """train() on a corpus other than the vocabulary's: the learning rate reaches min_alpha at its end
    (gensim's total_examples sets the schedule), not a fraction of the way."""
    corpus = two_topics()
    model = Word2Vec(corpus, **small(epochs=1))
    model.train(corpus[:40], total_examples=40, epochs=2)
    assert model.min_alpha_yet_reached == pytest.approx(model.min_alpha, abs=1e-3 * model.alpha)
    model.train(corpus[:40], total_words=40 * 12, epochs=1)
    assert model.min_alpha_yet_reached == pytest.approx(model.min_alpha, abs=1e-3 * model.alpha)


def test_callbacks_see_every_epoch():
    corpus = two_topics()
    events = []

    class Recorder:  # gensim's CallbackAny2Vec interface
        def on_train_begin(self, model):
            events.append(("train_begin", None))

        def on_epoch_begin(self, model):
            events.append(("epoch_begin", None))

        def on_epoch_end(self, model):
            events.append(("epoch_end", (model.wv.vectors.copy(), model.get_latest_training_loss())))

        def on_train_end(self, model):
            events.append(("train_end", None))

    model = Word2Vec(corpus, **small(epochs=3, compute_loss=True, callbacks=[Recorder()]))
    kinds = [k for k, _ in events]
    assert kinds == ["train_begin"] + ["epoch_begin", "epoch_end"] * 3 + ["train_end"]
    ends = [v for k, v in events if k == "epoch_end"]
    assert not np.array_equal(ends[0][0], ends[1][0])  # the vectors at each epoch's end, as trained so far
    np.testing.assert_array_equal(ends[-1][0], model.wv.vectors)
    assert 0 < ends[0][1] < ends[1][1] < ends[2][1]  # the running loss of this train() call
    events.clear()

    class OnlyEpochEnd:
        def on_epoch_end(self, model):
            events.append(("epoch_end", None))

    model.train(corpus, total_examples=model.corpus_count, epochs=2, callbacks=[OnlyEpochEnd()])
    assert [k for k, _ in events] == ["epoch_end"] * 2


def test_loss_is_finite_and_training_is_deterministic():
    corpus = two_topics()
    a = Word2Vec(corpus, **small(compute_loss=True, seed=3))
    b = Word2Vec(corpus, **small(compute_loss=True, seed=3))
    np.testing.assert_array_equal(a.wv.vectors, b.wv.vectors)
    assert math.isfinite(a.get_latest_training_loss())


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw,error,match", [
    (dict(hs=1), NotImplementedError, "hs=1"),
    (dict(hs=1, negative=0), NotImplementedError, "hs=1"),
    (dict(null_word=1), NotImplementedError, "null_word=1"),
    (dict(shrink_windows=False), NotImplementedError, "shrink_windows=False"),
    (dict(negative=0), ValueError, "negative=0"),
    (dict(sg=2), ValueError, "sg must be 0"),
    (dict(hs=2), ValueError, "hs must be 0"),
    (dict(cbow_mean=3), ValueError, "cbow_mean"),
    (dict(sorted_vocab=2), ValueError, "sorted_vocab"),
    (dict(workers=0), ValueError, "workers"),
    (dict(min_count=-1), ValueError, "min_count"),
    (dict(batch_words=0), ValueError, "batch_words"),
    (dict(max_final_vocab=0), ValueError, "max_final_vocab"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=0.01, min_alpha=0.1), ValueError, "min_alpha <= alpha"),
    (dict(sample=-1e-3), ValueError, "sample"),
    (dict(ns_exponent=float("inf")), ValueError, "ns_exponent"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed must be an int >= 0"),
    (dict(hashfxn="md5"), TypeError, "hashfxn"),
    (dict(trim_rule=3), TypeError, "trim_rule"),
    (dict(callbacks=5), TypeError, "callbacks"),
    (dict(callbacks=[object()]), TypeError, "on_epoch_end"),
    (dict(comment=7), TypeError, "comment"),
    (dict(device="tpu"), ValueError, "'cpu' or 'cuda'"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_bad_or_unsupported_options(kw, error, match):
    with pytest.raises(error, match=match):
        Word2Vec(two_topics(20), **dict(small(), **kw))


def test_bad_calls():
    corpus = two_topics(30)
    model = Word2Vec(**small())
    with pytest.raises(RuntimeError, match="build_vocab"):
        model.train(corpus, total_examples=30, epochs=1)
    model.build_vocab(corpus)
    with pytest.raises(NotImplementedError, match="update=True"):
        model.build_vocab(corpus, update=True)
    with pytest.raises(TypeError, match="unexpected keyword argument.*dry_run"):
        model.build_vocab(corpus, dry_run=True)
    with pytest.raises(TypeError, match="unexpected keyword argument.*sentences"):
        model.train(sentences=corpus, epochs=1)
    with pytest.raises(ValueError, match="not both"):
        model.train(corpus, corpus_file="x.txt", epochs=1)
    with pytest.raises(TypeError, match="restartable"):
        model.train((s for s in corpus), total_examples=30, epochs=2)
    model.train((s for s in corpus), total_examples=30, epochs=1)  # one pass: a generator is fine (gensim too)
    with pytest.raises(TypeError, match="corpus_file"):
        model.train("corpus.txt", epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        model.train(corpus, epochs=0)
    with pytest.raises(ValueError, match="total_examples"):
        model.train(corpus, total_examples=-1, epochs=1)
    with pytest.raises(ValueError, match="min_alpha <= alpha"):
        model.train(corpus, epochs=1, start_alpha=0.001, end_alpha=0.01)
    assert model.alpha == 0.025  # a refused call changes nothing
    with pytest.raises(TypeError, match="restartable"):
        Word2Vec((s for s in corpus), **small())  # the constructor reads the corpus epochs + 1 times


def test_out_of_vocabulary_corpus_trains_nothing_and_counts_its_words():
    model = Word2Vec(two_topics(50), **small(epochs=1))
    before = model.wv.vectors.copy()
    assert model.train([["zzz", "yyy"], ["xxx"]], total_examples=2, epochs=2) == (0, 6)
    np.testing.assert_array_equal(model.wv.vectors, before)
    assert model.training_stats[-1]["words"] == 0 and model.training_stats[-1]["raw_words"] == 6
    # a chunk boundary inside the corpus: raw counts still add up, out-of-vocabulary tails included
    chunks = list(w2v.encode_chunks([["a0", "zz"], ["a1"], ["zz", "zz"]], model.key_to_index, 2, with_raw=True))
    assert [c[2] for c in chunks] == [3, 2] and chunks[1][0].numel() == 0
    assert [c[0].tolist() for c in w2v.encode_chunks([["a0"], ["zz"]], model.key_to_index, 5)] == [
        [model.key_to_index["a0"]]]
