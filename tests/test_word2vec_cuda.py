"""The CUDA word2vec trainer (llmkit._C.word2vec.train_chunk_cuda,
csrc/word2vec/sgns_cuda.cu): chunk statistics, subsampling, learning on a
planted two-topic corpus through Word2Vec(device="cuda"), the loss going down,
the shared-memory and global-scratch paths, parity with the CPU trainer, and
bad input. Skipped without a GPU or a build without CUDA kernels."""

import math

import numpy as np
import pytest
import torch

from llmkit import _C
from llmkit.embeddings import word2vec as w2v

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not hasattr(_C.word2vec, "train_chunk_cuda"),
    reason="needs a CUDA device and a build with the CUDA word2vec trainer")

CUDA = "cuda"


def _chunk(sentences, device=CUDA):
    ids = torch.tensor([w for s in sentences for w in s], dtype=torch.int32)
    offsets = torch.tensor(np.cumsum([0] + [len(s) for s in sentences]), dtype=torch.int64)
    return ids.to(device), offsets.to(device)


def _two_topic_corpus(n_sentences=3000, seed=0):  # tests/test_word2vec.py's planted corpus
    rng = np.random.default_rng(seed)
    topics = [[f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]]
    return [list(rng.choice(topics[s % 2], size=12)) for s in range(n_sentences)]


def _train(syn0, syn1, ids, offsets, counts, sample=0.0, window=5, negative=5, alpha=(0.025, 0.0001), seed=1,
           sg=True, cbow_mean=True, compute_loss=True):
    keep = w2v.keep_thresholds(w2v.keep_probabilities(counts, sample)).to(syn0.device)
    noise = w2v.noise_table(counts).to(syn0.device)
    return _C.word2vec.train_chunk_cuda(syn0, syn1, ids, offsets, keep, noise, window, negative, alpha[0], alpha[1],
                                        seed, sg, cbow_mean, compute_loss)


