"""The shipped English corpus is intact (its word count) and readable both ways."""

from llmkit import data


def test_shipped_corpus_word_count_and_extraction(tmp_path):
    words = sum(len(line.split()) for line in data.english_corpus_lines())
    assert words == data.ENGLISH_CORPUS_WORDS
    path = data.extract_english_corpus(tmp_path / "corpus.txt")
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    assert first.strip() == "EMMA"
    assert not (tmp_path / "corpus.txt.tmp").exists()
