"""The C++ word2vec trainer (llmkit._C.word2vec) and llmkit.embeddings.Word2Vec:
one update and a whole chunk (draw for draw) against float64 references, the noise and subsampling
distributions statistically, determinism, learning on a structured corpus,
and bad input."""

import math

import numpy as np
import pytest
import torch

from llmkit import _C
from llmkit.embeddings import word2vec as w2v


def reference_sgns_step(syn0, syn1, context, word, noise, alpha):
    """word2vec.c's skip-gram negative-sampling update in float64."""
    syn0, syn1 = syn0.double().clone(), syn1.double().clone()
    l1 = syn0[context].clone()
    neu1e = torch.zeros_like(l1)
    loss = 0.0
    for target, label in [(word, 1.0)] + [(n, 0.0) for n in noise if n != word]:
        f = float(l1 @ syn1[target])
        sig = 1.0 if f > 6 else 0.0 if f < -6 else 1 / (1 + math.exp(-f))
        z = f if label else -f
        loss += 0.0 if z > 6 else (-z if z < -6 else math.log1p(math.exp(-z)))
        g = (label - sig) * alpha
        neu1e += g * syn1[target]
        syn1[target] += g * l1
    syn0[context] += neu1e
    return syn0, syn1, loss


@pytest.mark.parametrize("dim", [1, 7, 100, 300])
def test_one_update_matches_float64_reference(dim):
    g = torch.Generator().manual_seed(dim)
    syn0 = torch.randn(11, dim, generator=g) * 0.5
    syn1 = torch.randn(11, dim, generator=g) * 0.5
    noise = torch.tensor([3, 5, 2, 5, 9], dtype=torch.int32)  # 2 (the word itself) is skipped, 5 twice
    ref0, ref1, ref_loss = reference_sgns_step(syn0, syn1, 4, 2, noise.tolist(), 0.025)
    loss = _C.word2vec.sgns_step(syn0, syn1, 4, 2, noise, 0.025)
    torch.testing.assert_close(syn0.double(), ref0, rtol=0, atol=1e-6)
    torch.testing.assert_close(syn1.double(), ref1, rtol=0, atol=1e-6)
    assert loss == pytest.approx(ref_loss, rel=1e-5)


def reference_window_step(syn0, syn1, context, word, noise, alpha):
    """pWord2Vec's shared-negatives window update in float64: every context row
    predicts `word` against the same noise words, all from the rows as they were."""
    syn0, syn1 = syn0.double().clone(), syn1.double().clone()
    targets = [word] + [n for n in noise if n != word]
    labels = torch.tensor([1.0] + [0.0] * (len(targets) - 1), dtype=torch.float64)
    inp, out = syn0[context], syn1[targets]
    scores = inp @ out.T
    sig = torch.where(scores > 6, 1.0, torch.where(scores < -6, 0.0, torch.sigmoid(scores)))
    g = (labels - sig) * alpha
    d_in, d_out = g @ out, g.T @ inp
    syn0.index_add_(0, torch.tensor(context), d_in)
    syn1.index_add_(0, torch.tensor(targets), d_out)
    z = torch.where(labels > 0, scores, -scores)
    loss = torch.where(z > 6, 0.0, torch.where(z < -6, -z, torch.log1p(torch.exp(-z)))).sum()
    return syn0, syn1, float(loss)


@pytest.mark.parametrize("dim", [3, 100])
def test_shared_negatives_window_matches_float64_reference(dim):
    g = torch.Generator().manual_seed(dim)
    syn0 = torch.randn(13, dim, generator=g) * 0.3
    syn1 = torch.randn(13, dim, generator=g) * 0.3
    context = [1, 7, 7, 12]  # a repeated context word gets both gradients
    noise = [3, 5, 2, 8]  # 2 is the word: skipped
    ref0, ref1, ref_loss = reference_window_step(syn0, syn1, context, 2, noise, 0.05)
    loss = _C.word2vec.sgns_window_step(syn0, syn1, torch.tensor(context, dtype=torch.int32), 2,
                                        torch.tensor(noise, dtype=torch.int32), 0.05)
    torch.testing.assert_close(syn0.double(), ref0, rtol=0, atol=1e-6)
    torch.testing.assert_close(syn1.double(), ref1, rtol=0, atol=1e-6)
    assert loss == pytest.approx(ref_loss, rel=1e-5)


class _Lcg:
    """word2vec.c's generator as the trainer uses it (word2vec.h)."""

    def __init__(self, seed):
        self.state = seed % 2**64

    def next(self):
        self.state = (self.state * 25214903917 + 11) % 2**64
        return self.state

    def bits32(self):
        return self.next() >> 32


