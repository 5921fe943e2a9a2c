"""Pretraining data: documents from sources, tokenizer training, tokenized shards and their cache."""

import bz2
import gzip
import json
import lzma
import pickle

import numpy as np
import pytest

from llmkit.data import (ENGLISH_CORPUS, TokenizedCorpus, TokenShards, iter_documents, prepare_corpus,
                         tokenize_corpus, train_tokenizer)
from llmkit.data import shards as shards_module
from llmkit.data.tokenizer import Tokenizer

# Paragraphs separated by blank lines; one of the separating lines holds only spaces.
TEXT = ("The first paragraph has\ntwo lines.\n\nThe second paragraph.\n\n\n   \n"
        "Third one, after several blank lines\n(one of them only spaces).\n")

WORDS = ("the ship sailed over the grey sea while the captain watched the clouds gather and the crew "
         "sang old songs about home harbours rivers mountains and distant cities").split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))).capitalize() + "."
            for _ in range(n)]


def write_text(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("src") / "corpus.txt", make_documents(300))


@pytest.fixture(scope="module")
def bpe(corpus_file):
    return train_tokenizer(corpus_file, vocab_size=400, progress=False)


# ------------------------------------------------------------------ sources --
def test_text_paragraphs(tmp_path):
    file = tmp_path / "a.txt"
    file.write_text(TEXT)
    assert list(iter_documents(file)) == ["The first paragraph has\ntwo lines.", "The second paragraph.",
                                          "Third one, after several blank lines\n(one of them only spaces)."]
    assert list(iter_documents(str(file), max_documents=2)) == list(iter_documents(file))[:2]


def test_jsonl_and_compressed(tmp_path):
    records = [{"text": "alpha beta", "id": 1}, {"text": "gamma\n\ndelta"}, {"text": "   "}]
    lines = "\n".join(json.dumps(r) for r in records) + "\n\n"
    (tmp_path / "d.jsonl").write_text(lines)
    assert list(iter_documents(tmp_path / "d.jsonl")) == ["alpha beta", "gamma\n\ndelta"]  # blank text skipped
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(lines)
    assert list(iter_documents(tmp_path / "d.jsonl.gz")) == ["alpha beta", "gamma\n\ndelta"]
    with lzma.open(tmp_path / "t.md.xz", "wt") as f:
        f.write(TEXT)
    with bz2.open(tmp_path / "t.txt.bz2", "wt") as f:
        f.write(TEXT)
    assert list(iter_documents(tmp_path / "t.md.xz")) == list(iter_documents(tmp_path / "t.txt.bz2"))
    assert len(list(iter_documents(tmp_path / "t.md.xz"))) == 3


