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


def test_tokenize_words_lowercases_and_drops_punctuation():
    assert data.tokenize_words("The Ship, o'er the SEA -- isn't 1815's!") == \
        ["the", "ship", "o'er", "the", "sea", "isn't", "1815's"]
    assert data.tokenize_words("Café naïve, don\u2019t _under_ Zoë's") == ["café", "naïve", "don't", "under", "zoë's"]
    assert data.tokenize_words("  ,;: --  ") == []


def test_tokenized_corpus_file_is_the_sentences_and_stops_at_max_words(tmp_path):
    path, words = data.write_english_corpus_tokens(tmp_path / "tokens.txt", max_words=3000)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert 3000 <= words < 3000 + max(len(line.split()) for line in lines)
    assert sum(len(line.split()) for line in lines) == words
    expected = []
    for sentence in data.english_corpus_sentences():
        expected.append(" ".join(sentence))
        if len(expected) == len(lines):
            break
    assert lines == expected
    assert all(line == line.lower() and "," not in line for line in lines)
    assert not (tmp_path / "tokens.txt.tmp").exists()