def reference_train_chunk(syn0, syn1, sentences, keep, cum, window, negative, alpha, seed, mode):
    """The whole one-worker trainer in float64, draw for draw: subsampling, the
    shrinking window, noise draws, and each update (mode: "pairs", "shared", "cbow")."""
    syn0, syn1 = syn0.double().clone(), syn1.double().clone()
    rng = _Lcg(seed)
    keep = [int(k) & 0xFFFFFFFF for k in keep]
    cum = [int(c) for c in cum]

    def noise():
        r = rng.bits32() % cum[-1]
        return int(np.searchsorted(cum, r, side="right"))

    for raw in sentences:
        sentence = [w for w in raw if keep[w] == 0xFFFFFFFF or rng.bits32() < keep[w]]
        for pos, word in enumerate(sentence):
            b = rng.next() % window
            lo, hi = max(0, pos - window + b), min(len(sentence) - 1, pos + window - b)
            context = [sentence[c] for c in range(lo, hi + 1) if c != pos]
            if mode == "shared":
                if not context:
                    continue
                drawn = [noise() for _ in range(negative)]
                syn0, syn1, _ = reference_window_step(syn0, syn1, context, word, drawn, alpha)
            elif mode == "pairs":
                for c in context:
                    # The reference step draws nothing: take the draws here, in the trainer's order.
                    drawn = [noise() for _ in range(negative)]
                    syn0, syn1, _ = reference_sgns_step(syn0, syn1, c, word, drawn, alpha)
            else:  # CBOW, gensim's cbow_mean: mean input, error divided by the count
                if not context:
                    continue
                h = syn0[context].mean(0)
                neu1e = torch.zeros_like(h)
                for d in range(negative + 1):
                    target, label = (word, 1.0) if d == 0 else (noise(), 0.0)
                    if d > 0 and target == word:
                        continue
                    f = float(h @ syn1[target])
                    sig = 1.0 if f > 6 else 0.0 if f < -6 else 1 / (1 + math.exp(-f))
                    g = (label - sig) * alpha
                    neu1e += g * syn1[target]
                    syn1[target] += g * h
                for c in context:
                    syn0[c] += neu1e / len(context)
    return syn0, syn1


@pytest.mark.parametrize("mode", ["pairs", "shared", "cbow"])
def test_a_whole_chunk_matches_a_float64_replay(mode):
    """Step by step on a tiny corpus: with one worker, the C++ trainer's result
    equals a float64 re-implementation making the same generator draws."""
    rng = np.random.default_rng(3)
    vocab, dim, window, negative, alpha, seed = 9, 8, 3, 4, 0.05, 12345
    counts = rng.integers(5, 60, vocab)
    sentences = [list(rng.integers(0, vocab, n)) for n in (7, 1, 0, 12, 5, 30)]
    keep = w2v.keep_thresholds(w2v.keep_probabilities(counts, 0.05))  # some words dropped, some always kept
    assert (keep == -1).any() and (keep != -1).any()
    cum = w2v.noise_table(counts)
    g = torch.Generator().manual_seed(0)
    syn0 = (torch.rand(vocab, dim, generator=g) - 0.5)
    syn1 = torch.randn(vocab, dim, generator=g) * 0.3
    ref0, ref1 = reference_train_chunk(syn0, syn1, sentences, keep.tolist(), cum.tolist(), window, negative, alpha,
                                       seed, mode)
    ids, offsets = _chunk(sentences)
    stats = _C.word2vec.train_chunk(syn0, syn1, ids, offsets, keep, cum, window, negative, alpha, alpha, 1, seed,
                                    mode != "cbow", True, True, mode == "shared")
    assert stats["raw_words"] == sum(map(len, sentences))
    assert 0 < stats["trained_words"] < stats["raw_words"]
    torch.testing.assert_close(syn0.double(), ref0, rtol=0, atol=1e-5)
    torch.testing.assert_close(syn1.double(), ref1, rtol=0, atol=1e-5)


@pytest.mark.parametrize("counts", [[7], [5, 0, 0, 3, 0, 1], list(range(1, 3000)), [10**6, 1, 1, 1]],
                         ids=["one-word", "zero-weights", "3000-words", "skewed"])
def test_noise_draws_are_the_upper_bound_of_the_draw(counts):
    """The guide-table sampler returns exactly gensim's answer: the first cum_table entry above the draw."""
    cum = w2v.noise_table(np.array(counts, dtype=np.float64))
    got = _C.word2vec.sample_noise(cum, 20000, 77)
    rng = _Lcg(77)
    draws = np.array([rng.bits32() % int(cum[-1]) for _ in range(20000)])
    expected = np.searchsorted(cum.numpy().astype(np.int64), draws, side="right")
    np.testing.assert_array_equal(got.numpy(), expected)