def test_folder_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z")
    (tmp_path / "a.md").write_text("from a\n\nsecond of a")
    (tmp_path / "c.jsonl").write_text('{"text": "from c"}\n')
    (tmp_path / "notes.csv").write_text("skipped,not,a,document")
    (tmp_path / ".hidden.txt").write_text("skipped too")
    assert list(iter_documents(tmp_path)) == ["from a", "second of a", "from b/z", "from c"]


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iter_documents(tmp_path / "missing.txt")  # raised at the call, before iterating
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="empty corpus"):
        iter_documents(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="empty corpus"):
        list(iter_documents(tmp_path / "blank.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*\"text\""):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "bad2.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad2\.jsonl:1: .*must be a string"):
        list(iter_documents(tmp_path / "bad2.jsonl"))
    (tmp_path / "bad3.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad3\.jsonl:2: not valid JSON"):
        list(iter_documents(tmp_path / "bad3.jsonl"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        list(iter_documents(tmp_path / "latin1.txt"))
    with pytest.raises(ValueError, match="max_documents"):
        iter_documents(None, max_documents=0)


def test_builtin_corpus_documents():
    docs = list(iter_documents(None, max_documents=5))
    assert ENGLISH_CORPUS.name.endswith(".xz") and len(docs) == 5
    assert docs[0] == "EMMA" and all(d.strip() for d in docs)


# ---------------------------------------------------------------- tokenizer --
def test_train_bpe_defaults(bpe, tmp_path):
    assert [bpe.id_to_token(i) for i in range(5)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert (bpe.bos_token_id, bpe.pad_token_id, bpe.eos_token_id, bpe.unk_token_id, bpe.mask_token_id) == \
        (0, 1, 2, 3, 4)
    assert bpe.cls_token == "<s>" and bpe.sep_token == "</s>"
    assert 300 < bpe.vocab_size <= 400  # fewer when the tiny corpus runs out of merges
    text = "The captain watched the ship, Zürich 42!"  # unseen characters: byte-level, no <unk>
    ids = bpe.encode(text, add_special_tokens=False)
    assert bpe.unk_token_id not in ids and bpe.decode(ids) == text
    assert bpe.encode(text) == [0] + ids + [2]
    assert len(bpe.encode("the sea")) < len("the sea") + 2  # merges were learned


def test_train_wordpiece(corpus_file):
    wp = train_tokenizer(corpus_file, vocab_size=300, kind="wordpiece", progress=False)
    assert [wp.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (wp.pad_token_id, wp.unk_token_id, wp.cls_token_id, wp.sep_token_id, wp.mask_token_id) == \
        (0, 1, 2, 3, 4)
    assert wp.bos_token is None and wp.vocab_size <= 300
    ids = wp.encode("The Ship sailed", add_special_tokens=False)
    assert wp.decode(ids) == "the ship sailed"  # lowercased by default
    assert wp.encode("The Ship sailed") == [2] + ids + [3]
    pair = wp.backend.encode("the sea", "home").tokens
    assert pair[0] == "[CLS]" and pair.count("[SEP]") == 2 and pair[-1] == "[SEP]"
    cased = train_tokenizer(corpus_file, vocab_size=300, kind="wordpiece", lowercase=False, progress=False)
    assert cased.decode(cased.encode("The")).startswith("T")


def test_sentinels_and_custom_special_tokens(corpus_file):
    tok = train_tokenizer(corpus_file, vocab_size=400, sentinels=3, progress=False,
                          special_tokens={"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})
    assert [tok.id_to_token(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    top = tok.vocab_size - 1
    assert [tok.token_to_id(f"<extra_id_{i}>") for i in range(3)] == [top, top - 1, top - 2]
    assert tok.vocab_size <= 400  # the sentinels count in vocab_size
    ids = tok.encode("the sea <extra_id_1> home", add_special_tokens=False)
    assert top - 1 in ids  # a sentinel is one special token, never split
    assert tok.encode("the sea")[-1] == tok.eos_token_id  # no bos/cls: only </s> appended


def test_train_tokenizer_errors(corpus_file, tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(corpus_file, vocab_size=260, progress=False)  # 5 special + 256 bytes > 260
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(corpus_file, vocab_size=8, kind="wordpiece", sentinels=4, progress=False)
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(corpus_file, kind="unigram", progress=False)
    with pytest.raises(ValueError, match="role"):
        train_tokenizer(corpus_file, special_tokens={"start": "<s>"}, progress=False)
    with pytest.raises(ValueError, match="unk_token"):
        train_tokenizer(corpus_file, kind="wordpiece", special_tokens={"pad_token": "[PAD]"}, progress=False)
    with pytest.raises(FileNotFoundError):
        train_tokenizer(tmp_path / "nope.txt", progress=False)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_tokenizer_round_trip_and_transformers(kind, corpus_file, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer(corpus_file, vocab_size=400, kind=kind, sentinels=2, progress=False)
    tok.save(tmp_path / "tok")
    loaded = Tokenizer.from_file(tmp_path / "tok")
    assert loaded.special_tokens == tok.special_tokens and loaded.vocab_size == tok.vocab_size
    assert loaded.backend.to_str() == tok.backend.to_str()
    texts = ["The captain sang about distant cities.", "grey sea <extra_id_0> rivers"]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    hf_dir = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    for text in texts:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert loaded.encode(text, add_special_tokens=special) == ids
            assert hf(text, add_special_tokens=special)["input_ids"] == ids
            assert hf_dir(text, add_special_tokens=special)["input_ids"] == ids
    assert hf_dir.mask_token_id == tok.mask_token_id and hf_dir.pad_token_id == tok.pad_token_id


def test_train_on_shipped_corpus_prefix():
    tok = train_tokenizer(None, vocab_size=1000, max_documents=2000, progress=False)
    ids = tok.encode("Emma Woodhouse, handsome, clever, and rich", add_special_tokens=False)
    assert tok.decode(ids) == "Emma Woodhouse, handsome, clever, and rich"
    assert len(ids) < 15  # the novel's words are merged into few tokens


# ------------------------------------------------------------------- shards --
def test_tokenize_corpus_matches_direct_encoding(bpe, corpus_file, tmp_path):
    docs = list(iter_documents(corpus_file))
    corpus = tokenize_corpus(corpus_file, bpe, tmp_path / "c", val_fraction=0.1, shard_tokens=97, progress=False)
    expected = [bpe.encode(d, add_special_tokens=False) for d in docs]
    val = [i for i in range(len(docs)) if shards_module._is_val(i, 0, 0.1)]
    assert 10 <= len(val) <= 60 and corpus.val.n_docs == len(val)
    assert corpus.train.n_docs + corpus.val.n_docs == len(docs)
    train = [i for i in range(len(docs)) if i not in set(val)]
    for split, indices in ((corpus.train, train), (corpus.val, val)):
        assert [split.document(k).tolist() for k in range(split.n_docs)] == [expected[i] for i in indices]
        assert split.tokens(0, split.n_tokens).tolist() == sum((expected[i] for i in indices), [])
        assert split.doc_starts[0] == 0 and split.doc_starts[-1] == split.n_tokens
        assert split.doc_starts.dtype == np.int64
    meta = corpus.meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == bpe.vocab_size
    assert meta["splits"]["train"]["n_tokens"] == corpus.train.n_tokens
    files = meta["splits"]["train"]["shards"]
    assert len(files) == -(-corpus.train.n_tokens // 97) and all(f["n_tokens"] == 97 for f in files[:-1])
    assert (tmp_path / "c" / files[0]["file"]).stat().st_size == 97 * 2  # raw uint16
    reopened = TokenizedCorpus.open(tmp_path / "c")
    state = pickle.dumps(reopened.train)
    assert len(state) < 2 * reopened.train.n_tokens  # the files' names, not their tokens
    assert pickle.loads(state).tokens(0, 500).tolist() == corpus.train.tokens(0, 500).tolist()
    assert reopened.train.tokens(90, 300).tolist() == corpus.train.tokens(90, 300).tolist()
    assert reopened.tokenizer.encode("the sea") == bpe.encode("the sea")
    assert reopened.meta["tokenizer_sha256"] == shards_module.tokenizer_sha256(bpe)
    # the same seed gives the same split, another seed another
    other = tokenize_corpus(corpus_file, bpe, tmp_path / "d", val_fraction=0.1, seed=1, progress=False)
    assert other.val.n_docs + other.train.n_docs == len(docs)
    assert other.val.tokens(0, other.val.n_tokens).tolist() != corpus.val.tokens(0, corpus.val.n_tokens).tolist()


def test_val_never_empty(bpe, tmp_path):
    src = write_text(tmp_path / "two.txt", ["the sea", "the ship"])
    corpus = tokenize_corpus(src, bpe, tmp_path / "c", val_fraction=1e-9, progress=False)
    assert (corpus.train.n_docs, corpus.val.n_docs) == (1, 1)
    assert corpus.val.document(0).tolist() == bpe.encode("the ship", add_special_tokens=False)
    one = write_text(tmp_path / "one.txt", ["the sea"])
    corpus = tokenize_corpus(one, bpe, tmp_path / "o", val_fraction=0.9, progress=False)
    assert (corpus.train.n_docs, corpus.val.n_docs) == (1, 0) and corpus.val.n_tokens == 0
    many = write_text(tmp_path / "many.txt", make_documents(20))
    corpus = tokenize_corpus(many, bpe, tmp_path / "m", val_fraction=0.9, progress=False)
    assert corpus.train.n_docs >= 1 and corpus.train.n_docs + corpus.val.n_docs == 20


def test_atomic_write_and_overwrite(bpe, corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "c"
    real_save = Tokenizer.save

    def failing_save(self, directory):  # the shards are written; crash before meta.json
        raise RuntimeError("interrupted")

    monkeypatch.setattr(Tokenizer, "save", failing_save)
    with pytest.raises(RuntimeError, match="interrupted"):
        tokenize_corpus(corpus_file, bpe, out, shard_tokens=50, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half corpus, no temp left behind
    monkeypatch.setattr(Tokenizer, "save", real_save)
    first = tokenize_corpus(corpus_file, bpe, out, progress=False)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(Tokenizer, "save", failing_save)
    with pytest.raises(RuntimeError):
        tokenize_corpus(corpus_file, bpe, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before  # the old corpus is untouched
    monkeypatch.setattr(Tokenizer, "save", real_save)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tokenize_corpus(corpus_file, bpe, out, progress=False)
    again = tokenize_corpus(corpus_file, bpe, out, overwrite=True, seed=5, progress=False)
    assert again.meta["seed"] == 5 and first.meta["seed"] == 0
    (tmp_path / "empty").mkdir()
    assert tokenize_corpus(corpus_file, bpe, tmp_path / "empty", progress=False).train.n_docs > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "empty"]


def test_open_errors(bpe, corpus_file, tmp_path):
    with pytest.raises(FileNotFoundError):
        TokenizedCorpus.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a tokenized corpus"):
        TokenizedCorpus.open(tmp_path / "plain")
    corpus = tokenize_corpus(corpus_file, bpe, tmp_path / "c", shard_tokens=1000, progress=False)
    shard = tmp_path / "c" / corpus.meta["splits"]["train"]["shards"][-1]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    with pytest.raises(ValueError, match="damaged"):
        TokenizedCorpus.open(tmp_path / "c")
    with pytest.raises(ValueError, match="val_fraction"):
        tokenize_corpus(corpus_file, bpe, tmp_path / "x", val_fraction=1.0, progress=False)


def test_token_shards_across_files():
    shards = TokenShards([np.arange(0, 5, dtype=np.uint16), np.arange(5, 7, dtype=np.uint16),
                          np.arange(7, 12, dtype=np.uint16)], [0, 3, 9, 12], vocab_size=100)
    assert shards.n_tokens == 12 and shards.n_docs == 3
    for start in range(13):
        for end in range(start, 13):
            assert shards.tokens(start, end).tolist() == list(range(start, end))
    assert shards.tokens(4, 8).dtype == np.int64
    assert shards.document(1).tolist() == list(range(3, 9)) and shards.document(-1).tolist() == [9, 10, 11]
    with pytest.raises(IndexError):
        shards.tokens(5, 13)
    with pytest.raises(IndexError):
        shards.document(3)
    with pytest.raises(ValueError, match="doc_starts"):
        TokenShards([np.arange(5)], [0, 4], vocab_size=10)


def test_from_documents():
    docs = [[5, 6, 7], [], [8], list(range(10))]
    shards = TokenShards.from_documents(docs, vocab_size=70000)
    assert shards.dtype == np.uint32 and TokenShards.from_documents(docs, 65536).dtype == np.uint16
    assert shards.doc_starts.tolist() == [0, 3, 3, 4, 14]
    assert [shards.document(i).tolist() for i in range(4)] == docs
    out = shards.tokens(0, 14)
    out[0] = 99  # a copy
    assert shards.tokens(0, 1).tolist() == [5]
    assert pickle.loads(pickle.dumps(shards)).tokens(0, 14).tolist() == sum(docs, [])
    empty = TokenShards.from_documents([], vocab_size=10)
    assert (empty.n_tokens, empty.n_docs) == (0, 0) and empty.tokens(0, 0).tolist() == []
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        TokenShards.from_documents([[3, 10]], vocab_size=10)


def test_prepare_corpus_cache(bpe, corpus_file, tmp_path, monkeypatch):
    first = prepare_corpus(corpus_file, bpe, tmp_path / "cache", progress=False)
    assert first.path.parent == tmp_path / "cache" and first.path.name.startswith("corpus-")
    calls = []
    monkeypatch.setattr(shards_module, "tokenize_corpus", lambda *a, **k: calls.append(a))
    second = prepare_corpus(corpus_file, bpe, tmp_path / "cache", progress=False)
    assert calls == [] and second.path == first.path  # reused, not tokenized again
    assert second.train.tokens(0, 50).tolist() == first.train.tokens(0, 50).tolist()
    assert second.tokenizer is bpe
    monkeypatch.undo()
    # a changed source, seed or tokenizer is another corpus
    assert prepare_corpus(corpus_file, bpe, tmp_path / "cache", seed=3, progress=False).path != first.path
    wp = train_tokenizer(corpus_file, vocab_size=300, kind="wordpiece", progress=False)
    assert prepare_corpus(corpus_file, wp, tmp_path / "cache", progress=False).path != first.path
    write_text(corpus_file.parent / "other.txt", make_documents(5, seed=1))
    assert prepare_corpus(corpus_file.parent / "other.txt", bpe, tmp_path / "cache",
                          progress=False).path != first.path
    # LLMKIT_CACHE moves the default cache; a damaged entry is rebuilt
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "env"))
    env = prepare_corpus(corpus_file, bpe, progress=False)
    assert env.path.parent == tmp_path / "env" / "corpora"
    (env.path / "meta.json").unlink()
    rebuilt = prepare_corpus(corpus_file, bpe, progress=False)
    assert rebuilt.path == env.path and rebuilt.train.n_tokens == first.train.n_tokens
