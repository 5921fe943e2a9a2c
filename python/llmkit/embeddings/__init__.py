"""llmkit.embeddings: word embeddings (word2vec, GloVe) and what is done with them.

:class:`KeyedVectors` holds trained vectors with gensim's ``KeyedVectors`` API:
``most_similar`` / ``most_similar_cosmul`` analogies, ``similarity``,
``evaluate_word_analogies`` (questions-words.txt) and ``evaluate_word_pairs``
(wordsim353.tsv) with gensim's numbers, and word2vec.c's text and binary files
(``save_word2vec_format`` / ``load_word2vec_format``) that gensim reads and
writes byte for byte. :class:`Word2Vec` trains them (gensim's parameters,
word2vec.c's conventions) on the C++ trainer in csrc/word2vec/.
:class:`GloVe` trains GloVe vectors (Stanford's counting and AdaGrad, C++ too).
:mod:`llmkit.embeddings.bias`: Bolukbasi et al.'s gender direction, extreme
occupations, DirectBias and hard debiasing.
"""

from . import bias
from .glove import GloVe
from .keyed_vectors import CorrelationResult, KeyedVectors
from .word2vec import LineSentence, Word2Vec

__all__ = [
    "KeyedVectors",
    "CorrelationResult",
    "Word2Vec",
    "GloVe",
    "LineSentence",
    "bias",
]