def test_clipped_sigmoid_beyond_max_exp():
    syn0 = torch.full((3, 4), 2.0)
    syn1 = torch.full((3, 4), 2.0)  # f = 16 > 6: sigma = 1, no update for the true word
    before1 = syn1.clone()
    _C.word2vec.sgns_step(syn0, syn1, 0, 1, torch.tensor([], dtype=torch.int32), 0.1)
    assert torch.equal(syn1, before1)


def test_noise_distribution_is_unigram_to_the_075():
    counts = np.array([5000, 1200, 800, 300, 60, 7, 1])
    table = w2v.noise_table(counts)
    n = 400_000
    draws = _C.word2vec.sample_noise(table, n, 12345).numpy()
    observed = np.bincount(draws, minlength=len(counts)) / n
    expected = counts**0.75 / (counts**0.75).sum()
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(observed - expected) < 4 * se + 1e-9)


def test_keep_probabilities_follow_word2vec_c():
    counts = np.array([100000, 1000, 10, 1])
    sample = 1e-3
    threshold = sample * counts.sum()
    p = w2v.keep_probabilities(counts, sample)
    want = np.minimum(1, (np.sqrt(counts / threshold) + 1) * threshold / counts)
    np.testing.assert_allclose(p, want)
    assert p[-1] == 1.0 and p[0] < 0.4
    assert np.all(w2v.keep_probabilities(counts, 0) == 1)


def _chunk(sentences):
    ids = torch.tensor([w for s in sentences for w in s], dtype=torch.int32)
    offsets = torch.tensor(np.cumsum([0] + [len(s) for s in sentences]), dtype=torch.int64)
    return ids, offsets


def test_subsampling_keeps_the_expected_fraction():
    rng = np.random.default_rng(0)
    counts = np.array([60000, 20000, 5000, 1000])
    words = np.repeat(np.arange(4), counts)
    rng.shuffle(words)
    sentences = [words[i:i + 50].tolist() for i in range(0, len(words), 50)]
    ids, offsets = _chunk(sentences)
    p = w2v.keep_probabilities(counts, 1e-3)
    syn0, syn1 = torch.zeros(4, 8), torch.zeros(4, 8)
    stats = _C.word2vec.train_chunk(syn0, syn1, ids, offsets, w2v.keep_thresholds(p), w2v.noise_table(counts), 2, 1,
                                    0.0, 0.0, 1, 7)
    expected = float((p * counts).sum())
    sd = math.sqrt(float((p * (1 - p) * counts).sum()))
    assert stats["raw_words"] == counts.sum()
    assert abs(stats["trained_words"] - expected) < 4 * sd


def _two_topic_corpus(n_sentences=3000, seed=0):
    rng = np.random.default_rng(seed)
    topics = [[f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]]
    return [list(rng.choice(topics[s % 2], size=12)) for s in range(n_sentences)]


def test_deterministic_with_one_worker_and_a_seed():
    pytest.importorskip("llmkit.embeddings.keyed_vectors")
    corpus = _two_topic_corpus(400)
    kw = dict(vector_size=16, window=3, min_count=1, epochs=2, workers=1, seed=5, progress=False)
    a = w2v.Word2Vec(corpus, **kw)
    b = w2v.Word2Vec(corpus, **kw)
    np.testing.assert_array_equal(a.wv.vectors, b.wv.vectors)
    c = w2v.Word2Vec(corpus, **{**kw, "seed": 6})
    assert not np.array_equal(a.wv.vectors, c.wv.vectors)


@pytest.mark.parametrize("sg,shared", [(1, False), (1, True), (0, False)], ids=["skipgram", "shared-negatives", "cbow"])
def test_learns_topics(sg, shared):
    pytest.importorskip("llmkit.embeddings.keyed_vectors")
    model = w2v.Word2Vec(_two_topic_corpus(), vector_size=20, window=4, min_count=1, epochs=3, workers=2, sg=sg,
                         sample=0, seed=1, progress=False, shared_negatives=shared, compute_loss=True)
    v = model.wv.vectors / np.linalg.norm(model.wv.vectors, axis=1, keepdims=True)
    index = model.key_to_index
    a = v[[index[f"a{i}"] for i in range(10)]]
    b = v[[index[f"b{i}"] for i in range(10)]]
    within = (a @ a.T)[np.triu_indices(10, 1)].mean()
    across = (a @ b.T).mean()
    assert within > across + 0.3, (within, across)
    assert model.training_stats[-1]["words"] == 3 * 3000 * 12
    assert math.isfinite(model.get_latest_training_loss()) and model.get_latest_training_loss() > 0


