"""llmkit.embeddings: word embeddings (word2vec, GloVe) and what is done with them.

:class:`KeyedVectors` holds trained vectors with gensim's ``KeyedVectors`` API:
``most_similar`` / ``most_similar_cosmul`` analogies, ``similarity``,
``evaluate_word_analogies`` (questions-words.txt) and ``evaluate_word_pairs``
(wordsim353.tsv) with gensim's numbers, and word2vec.c's text and binary files
(``save_word2vec_format`` / ``load_word2vec_format``) that gensim reads and
writes byte for byte. :class:`Word2Vec` trains them on the C++ trainer in
csrc/word2vec/ (or the CUDA one) with gensim 4.4's signature and defaults --
CBOW unless ``sg=1`` -- so gensim call sites run unchanged.
:class:`GloVe` trains GloVe vectors (Stanford's counting and AdaGrad, C++ too).
All three ``save(path)`` to one file (safetensors arrays and JSON metadata,
written atomically, never a pickle) and ``load(path)`` it back; a loaded model
trains further. ``to_gensim()`` / ``from_gensim()`` convert Word2Vec and
KeyedVectors to and from gensim's objects.
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