def _init(vocab, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    syn0 = ((torch.rand(vocab, dim, generator=g) - 0.5) / dim).to(CUDA)
    return syn0, torch.zeros(vocab, dim, device=CUDA)


def _topic_gap(vectors, index):
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    a = v[[index[f"a{i}"] for i in range(10)]]
    b = v[[index[f"b{i}"] for i in range(10)]]
    within = (a @ a.T)[np.triu_indices(10, 1)].mean()
    across = (a @ b.T).mean()
    return within, across


@pytest.mark.parametrize("sg", [True, False], ids=["skipgram", "cbow"])
def test_chunk_stats(sg):
    rng = np.random.default_rng(0)
    vocab = 50
    lengths = [0, 1, 2, 7, 40, 3, 0, 12, 75, 1] * 30  # empty, one-word and multi-piece sentences
    sentences = [rng.integers(0, vocab, size=n).tolist() for n in lengths]
    ids, offsets = _chunk(sentences)
    n = ids.numel()
    counts = np.maximum(np.bincount(ids.cpu().numpy(), minlength=vocab), 1)
    syn0, syn1 = _init(vocab, 32)
    window = 3
    stats = _train(syn0, syn1, ids, offsets, counts, window=window, sg=sg)
    assert set(stats) == {"raw_words", "trained_words", "examples", "loss"}
    assert stats["raw_words"] == n
    assert stats["trained_words"] == n  # sample=0 keeps every word
    centres = sum(n_ for n_ in lengths if n_ >= 2)  # words that have a context
    if sg:  # 1 .. 2 window context words per centre
        assert centres <= stats["examples"] <= 2 * window * centres
    else:  # one example per centre
        assert stats["examples"] == centres
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    assert torch.isfinite(syn0).all() and torch.isfinite(syn1).all()
    assert syn1.abs().sum() > 0  # trained in place
    # The draws are counter-based: the counts repeat with the seed (the loss may
    # differ in the last bits: Hogwild order), and change with another seed.
    again = _train(*_init(vocab, 32), ids, offsets, counts, window=window, sg=sg)
    assert (again["trained_words"], again["examples"]) == (stats["trained_words"], stats["examples"])
    no_loss = _train(*_init(vocab, 32), ids, offsets, counts, window=window, sg=sg, compute_loss=False)
    assert no_loss["loss"] == 0.0


def test_subsampling_keeps_the_expected_fraction():
    rng = np.random.default_rng(0)
    counts = np.array([60000, 20000, 5000, 1000])
    words = np.repeat(np.arange(4), counts)
    rng.shuffle(words)
    sentences = [words[i:i + 50].tolist() for i in range(0, len(words), 50)]
    ids, offsets = _chunk(sentences)
    p = w2v.keep_probabilities(counts, 1e-3)
    syn0, syn1 = torch.zeros(4, 8, device=CUDA), torch.zeros(4, 8, device=CUDA)
    stats = _train(syn0, syn1, ids, offsets, counts, sample=1e-3, window=2, negative=1, alpha=(0.0, 0.0), seed=7)
    expected = float((p * counts).sum())
    sd = math.sqrt(float((p * (1 - p) * counts).sum()))
    assert stats["raw_words"] == counts.sum()
    assert abs(stats["trained_words"] - expected) < 4 * sd


def test_empty_and_trivial_chunks():
    syn0, syn1 = _init(5, 4)
    before = syn0.clone()
    counts = np.ones(5)
    ids, offsets = _chunk([])
    assert _train(syn0, syn1, ids, offsets, counts) == {"raw_words": 0, "trained_words": 0, "examples": 0,
                                                        "loss": 0.0}
    ids, offsets = _chunk([[], [3], [], [1], [4]])  # no sentence with two words: nothing to train
    stats = _train(syn0, syn1, ids, offsets, counts)
    assert (stats["raw_words"], stats["trained_words"], stats["examples"]) == (3, 3, 0)
    assert torch.equal(syn0, before) and not syn1.any()


@pytest.mark.parametrize("dim,window,negative", [(1, 5, 5), (33, 5, 5), (300, 5, 5), (1024, 5, 5), (100, 50, 40),
                                                 (64, 2000, 3)])
def test_shapes_and_paths(dim, window, negative):
    """dim 1024 and (window 50, negative 40) need more scratch per warp than the
    shared-memory path takes: the global-scratch path; window 2000 > any sentence."""
    rng = np.random.default_rng(dim)
    vocab = 200
    sentences = [rng.integers(0, vocab, size=n).tolist() for n in [3, 30, 200, 1, 0, 64] * 5]
    ids, offsets = _chunk(sentences)
    counts = np.maximum(np.bincount(ids.cpu().numpy(), minlength=vocab), 1)
    for sg in (True, False):
        syn0, syn1 = _init(vocab, dim)
        stats = _train(syn0, syn1, ids, offsets, counts, window=window, negative=negative, sg=sg)
        assert stats["examples"] > 0 and math.isfinite(stats["loss"])
        assert torch.isfinite(syn0).all() and torch.isfinite(syn1).all() and syn1.abs().sum() > 0


def test_vocab_of_one_word():
    syn0, syn1 = _init(1, 16)
    ids, offsets = _chunk([[0] * 20, [0, 0]])
    for sg in (True, False):  # every noise draw is the word itself: skipped
        stats = _train(syn0, syn1, ids, offsets, np.array([22]), sg=sg)
        assert stats["examples"] > 0 and torch.isfinite(syn0).all()


@pytest.mark.parametrize("sg", [True, False], ids=["skipgram", "cbow"])
def test_loss_decreases(sg):
    """Two epochs over the planted corpus in ten chunks at a constant rate: the
    loss per example falls from about 6 ln 2 (untrained) to near its floor (~2.1
    on the CPU trainer: the first chunk 3.3 / 4.0, the last 2.1 / 2.0)."""
    corpus = _two_topic_corpus(1000)
    words = sorted({w for s in corpus for w in s})
    index = {w: i for i, w in enumerate(words)}
    encoded = [[index[w] for w in s] for s in corpus]
    counts = np.bincount([w for s in encoded for w in s], minlength=len(words))
    syn0, syn1 = _init(len(words), 20)
    per_example = []
    for epoch in range(2):
        for part in range(10):
            ids, offsets = _chunk(encoded[part * 100:(part + 1) * 100])
            stats = _train(syn0, syn1, ids, offsets, counts, window=4, alpha=(0.025, 0.025), seed=epoch * 10 + part,
                           sg=sg)
            per_example.append(stats["loss"] / stats["examples"])
    assert all(math.isfinite(x) for x in per_example)
    assert per_example[-1] < 0.8 * per_example[0], per_example
    assert np.mean(per_example[10:]) <= np.mean(per_example[:10]), per_example
    assert per_example[-1] < 2.5, per_example


@pytest.mark.parametrize("sg", [1, 0], ids=["skipgram", "cbow"])
def test_learns_topics(sg):
    pytest.importorskip("llmkit.embeddings.keyed_vectors")
    model = w2v.Word2Vec(_two_topic_corpus(), vector_size=20, window=4, min_count=1, epochs=3, sg=sg, sample=0,
                         seed=1, progress=False, device="cuda", compute_loss=True)
    assert isinstance(model.wv.vectors, np.ndarray)  # the vectors come back to the host
    assert np.isfinite(model.wv.vectors).all()
    within, across = _topic_gap(model.wv.vectors, model.key_to_index)
    assert within > across + 0.3, (within, across)
    assert model.training_stats[-1]["words"] == 3 * 3000 * 12
    assert math.isfinite(model.get_latest_training_loss()) and model.get_latest_training_loss() > 0


@pytest.mark.parametrize("sg", [1, 0], ids=["skipgram", "cbow"])
def test_quality_matches_the_cpu_trainer(sg):
    pytest.importorskip("llmkit.embeddings.keyed_vectors")
    corpus = _two_topic_corpus()
    kw = dict(vector_size=20, window=4, min_count=1, epochs=3, sg=sg, sample=0, seed=1, progress=False,
              compute_loss=True)
    cpu = w2v.Word2Vec(corpus, workers=2, shared_negatives=True, **kw)
    gpu = w2v.Word2Vec(corpus, device="cuda", **kw)
    cpu_within, cpu_across = _topic_gap(cpu.wv.vectors, cpu.key_to_index)
    gpu_within, gpu_across = _topic_gap(gpu.wv.vectors, gpu.key_to_index)
    assert gpu_within - gpu_across > (cpu_within - cpu_across) - 0.15, (cpu_within, cpu_across, gpu_within,
                                                                        gpu_across)
    cpu_loss = cpu.training_stats[-1]["loss_per_example"]
    gpu_loss = gpu.training_stats[-1]["loss_per_example"]
    assert gpu_loss == pytest.approx(cpu_loss, rel=0.1)
    assert gpu.training_stats[-1]["examples"] == pytest.approx(cpu.training_stats[-1]["examples"], rel=0.02)


def test_callbacks_see_the_gpu_weights_and_a_saved_model_trains_on(tmp_path):
    """Each epoch end brings the GPU's weights back to .wv / syn1neg for the callbacks; a model
    trained on the GPU saves, loads on the CPU and trains further there."""
    corpus = _two_topic_corpus(600)
    seen = []

    class Snapshot:
        def on_epoch_end(self, model):
            seen.append((model.wv.vectors.copy(), model.syn1neg.clone()))

    model = w2v.Word2Vec(corpus, vector_size=16, window=4, min_count=1, epochs=2, sg=1, seed=1, progress=False,
                         device="cuda", callbacks=[Snapshot()])
    assert len(seen) == 2 and not np.array_equal(seen[0][0], seen[1][0])
    np.testing.assert_array_equal(seen[1][0], model.wv.vectors)
    assert torch.equal(seen[1][1], model.syn1neg) and model.syn1neg.abs().sum() > 0
    model.save(tmp_path / "gpu.model")
    loaded = w2v.Word2Vec.load(tmp_path / "gpu.model")
    np.testing.assert_array_equal(loaded.wv.vectors, model.wv.vectors)
    assert loaded.device.type == "cpu"
    loaded.train(corpus, total_examples=loaded.corpus_count, epochs=1)
    assert np.isfinite(loaded.wv.vectors).all() and not np.array_equal(loaded.wv.vectors, model.wv.vectors)


def test_runs_on_a_side_stream():
    corpus = _two_topic_corpus(200)
    ids, offsets = _chunk([[int(w[1:]) + (10 if w[0] == "b" else 0) for w in s] for s in corpus])
    counts = np.bincount(ids.cpu().numpy(), minlength=20)
    syn0, syn1 = _init(20, 16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        stats = _train(syn0, syn1, ids, offsets, counts)
    torch.cuda.current_stream().wait_stream(stream)
    assert stats["examples"] > 0 and torch.isfinite(syn1).all() and syn1.abs().sum() > 0


def test_bad_input():
    counts = np.ones(3)
    keep = w2v.keep_thresholds(np.ones(3))
    noise = w2v.noise_table(counts)
    syn0, syn1 = _init(3, 4)
    ids, offsets = _chunk([[0, 1, 2]])
    args = (ids, offsets, keep.to(CUDA), noise.to(CUDA), 2, 1, 0.01, 0.0, 0, True, True, False)

    def call(*a):
        return _C.word2vec.train_chunk_cuda(*a)

    with pytest.raises(ValueError, match="on one CUDA device"):  # CPU weights
        call(syn0.cpu(), syn1.cpu(), *args)
    with pytest.raises(ValueError, match="ids must be on"):  # a CPU tensor next to CUDA weights
        call(syn0, syn1, ids.cpu(), *args[1:])
    with pytest.raises(ValueError, match="cum_table must be on"):
        call(syn0, syn1, ids, offsets, keep.to(CUDA), noise, *args[4:])
    with pytest.raises(TypeError, match="int32"):
        call(syn0, syn1, ids.long(), *args[1:])
    with pytest.raises(TypeError, match="float32"):
        call(syn0.double(), syn1.double(), *args)
    with pytest.raises(ValueError, match="same shape"):
        call(syn0, syn1[:, :2].contiguous(), *args)
    with pytest.raises(ValueError, match="contiguous"):
        call(syn0.t(), syn1.t(), *args)
    bad_ids, bad_offsets = _chunk([[0, 1, 5]])
    with pytest.raises(ValueError, match="outside"):
        call(syn0, syn1, bad_ids, bad_offsets, *args[2:])
    with pytest.raises(ValueError, match="start at 0 and end at"):
        call(syn0, syn1, ids, torch.tensor([0, 2], device=CUDA), *args[2:])
    with pytest.raises(ValueError, match="non-decreasing"):
        call(syn0, syn1, ids, torch.tensor([0, 3, 1, 3], device=CUDA), *args[2:])
    with pytest.raises(ValueError, match="window"):
        call(syn0, syn1, ids, offsets, keep.to(CUDA), noise.to(CUDA), 0, 1, 0.01, 0.0, 0, True, True, False)
    with pytest.raises(ValueError, match="negative"):
        call(syn0, syn1, ids, offsets, keep.to(CUDA), noise.to(CUDA), 2, 0, 0.01, 0.0, 0, True, True, False)
    with pytest.raises(ValueError, match="positive"):
        call(syn0, syn1, ids, offsets, keep.to(CUDA), torch.zeros(3, dtype=torch.int32, device=CUDA), *args[4:])
    with pytest.raises(ValueError, match="one threshold per"):
        call(syn0, syn1, ids, offsets, keep[:2].to(CUDA), *args[3:])
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="one CUDA device"):
            call(syn0, syn1.to("cuda:1"), *args)