def test_corpus_file_and_folder(tmp_path):
    pytest.importorskip("llmkit.embeddings.keyed_vectors")
    text = "\n".join(" ".join(s) for s in _two_topic_corpus(200)) + "\n"
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.txt").write_text(text, encoding="utf-8")
    (folder / "y.txt").write_text(text, encoding="utf-8")
    single = w2v.Word2Vec(corpus_file=tmp_path / "one.txt", vector_size=8, min_count=1, epochs=1, progress=False)
    double = w2v.Word2Vec(corpus_file=folder, vector_size=8, min_count=1, epochs=1, progress=False)
    assert single.corpus_total_words * 2 == double.corpus_total_words == 2 * 200 * 12


def test_max_vocab_size_prunes_rare_words():
    """gensim 4.4's prune_vocab: the n-th pruning drops words counted fewer than n times, so the
    first drops nothing and the second the words seen once."""
    rare = [[f"r{i}"] for i in range(30)]
    counts, total, _ = w2v.count_words([["a"] * 50 + ["b"] * 20] + rare, max_vocab_size=10)
    assert total == 100 and counts["a"] == 50 and counts["b"] == 20
    # prunings at r8 (nothing dropped), r9 (r0..r9: count 1 < 2), r18 (r10..r18), r27 (r19..r27)
    assert set(counts) == {"a", "b", "r28", "r29"}
    keep_r3 = lambda w, c, m: w2v.RULE_KEEP if w == "r3" else w2v.RULE_DEFAULT  # noqa: E731
    counts, _, _ = w2v.count_words([["a"] * 50 + ["b"] * 20] + rare, max_vocab_size=10, trim_rule=keep_r3)
    assert set(counts) == {"a", "b", "r3", "r26", "r27", "r28", "r29"}


def test_bad_input(tmp_path):
    corpus = _two_topic_corpus(50)
    with pytest.raises(ValueError, match="empty"):
        w2v.Word2Vec([[]], min_count=1, progress=False)
    with pytest.raises(ValueError, match="vector_size"):
        w2v.Word2Vec(corpus, vector_size=0)
    with pytest.raises(ValueError, match="window"):
        w2v.Word2Vec(corpus, window=0)
    with pytest.raises(ValueError, match="negative"):
        w2v.Word2Vec(corpus, negative=-1)
    with pytest.raises(ValueError, match="min_count"):
        w2v.Word2Vec(corpus, min_count=10**6, progress=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        w2v.Word2Vec(corpus_file=bad, min_count=1, progress=False)
    with pytest.raises(TypeError, match="restartable"):
        w2v.Word2Vec((s for s in corpus), min_count=1, progress=False)
    with pytest.raises(TypeError, match="list of tokens"):
        w2v.Word2Vec(["a plain string"], min_count=1, progress=False)
    with pytest.raises(FileNotFoundError):
        w2v.Word2Vec(corpus_file=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        w2v.Word2Vec(corpus, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            w2v.Word2Vec(corpus, device="cuda")
    elif hasattr(_C.word2vec, "train_chunk_cuda"):
        with pytest.raises(ValueError, match="per-pair loop is CPU only"):
            w2v.Word2Vec(corpus, device="cuda", shared_negatives=False)
    syn0, syn1 = torch.zeros(3, 4), torch.zeros(3, 4)
    ids, offsets = _chunk([[0, 1, 5]])
    with pytest.raises(ValueError, match="outside"):
        _C.word2vec.train_chunk(syn0, syn1, ids, offsets, w2v.keep_thresholds(np.ones(3)),
                                w2v.noise_table(np.ones(3)), 2, 1, 0.01, 0.0, 1, 0)
    ids, offsets = _chunk([[0, 1, 2]])
    keep, noise = w2v.keep_thresholds(np.ones(3)), w2v.noise_table(np.ones(3))
    with pytest.raises(ValueError, match="one entry per vocabulary word"):
        _C.word2vec.sample_noise(torch.zeros(0, dtype=torch.int32), 3, 1)
    for bad, match in [((keep.to("meta"), noise), "keep must be int32 thresholds on the CPU"),
                       ((keep, noise.to("meta")), "cum_table must be a contiguous CPU tensor")]:
        with pytest.raises(ValueError, match=match):
            _C.word2vec.train_chunk(syn0, syn1, ids, offsets, *bad, 2, 1, 0.01, 0.0, 1, 0)
    with pytest.raises(ValueError, match="offsets must be a contiguous 1-D CPU tensor"):
        _C.word2vec.train_chunk(syn0, syn1, ids, offsets.to("meta"), keep, noise, 2, 1, 0.01, 0.0, 1, 0)
    with pytest.raises(ValueError, match="workers must be in"):
        _C.word2vec.train_chunk(syn0, syn1, ids, offsets, keep, noise, 2, 1, 0.01, 0.0, 10**6, 0)


def run_cli(argv):
    """The `llmkit` command's handler for `argv`, exceptions included (the top level turns them into one line)."""
    from llmkit import cli

    args = cli.build_parser().parse_args(argv)
    return args.handler(args)


def test_cli_train_eval_bias(tmp_path, capsys):
    pytest.importorskip("llmkit.embeddings.keyed_vectors")
    import json

    corpus = tmp_path / "corpus.txt"
    pairs = [("she", "he"), ("woman", "man"), ("girl", "boy"), ("mother", "father"), ("her", "his")]
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(600):
        f, m = pairs[rng.integers(len(pairs))]
        lines.append(f"{f} is a nurse and {f} said hello")
        lines.append(f"{m} is a carpenter and {m} said hello")
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out, model_file = tmp_path / "vectors.bin", tmp_path / "w2v.model"
    assert run_cli(["word2vec", "train", "--corpus", str(corpus), "-o", str(out), "--binary", "--min-count", "1",
                    "--vector-size", "16", "--epochs", "2", "--workers", "1", "--model", str(model_file)]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["vocabulary"] == 17 and trained["words"] == 2 * 1200 * 8 and trained["loss_per_example"] > 0
    model = w2v.Word2Vec.load(model_file)
    assert model.sg == 1 and model.wv.index_to_key == trained_keys(out)  # the command's default: skip-gram
    pairs_file = tmp_path / "pairs.tsv"
    pairs_file.write_text("# w1\tw2\tscore\nshe\the\t5\nnurse\tcarpenter\t3\nhello\tsaid\t1\n", encoding="utf-8")
    assert run_cli(["word2vec", "eval", str(out), "--binary", "--pairs", str(pairs_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vocabulary"] == 17 and "spearman" in report
    assert run_cli(["word2vec", "eval", str(model_file), "--pairs", str(pairs_file)]) == 0  # a native model file
    assert json.loads(capsys.readouterr().out) == report
    assert run_cli(["embeddings", "bias", str(out), "--binary", "-n", "2"]) == 0
    text = capsys.readouterr().out
    assert "nurse" in text and "carpenter" in text
    glove_out = tmp_path / "glove.txt"
    assert run_cli(["glove", "train", "--corpus", str(corpus), "--out", str(glove_out), "--min-count", "1",
                    "--vector-size", "8", "--epochs", "3", "--workers", "1", "--window", "4"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["vocabulary"] == 17
    from llmkit.embeddings import KeyedVectors

    kv = KeyedVectors.load_word2vec_format(glove_out)
    assert len(kv) == 17 and kv.vector_size == 8
    with pytest.raises(ValueError, match="x_max must be a positive number"):
        run_cli(["glove", "train", "--corpus", str(corpus), "-o", str(glove_out), "--x-max", "0"])


def trained_keys(path):
    from llmkit.embeddings import KeyedVectors

    return KeyedVectors.load_word2vec_format(path, binary=True).index_to_key


def test_vocabulary_order_and_retraining_match_gensim_conventions():
    gensim = pytest.importorskip("gensim")
    rng = np.random.default_rng(5)
    corpus = [[f"w{i}" for i in rng.integers(0, 60, rng.integers(1, 12))] for _ in range(80)]  # many tied counts
    ours = w2v.Word2Vec(vector_size=4, min_count=2, progress=False).build_vocab(corpus)
    theirs = gensim.models.Word2Vec(vector_size=4, min_count=2)
    theirs.build_vocab(corpus)
    assert ours.wv.index_to_key == theirs.wv.index_to_key
    # train() on another corpus trains on that corpus, not on the cached encoding of the first.
    model = w2v.Word2Vec(corpus, vector_size=4, min_count=2, epochs=1, workers=1, progress=False)
    first = model.training_stats[-1]["words"]
    model.train([corpus[0]] * 3, epochs=1)
    assert model.training_stats[-1]["words"] == 3 * sum(w in model.key_to_index for w in corpus[0]) != first
    with pytest.raises(ValueError, match="after pruning to max_vocab_size=1"):
        w2v.select_vocabulary([["x", "y"], ["z", "w"]], 1, max_vocab_size=1)
