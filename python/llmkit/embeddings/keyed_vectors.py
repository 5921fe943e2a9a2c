"""Trained word vectors with gensim's ``KeyedVectors`` API, on numpy.

:class:`KeyedVectors` is what a trained word2vec model hands back
(``Word2Vec(...).wv`` in gensim): a vocabulary (``index_to_key``,
``key_to_index``), a float32 matrix (``vectors``, one row a key) and per-key
attributes such as ``count``. It follows gensim 4.4 method by method:

- queries: ``most_similar`` (3CosAdd), ``most_similar_cosmul`` (3CosMul),
  ``similarity``, ``n_similarity``, ``distance(s)``, ``doesnt_match``,
  ``similar_by_vector``, ``closer_than``, ``rank``; the same float32
  arithmetic in the same order, so the numbers equal gensim's;
- evaluation: ``evaluate_word_analogies`` (questions-words.txt) and
  ``evaluate_word_pairs`` (wordsim353.tsv, simlex999.txt), with gensim's
  rules for restrict_vocab, case folding and out-of-vocabulary questions;
- files: ``save_word2vec_format`` / ``load_word2vec_format``, the text and
  binary formats of word2vec.c, byte for byte what gensim writes; ``save`` /
  ``load`` (gensim's names), llmkit's own single file (safetensors arrays and
  JSON metadata, never a pickle; ``mmap="r"`` maps the vectors read-only);
  every save atomic (``llmkit.utils.atomic_write``);
- gensim objects: ``to_gensim()`` / ``from_gensim()``.

Where gensim silently does something odd, this class raises instead (unknown
keys in ``n_similarity``, negative ``topn``, malformed files); each such place
says so in its docstring.
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from collections import Counter
from numbers import Integral
from typing import NamedTuple

import numpy as np

from llmkit.utils import atomic_write, get_logger, optional

from . import _storage

logger = get_logger(__name__)

REAL = np.float32
_KEY_TYPES = (str, int, np.integer)
_LE_FLOAT32 = np.dtype("<f4")  # word2vec.c and gensim write native floats; every platform they run on is little-endian


class CorrelationResult(NamedTuple):
    """A correlation and its two-sided p-value; ``r[0]``, ``r[1]`` work as on scipy's results."""

    statistic: float
    pvalue: float

    @property
    def correlation(self) -> float:
        """scipy's ``SpearmanrResult.correlation`` name for the statistic."""
        return self.statistic


# --------------------------------------------------------------------------------------------------
# small helpers shared by the queries


def _to_numpy(value):
    """Torch tensors become numpy arrays (CPU, detached); anything else is returned as is."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def _ensure_list(value) -> list:
    """gensim's ``_ensure_list``: a single key or 1-D vector becomes ``[value]``, a 2-D array its rows."""
    value = _to_numpy(value)
    if value is None:
        return []
    if isinstance(value, _KEY_TYPES) or (isinstance(value, np.ndarray) and value.ndim == 1):
        return [value]
    if isinstance(value, np.ndarray) and value.ndim == 2:
        return list(value)
    return [_to_numpy(v) for v in value]


def _unitvec(vec: np.ndarray) -> np.ndarray:
    """gensim's ``matutils.unitvec`` for a dense vector: norm and scaling in float64 (BLAS dnrm2 and
    dscal there), the result cast back to the input dtype; a zero vector comes back unchanged."""
    if vec.size == 0:
        return vec
    vec64 = vec.astype(np.float64)
    veclen = math.sqrt(float(np.dot(vec64, vec64)))
    if veclen > 0.0:
        return (vec64 * (1.0 / veclen)).astype(vec.dtype)
    return vec


def _unitvec_rows(mat: np.ndarray) -> np.ndarray:
    """:func:`_unitvec` applied to every row of `mat` at once."""
    mat64 = mat.astype(np.float64)
    veclen = np.sqrt(np.einsum("ij,ij->i", mat64, mat64))
    scale = np.ones_like(veclen)
    nonzero = veclen > 0.0
    scale[nonzero] = 1.0 / veclen[nonzero]
    out = (mat64 * scale[:, None]).astype(mat.dtype)
    out[~nonzero] = mat[~nonzero]
    return out


def _top_indices(x: np.ndarray, topn: int) -> np.ndarray:
    """Indices of the `topn` largest values of `x`, largest first: gensim's
    ``matutils.argsort(x, topn, reverse=True)`` (argpartition, then a sort of the few)."""
    x = -np.asarray(x)
    if topn >= x.size:
        return np.argsort(x)[:topn]
    part = np.argpartition(x, topn)[:topn]
    return part.take(np.argsort(x.take(part)))


def _top_indices_rows(x: np.ndarray, topn: int) -> np.ndarray:
    """:func:`_top_indices` for every row of a 2-D array."""
    x = -x
    if topn >= x.shape[1]:
        return np.argsort(x, axis=1)[:, :topn]
    part = np.argpartition(x, topn, axis=1)[:, :topn]
    order = np.argsort(np.take_along_axis(x, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _check_topn(topn) -> None:
    if topn is None:
        return
    if not isinstance(topn, Integral):
        raise TypeError(f"topn must be an int or None (all similarities), got {type(topn).__name__}")
    if topn < 0:
        raise ValueError(f"topn must be >= 0 (or None for all similarities), got {topn}")


def _fold(key, case_insensitive: bool):
    return key.upper() if case_insensitive and isinstance(key, str) else key


# --------------------------------------------------------------------------------------------------
# correlations for evaluate_word_pairs: scipy when present (what gensim calls), else the same
# formulas in numpy


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return math.exp(log_front) * h / a


def _rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (scipy.stats.rankdata, method='average')."""
    sorter = np.argsort(a, kind="mergesort")
    inv = np.empty(sorter.size, dtype=np.intp)
    inv[sorter] = np.arange(sorter.size)
    a_sorted = a[sorter]
    first = np.r_[True, a_sorted[1:] != a_sorted[:-1]]
    dense = first.cumsum()[inv]
    bounds = np.r_[np.nonzero(first)[0], first.size]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def _pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    xm, ym = x - x.mean(), y - y.mean()
    nx, ny = np.linalg.norm(xm), np.linalg.norm(ym)
    if nx == 0.0 or ny == 0.0:
        return math.nan  # scipy: constant input has no correlation
    return float(np.clip(np.dot(xm / nx, ym / ny), -1.0, 1.0))


def _pearsonr_numpy(x, y) -> CorrelationResult:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.size
    r = _pearson_r(x, y)
    if math.isnan(r):
        return CorrelationResult(math.nan, math.nan)
    if n == 2:
        return CorrelationResult(float(round(r)), 1.0)
    ab = n / 2.0 - 1.0  # under H0, (r + 1) / 2 ~ Beta(n/2 - 1, n/2 - 1)
    return CorrelationResult(r, min(1.0, 2.0 * _betainc(ab, ab, (1.0 - abs(r)) / 2.0)))


def _spearmanr_numpy(x, y) -> CorrelationResult:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.isnan(x).any() or np.isnan(y).any():
        return CorrelationResult(math.nan, math.nan)
    r = _pearson_r(_rankdata(x), _rankdata(y))
    if math.isnan(r):
        return CorrelationResult(math.nan, math.nan)
    df = x.size - 2
    if df <= 0 or abs(r) == 1.0:
        return CorrelationResult(r, 0.0 if df > 0 else math.nan)
    t2 = r * r * df / ((r + 1.0) * (1.0 - r))  # Student t with n - 2 degrees of freedom
    return CorrelationResult(r, _betainc(df / 2.0, 0.5, df / (df + t2)))


def _correlations(gold, model) -> tuple[CorrelationResult, CorrelationResult]:
    stats = optional("scipy.stats")  # scipy is optional (llmkit[embeddings]): the same formulas in numpy without it
    if stats is None:
        return _pearsonr_numpy(gold, model), _spearmanr_numpy(gold, model)
    pearson = stats.pearsonr(gold, model)
    spearman = stats.spearmanr(gold, model)
    return (CorrelationResult(float(pearson[0]), float(pearson[1])),
            CorrelationResult(float(spearman[0]), float(spearman[1])))


# --------------------------------------------------------------------------------------------------
# files


def _decode(raw: bytes, encoding: str, errors: str, what: str) -> str:
    try:
        return raw.decode(encoding, errors=errors)
    except UnicodeDecodeError as e:
        raise UnicodeDecodeError(
            e.encoding, e.object, e.start, e.end,
            f"{e.reason} ({what}; pass unicode_errors='replace' or 'ignore' to load it anyway)") from None


def _parse_header(raw: bytes, fname, encoding: str) -> tuple[int, int]:
    fields = raw.decode(encoding, errors="replace").split()
    try:
        vocab_size, vector_size = (int(f) for f in fields)
    except ValueError:
        raise ValueError(f"{fname}: the first line should be the header 'vocab_size vector_size', got {raw[:80]!r}"
                         " (a file without a header loads with no_header=True)") from None
    if vocab_size < 0 or vector_size <= 0:
        raise ValueError(f"{fname}: header declares {vocab_size} vectors of size {vector_size}")
    return vocab_size, vector_size


def _read_text_rows(fin, fname, n, vector_size, first_line_no, encoding, unicode_errors):
    """Yield (word, float32 row) for `n` lines of word2vec text format: ``word v1 ... vD``.
    Like gensim: trailing whitespace dropped (word2vec.c writes a space before the newline), fields
    split on single spaces, numbers parsed as float64 then rounded to float32."""
    for i in range(n):
        line = fin.readline()
        line_no = first_line_no + i
        if not line:
            raise ValueError(f"{fname}: header declares {n} vectors but the file ends after {i} "
                             "(truncated file or wrong header)")
        parts = _decode(line.rstrip(), encoding, unicode_errors, f"line {line_no} of {fname}").split(" ")
        if len(parts) != vector_size + 1:
            raise ValueError(f"{fname}, line {line_no}: expected a word and {vector_size} numbers, "
                             f"got {len(parts) - 1} numbers")
        try:
            row = np.array([float(v) for v in parts[1:]], dtype=np.float64).astype(REAL)
        except ValueError as e:
            raise ValueError(f"{fname}, line {line_no}: {e}") from None
        yield parts[0], row


def _read_binary_rows(fin, fname, n, vector_size, encoding, unicode_errors, chunk_size=1 << 20):
    """Yield (word, float32 row) for `n` entries of word2vec binary format: ``word`` + space +
    `vector_size` little-endian float32, with or without the newline word2vec.c writes after each
    vector (gensim's reader drops newlines before a word too)."""
    row_bytes = vector_size * 4
    buf, start = b"", 0
    for i in range(n):
        while True:
            space = buf.find(b" ", start)
            if space != -1 and len(buf) - (space + 1) >= row_bytes:
                break
            more = fin.read(chunk_size)
            if not more:
                raise ValueError(f"{fname}: header declares {n} vectors but the file ends "
                                 f"inside vector #{i + 1} (of size {vector_size}; truncated file or wrong header)")
            buf, start = buf[start:] + more, 0
        word = _decode(buf[start:space].lstrip(b"\n"), encoding, unicode_errors, f"word #{i + 1} of {fname}")
        row = np.frombuffer(buf, dtype=_LE_FLOAT32, count=vector_size, offset=space + 1).astype(REAL)
        start = space + 1 + row_bytes
        yield word, row
    # what is left after the last vector goes back to the caller through the generator's return value
    return buf[start:]


def _check_no_more_rows(fin, leftover: bytes, fname, vocab_size: int) -> None:
    """Only whitespace may follow the rows the header declared (gensim ignores the rest; a header
    that undercounts is a damaged file, so say so)."""
    data = leftover
    while not data.strip():
        data = fin.read(1 << 16)
        if not data:
            return
    raise ValueError(f"{fname}: header declares {vocab_size} vectors but the file holds more "
                     "(wrong header, or pass limit= to read only the first ones)")


# --------------------------------------------------------------------------------------------------


class KeyedVectors:
    """Word vectors and their vocabulary, as gensim's ``KeyedVectors`` (``Word2Vec(...).wv``).

    ``index_to_key[i]`` is the key of row ``vectors[i]`` (float32, shape ``(len(self),
    vector_size)``) and ``key_to_index`` the inverse map. Keys are strings (ints are accepted, and an
    int that is not a key is taken as a row index, as in gensim). Per-key attributes live in
    ``expandos`` and are read and written with :meth:`get_vecattr` / :meth:`set_vecattr`; a trained
    model stores ``count`` there, with the vocabulary sorted by descending count as gensim and
    word2vec.c do (:meth:`sort_by_descending_frequency`).

    Example::

        kv = KeyedVectors(100)
        kv.add_vectors(["king", "queen", "man", "woman"], vectors)   # vectors: (4, 100)
        kv.most_similar(positive=["king", "woman"], negative=["man"], topn=1)
        kv.save_word2vec_format("vectors.bin", binary=True)
    """

    def __init__(self, vector_size: int):
        if not isinstance(vector_size, Integral) or vector_size <= 0:
            raise ValueError(f"vector_size must be a positive int, got {vector_size!r}")
        self.vector_size = int(vector_size)
        self.index_to_key: list = []
        self.key_to_index: dict = {}
        self._vectors = np.zeros((0, self.vector_size), dtype=REAL)
        self.norms: np.ndarray | None = None  # cached row norms, dropped whenever vectors change
        self.expandos: dict[str, np.ndarray] = {}

    # ---------------------------------------------------------------- storage

    @property
    def vectors(self) -> np.ndarray:
        """The float32 matrix, one row per key in ``index_to_key`` order."""
        return self._vectors

    @vectors.setter
    def vectors(self, value) -> None:
        value = np.ascontiguousarray(_to_numpy(value), dtype=REAL)
        if value.ndim != 2 or value.shape[1] != self.vector_size:
            raise ValueError(f"vectors must have shape (n, {self.vector_size}), got {value.shape}")
        self._vectors = value
        self.norms = None

    def __len__(self) -> int:
        return len(self.index_to_key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}<vector_size={self.vector_size}, {len(self)} keys>"

    def get_index(self, key, default=None) -> int:
        """Row of `key`; an int that is not a key but is in range is its own index (gensim). Raises
        ``KeyError("Key 'word' not present in vocabulary")`` when `key` is unknown and no default is given."""
        index = self.key_to_index.get(key, -1)
        if index >= 0:
            return index
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and 0 <= key < len(self.index_to_key):
            return int(key)
        if default is not None:
            return default
        raise KeyError(f"Key '{key}' not present in vocabulary")

    def has_index_for(self, key) -> bool:
        return self.get_index(key, -1) >= 0

    def __contains__(self, key) -> bool:
        return self.has_index_for(key)

    def get_vector(self, key, norm: bool = False) -> np.ndarray:
        """The (read-only) vector of `key`; unit-length when `norm` (row divided by its float32 norm)."""
        index = self.get_index(key)
        if norm:
            self.fill_norms()
            result = self._vectors[index] / self.norms[index]
        else:
            result = self._vectors[index]
        result.setflags(write=False)  # a caller writing into a row would leave the cached norms stale
        return result

    def __getitem__(self, key_or_keys) -> np.ndarray:
        """One key gives its 1-D vector, a list of keys a 2-D stack of their vectors."""
        if isinstance(key_or_keys, _KEY_TYPES):
            return self.get_vector(key_or_keys)
        return np.vstack([self.get_vector(key) for key in key_or_keys])

    def add_vectors(self, keys, weights, extras: dict | None = None, replace: bool = False) -> None:
        """Append `keys` with their vectors (gensim's ``add_vectors``). A key already present keeps its
        vector unless `replace`. `extras` maps an attribute name (e.g. ``"count"``) to one value per
        key. Unlike gensim, a key repeated inside `keys` is refused, not added twice."""
        if isinstance(keys, _KEY_TYPES):
            keys = [keys]
            weights = np.asarray(_to_numpy(weights)).reshape(1, -1)
        keys = list(keys)
        weights = np.asarray(_to_numpy(weights) if not isinstance(weights, list) else
                             [_to_numpy(w) for w in weights], dtype=REAL)
        if len(keys) == 0 and weights.size == 0:
            return
        if weights.ndim != 2 or weights.shape != (len(keys), self.vector_size):
            raise ValueError(f"add_vectors: {len(keys)} keys need vectors of shape ({len(keys)}, {self.vector_size}), "
                             f"got {weights.shape}")
        for key in keys:
            if not isinstance(key, _KEY_TYPES):
                raise TypeError(f"keys must be str or int, got {type(key).__name__}: {key!r}")
        if len(set(keys)) != len(keys):
            dup = next(k for k, c in Counter(keys).items() if c > 1)
            raise ValueError(f"add_vectors: key {dup!r} appears more than once")
        extras = {attr: np.asarray(_to_numpy(v)) for attr, v in (extras or {}).items()}
        for attr, values in extras.items():
            if values.shape[:1] != (len(keys),):
                raise ValueError(f"extras[{attr!r}] needs one value per key ({len(keys)}), got shape {values.shape}")

        present = np.array([key in self.key_to_index for key in keys], dtype=bool)
        new = np.nonzero(~present)[0]
        for i in new:
            self.key_to_index[keys[i]] = len(self.index_to_key)
            self.index_to_key.append(keys[i])
        self._vectors = np.ascontiguousarray(np.vstack((self._vectors, weights[new])))
        self._allocate_vecattrs(list(extras), [v.dtype for v in extras.values()])
        self._allocate_vecattrs()  # grow the attributes the new keys were not given (gensim's add_vector)
        first_new = len(self.index_to_key) - len(new)
        for attr, values in extras.items():
            self.expandos[attr][first_new:] = values[new]
        if replace and present.any():
            rows = [self.key_to_index[keys[i]] for i in np.nonzero(present)[0]]
            self._vectors[rows] = weights[present]
            for attr, values in extras.items():
                self.expandos[attr][rows] = values[present]
        self.norms = None

    def add_vector(self, key, vector) -> int:
        """Append one key (gensim's ``add_vector``); returns its index."""
        self.add_vectors([key], np.asarray(_to_numpy(vector), dtype=REAL).reshape(1, -1))
        return self.key_to_index[key]

    def __setitem__(self, keys, weights) -> None:
        """``kv[keys] = vectors``: add, replacing the vectors of keys already present (gensim)."""
        if not isinstance(keys, list):
            keys = [keys]
            weights = np.asarray(_to_numpy(weights)).reshape(1, -1)
        self.add_vectors(keys, weights, replace=True)

    # ---------------------------------------------------------------- per-key attributes

    def _allocate_vecattrs(self, attrs=None, types=None) -> None:
        """Make every attribute array as long as the vocabulary (gensim's ``allocate_vecattrs``):
        ints are stored as int64, strings as objects."""
        if attrs is None:
            attrs = list(self.expandos)
            types = [self.expandos[a].dtype for a in attrs]
        size = len(self.index_to_key)
        for attr, t in zip(attrs, types):
            if t is int:
                t = np.int64
            elif t is str:
                t = object
            if attr not in self.expandos:
                self.expandos[attr] = np.zeros(size, dtype=t)
                continue
            prev = self.expandos[attr]
            if not np.issubdtype(t, prev.dtype):
                raise TypeError(f"can't store {t} in attribute {attr!r}, which holds {prev.dtype}")
            if len(prev) != size:
                grown = np.zeros(size, dtype=prev.dtype)
                grown[: min(len(prev), size)] = prev[:size]
                self.expandos[attr] = grown

    def set_vecattr(self, key, attr: str, val) -> None:
        """Set attribute `attr` (e.g. ``"count"``) of `key`; the attribute's array is created at first use."""
        self._allocate_vecattrs([attr], [type(val)])
        self.expandos[attr][self.get_index(key)] = val

    def get_vecattr(self, key, attr: str):
        """Attribute `attr` of `key`; KeyError names the attribute when it was never set."""
        index = self.get_index(key)
        if attr not in self.expandos:
            raise KeyError(f"attribute {attr!r} not set (known: {sorted(self.expandos)})")
        return self.expandos[attr][index]

    def sort_by_descending_frequency(self) -> None:
        """Reorder keys, vectors and attributes by descending ``count`` (gensim: ``np.lexsort((-index,
        -count))``, so equal counts end up in reverse order of their former index)."""
        if not len(self):
            return
        if "count" not in self.expandos:
            raise KeyError("sort_by_descending_frequency needs the 'count' attribute (set_vecattr(key, 'count', n))")
        self._allocate_vecattrs()
        counts = np.asarray(self.expandos["count"], dtype=np.int64)
        order = np.lexsort((-np.arange(len(counts)), -counts))
        self.index_to_key = [self.index_to_key[i] for i in order]
        for attr in self.expandos:
            self.expandos[attr] = self.expandos[attr][order]
        if len(self._vectors):
            self._vectors = np.ascontiguousarray(self._vectors[order])
        self.key_to_index = {key: i for i, key in enumerate(self.index_to_key)}
        self.norms = None

    # ---------------------------------------------------------------- norms

    def fill_norms(self, force: bool = False) -> None:
        """Compute the row norms (float32, ``np.linalg.norm`` as gensim) unless cached."""
        if self.norms is None or force or len(self.norms) != len(self._vectors):
            self.norms = np.linalg.norm(self._vectors, axis=1)

    def get_normed_vectors(self) -> np.ndarray:
        """All vectors scaled to unit length (a new array; zero rows give nan as in gensim)."""
        self.fill_norms()
        return self._vectors / self.norms[..., np.newaxis]

    def unit_normalize_all(self) -> None:
        """Scale the stored vectors to unit length in place (gensim; training cannot resume after it)."""
        self.fill_norms()
        self._vectors /= self.norms[..., np.newaxis]
        self.norms = np.ones((len(self._vectors),))  # float64, as gensim (later cosines come out float64 too)

    # ---------------------------------------------------------------- queries

    def get_mean_vector(self, keys, weights=None, pre_normalize: bool = True, post_normalize: bool = False,
                        ignore_missing: bool = True) -> np.ndarray:
        """Weighted mean of keys and/or raw vectors, divided by the sum of |weights| (gensim's
        ``get_mean_vector``; vectors given directly are not normalised first). Accumulated in float32
        from float64 products, exactly as gensim, so downstream similarities match bit for bit."""
        if len(keys) == 0:
            raise ValueError("cannot compute a mean of no keys or vectors")
        if isinstance(weights, list):
            weights = np.array(weights, dtype=REAL)
        if weights is None:
            weights = np.ones(len(keys), dtype=REAL)
        if len(keys) != weights.shape[0]:
            raise ValueError(f"{len(keys)} keys but {weights.shape[0]} weights")
        mean = np.zeros(self.vector_size, REAL)
        total_weight = 0
        for idx, key in enumerate(keys):
            key = _to_numpy(key)
            if isinstance(key, np.ndarray):
                if key.shape != (self.vector_size,):
                    raise ValueError(f"a query vector must have shape ({self.vector_size},), got {key.shape}")
                mean += weights[idx] * key
                total_weight += abs(weights[idx])
            elif key in self:
                mean += weights[idx] * self.get_vector(key, norm=pre_normalize)
                total_weight += abs(weights[idx])
            elif not ignore_missing:
                raise KeyError(f"Key '{key}' not present in vocabulary")
        if total_weight > 0:
            mean = mean / total_weight
        if post_normalize:
            mean = _unitvec(mean).astype(REAL)
        return mean

    def most_similar(self, positive=None, negative=None, topn: int | None = 10, restrict_vocab: int | None = None):
        """Keys nearest to the normalised mean of `positive` minus `negative` (gensim's ``most_similar``,
        word2vec.c's ``distance``/``word-analogy``; 3CosAdd for ``positive=[b, c], negative=[a]``).

        Items are keys, 1-D vectors, or ``(key_or_vector, weight)`` pairs (default weights +1 / -1);
        a single key or vector may be passed bare. Key vectors are unit-normalised before averaging,
        the mean is unit-normalised, and the cosine to every one of the first `restrict_vocab` keys
        (all when None) is computed by one matrix-vector product. Input keys never appear in the
        result. Returns ``topn`` ``(key, cosine)`` pairs, best first, or with ``topn=None`` the array of
        all cosines (input keys included). ``topn=0`` gives ``[]``; a negative `topn` raises (gensim
        returns ``[]``)."""
        _check_topn(topn)
        if topn == 0:
            return []
        positive, negative = _ensure_list(positive), _ensure_list(negative)
        if not positive and not negative:
            raise ValueError("most_similar needs at least one positive or negative key or vector")
        self.fill_norms()
        clip_end = restrict_vocab if restrict_vocab else len(self._vectors)

        keys = []
        weight = np.concatenate((np.ones(len(positive)), -1.0 * np.ones(len(negative))))
        for idx, item in enumerate(positive + negative):
            if isinstance(item, (*_KEY_TYPES, np.ndarray)):
                keys.append(item)
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                keys.append(_to_numpy(item[0]))
                weight[idx] = item[1]
            else:
                raise TypeError(f"most_similar items are keys, vectors or (key, weight) pairs; got {item!r}")
        mean = self.get_mean_vector(keys, weight, pre_normalize=True, post_normalize=True, ignore_missing=False)
        input_rows = [self.get_index(key) for key in keys if isinstance(key, _KEY_TYPES) and self.has_index_for(key)]
        exclude = set(input_rows)

        dists = np.dot(self._vectors[:clip_end], mean) / self.norms[:clip_end]
        if topn is None:
            return dists
        best = _top_indices(dists, topn + len(input_rows))
        result = [(self.index_to_key[i], float(dists[i])) for i in best if i not in exclude]
        return result[:topn]

    def similar_by_key(self, key, topn: int | None = 10, restrict_vocab: int | None = None):
        """``most_similar(positive=[key])``."""
        return self.most_similar(positive=[key], topn=topn, restrict_vocab=restrict_vocab)

    similar_by_word = similar_by_key

    def similar_by_vector(self, vector, topn: int | None = 10, restrict_vocab: int | None = None):
        """Keys nearest (cosine) to a raw vector: ``most_similar(positive=[vector])``."""
        return self.most_similar(positive=[_to_numpy(vector)], topn=topn, restrict_vocab=restrict_vocab)

    def most_similar_cosmul(self, positive=None, negative=None, topn: int | None = 10,
                            restrict_vocab: int | None = None):
        """3CosMul of Levy & Goldberg (2014), as gensim: score = prod((1 + cos(x, p)) / 2) /
        (prod((1 + cos(x, n)) / 2) + 1e-6) over positives p and negatives n (keys are normalised,
        raw vectors taken as given). Input keys are excluded. gensim ignores `restrict_vocab` here;
        this method honours it (None: the whole vocabulary, which is gensim's result)."""
        _check_topn(topn)
        if topn == 0:
            return []
        positive, negative = _ensure_list(positive), _ensure_list(negative)
        if not positive:
            raise ValueError("most_similar_cosmul needs at least one positive key or vector")
        self.fill_norms()
        clip_end = restrict_vocab if restrict_vocab else len(self._vectors)
        exclude = {self.get_index(w) for w in positive + negative if isinstance(w, _KEY_TYPES)}

        def term(w):
            if isinstance(w, _KEY_TYPES):
                return self.get_vector(w, norm=True)
            if w.shape != (self.vector_size,):
                raise ValueError(f"a query vector must have shape ({self.vector_size},), got {w.shape}")
            return w

        vectors, norms = self._vectors[:clip_end], self.norms[:clip_end]
        # cosines shifted to [0, 1] (footnote 7 of the paper) so the products stay positive
        pos_dists = [((1 + np.dot(vectors, term(w)) / norms) / 2) for w in positive]
        neg_dists = [((1 + np.dot(vectors, term(w)) / norms) / 2) for w in negative]
        dists = np.prod(pos_dists, axis=0) / (np.prod(neg_dists, axis=0) + 0.000001)
        if topn is None:
            return dists
        best = _top_indices(dists, topn + len(exclude))
        result = [(self.index_to_key[i], float(dists[i])) for i in best if i not in exclude]
        return result[:topn]

    @staticmethod
    def cosine_similarities(vector_1: np.ndarray, vectors_all: np.ndarray) -> np.ndarray:
        """Cosine between one vector and each row of `vectors_all` (gensim's static method)."""
        norm = np.linalg.norm(vector_1)
        all_norms = np.linalg.norm(vectors_all, axis=1)
        return np.dot(vectors_all, vector_1) / (norm * all_norms)

    def distances(self, word_or_vector, other_words=()) -> np.ndarray:
        """1 - cosine from a key or vector to each of `other_words` (all keys when empty)."""
        word_or_vector = _to_numpy(word_or_vector)
        vector = self.get_vector(word_or_vector) if isinstance(word_or_vector, _KEY_TYPES) else word_or_vector
        others = self._vectors if not other_words else self._vectors[[self.get_index(w) for w in other_words]]
        return 1 - self.cosine_similarities(vector, others)

    def similarity(self, w1, w2) -> np.float32:
        """Cosine similarity of two keys (gensim: dot of the two float32 unit vectors)."""
        return np.dot(_unitvec(self[w1]), _unitvec(self[w2]))

    def distance(self, w1, w2) -> np.float32:
        """Cosine distance, ``1 - similarity(w1, w2)``."""
        return 1 - self.similarity(w1, w2)

    def n_similarity(self, ws1, ws2) -> np.float32:
        """Cosine between the means of two key lists (raw vectors, as gensim). gensim silently skips
        unknown keys here; this raises KeyError naming the key."""
        if not (len(ws1) and len(ws2)):
            raise ZeroDivisionError("At least one of the passed list is empty.")
        for key in itertools.chain(ws1, ws2):
            self.get_index(key)
        mean1 = self.get_mean_vector(ws1, pre_normalize=False)
        mean2 = self.get_mean_vector(ws2, pre_normalize=False)
        return np.dot(_unitvec(mean1), _unitvec(mean2))

    def rank_by_centrality(self, words, use_norm: bool = True) -> list:
        """``(cosine to the centroid, key)`` pairs, most central first (gensim: unknown keys are
        skipped with a warning)."""
        self.fill_norms()
        used = [w for w in words if w in self]
        if len(used) != len(words):
            warnings.warn(f"keys {sorted(set(map(str, words)) - set(map(str, used)))} are not in the vocabulary; "
                          "ignoring them", stacklevel=3)
        if not used:
            raise ValueError("cannot select a key from an empty list (none of the keys is in the vocabulary)")
        vectors = np.vstack([self.get_vector(w, norm=use_norm) for w in used]).astype(REAL)
        mean = self.get_mean_vector(vectors, post_normalize=True)
        dists = np.dot(vectors, mean)
        return sorted(zip(dists, used), reverse=True)

    def doesnt_match(self, words) -> str:
        """The key farthest (cosine) from the mean of the unit vectors of `words`."""
        return self.rank_by_centrality(words)[-1][1]

    def closer_than(self, key1, key2) -> list:
        """Keys closer to `key1` than `key2` is (cosine distance), `key1` itself excluded."""
        all_distances = self.distances(key1)
        e1, e2 = self.get_index(key1), self.get_index(key2)
        closer = np.where(all_distances < all_distances[e2])[0]
        return [self.index_to_key[i] for i in closer if i != e1]

    def rank(self, key1, key2) -> int:
        """1 + the number of keys closer to `key1` than `key2` is."""
        return len(self.closer_than(key1, key2)) + 1

    # ---------------------------------------------------------------- evaluation

    def _restricted_vocab(self, restrict_vocab, case_insensitive: bool) -> dict:
        """gensim's ``ok_vocab``: the first `restrict_vocab` keys, folded to upper case when
        `case_insensitive`, each mapped to its index; of several case variants the first (most
        frequent) wins."""
        ok_vocab = {}
        for i in range(len(self.index_to_key[:restrict_vocab]) - 1, -1, -1):
            ok_vocab[_fold(self.index_to_key[i], case_insensitive)] = i
        return ok_vocab

    def evaluate_word_analogies(self, analogies, restrict_vocab: int = 300000, case_insensitive: bool = True,
                                dummy4unknown: bool = False):
        """Accuracy on an analogy file (gensim's ``evaluate_word_analogies``, word2vec.c's
        ``compute-accuracy``): lines ``a b c d`` under ``: section`` headers; the answer to "a is to b
        as c is to ?" is the first key of ``most_similar(positive=[b, c], negative=[a], topn=5,
        restrict_vocab=restrict_vocab)`` that is not a question word (3CosAdd).

        gensim's rules: questions with a word outside the first `restrict_vocab` keys are skipped
        (counted wrong with `dummy4unknown`); `case_insensitive` upper-cases the file's words and the
        keys; malformed lines are skipped. The means and the top-n selection are gensim's; the
        cosines of many questions come from one matrix product instead of one matrix-vector product
        per question, which is faster and equal up to float32 rounding of the dot products.

        Returns ``(score, sections)``: the overall accuracy and one dict per section with
        ``'section'``, ``'correct'`` and ``'incorrect'`` lists of (a, b, c, expected) tuples (upper-cased
        when case_insensitive), the last section being ``'Total accuracy'``."""
        ok_vocab = self._restricted_vocab(restrict_vocab, case_insensitive)
        sections, section = [], None
        questions = []  # (section, quadruple, (ia, ib, ic) or None when out of vocabulary)
        with open(analogies, "rb") as fin:
            for line_no, raw in enumerate(fin):
                line = raw.decode("utf8")
                if line.startswith(": "):
                    section = {"section": line.lstrip(": ").strip(), "correct": [], "incorrect": []}
                    sections.append(section)
                    continue
                if section is None:
                    raise ValueError(f"Missing section header before line #{line_no} in {analogies}")
                words = [_fold(w, case_insensitive) for w in line.split()]
                if len(words) != 4:
                    logger.info("Skipping invalid line #%i in %s", line_no, analogies)
                    continue
                if all(w in ok_vocab for w in words):
                    questions.append((section, tuple(words), (ok_vocab[words[0]], ok_vocab[words[1]],
                                                              ok_vocab[words[2]])))
                else:
                    questions.append((section, tuple(words), None))
        if not questions:
            raise ValueError(f"no analogy questions (lines of four words under ': section' headers) in {analogies}")

        solvable = np.array([q[2] for q in questions if q[2] is not None], dtype=np.int64).reshape(-1, 3)
        predictions = iter(self._solve_analogies(solvable, restrict_vocab, case_insensitive, ok_vocab,
                                                 [q[1] for q in questions if q[2] is not None]))
        oov = 0
        for section, quad, indices in questions:
            if indices is None:
                oov += 1
                if dummy4unknown:
                    section["incorrect"].append(quad)
                continue
            section["correct" if next(predictions) == quad[3] else "incorrect"].append(quad)

        total = {
            "section": "Total accuracy",
            "correct": list(itertools.chain.from_iterable(s["correct"] for s in sections)),
            "incorrect": list(itertools.chain.from_iterable(s["incorrect"] for s in sections)),
        }
        for s in sections:
            self._log_section(s)
        logger.info("Quadruplets with out-of-vocabulary words: %.1f%%", 100.0 * oov / len(questions))
        score = self._log_section(total)
        sections.append(total)
        return score, sections

    @staticmethod
    def _log_section(section) -> float:
        correct, incorrect = len(section["correct"]), len(section["incorrect"])
        if correct + incorrect == 0:
            return 0.0
        score = correct / (correct + incorrect)
        logger.info("%s: %.1f%% (%i/%i)", section["section"], 100.0 * score, correct, correct + incorrect)
        return score

    def _solve_analogies(self, abc: np.ndarray, restrict_vocab, case_insensitive, ok_vocab, quads) -> list:
        """The (folded) predicted key of each question ``abc[q] = (a, b, c)`` as gensim's
        evaluate_word_analogies picks it, for a batch of questions per matrix product."""
        if len(abc) == 0:
            return []
        self.fill_norms()
        clip_end = min(restrict_vocab if restrict_vocab else len(self._vectors), len(self._vectors))
        vectors, norms = self._vectors[:clip_end], self.norms[:clip_end]
        # questions per batch: keep the (batch, clip_end) float32 cosine block near 64 MB
        batch = max(1, min(len(abc), (1 << 24) // max(1, clip_end)))
        topn = 5
        predictions = []
        plus, minus, three = np.float64(1.0), np.float64(-1.0), np.float64(3.0)
        for start in range(0, len(abc), batch):
            ia, ib, ic = abc[start:start + batch].T
            # gensim's get_mean_vector over keys [b, c, a] with float64 weights [1, 1, -1]: float32
            # accumulator, float64 products, division by the float64 total weight, unitvec, float32
            mean = np.zeros((len(ia), self.vector_size), REAL)
            mean += plus * (self._vectors[ib] / self.norms[ib, None])
            mean += plus * (self._vectors[ic] / self.norms[ic, None])
            mean += minus * (self._vectors[ia] / self.norms[ia, None])
            mean = _unitvec_rows(mean / three).astype(REAL)
            dists = (mean @ vectors.T) / norms  # (batch, clip_end) cosines
            best = _top_indices_rows(dists, topn + 3).tolist()  # Python ints: cheap to compare below
            ia, ib, ic = ia.tolist(), ib.tolist(), ic.tolist()
            for q, row in enumerate(best):
                exclude = (ia[q], ib[q], ic[q])
                a, b, c = quads[start + q][:3]
                predicted = None
                for i in [i for i in row if i not in exclude][:topn]:
                    # the first candidate that is not a case variant of a question word; if all
                    # five are, gensim's answer is the fifth (its loop variable after the loop)
                    predicted = _fold(self.index_to_key[i], case_insensitive)
                    if predicted in ok_vocab and predicted not in (a, b, c):
                        break
                predictions.append(predicted)
        return predictions

    def evaluate_word_pairs(self, pairs, delimiter: str = "\t", encoding: str = "utf8", restrict_vocab: int = 300000,
                            case_insensitive: bool = True, dummy4unknown: bool = False):
        """Correlation of the model's cosines with human similarity scores (gensim's
        ``evaluate_word_pairs``): lines ``word1<delimiter>word2<delimiter>score``, ``#`` comments and
        malformed lines skipped, pairs with a word outside the first `restrict_vocab` keys skipped
        (or scored 0.0 with `dummy4unknown`).

        Returns ``(pearson, spearman, oov_ratio)``: two :class:`CorrelationResult` ``(statistic,
        pvalue)`` (scipy.stats.pearsonr / spearmanr when scipy is installed, the same formulas in
        numpy otherwise) and the percentage of pairs with an unknown word."""
        ok_vocab = self._restricted_vocab(restrict_vocab, case_insensitive)
        gold, model = [], []
        oov = 0
        with open(pairs, encoding=encoding) as fin:
            for line_no, line in enumerate(fin):
                if not line or line.startswith("#"):
                    continue
                try:
                    a, b, sim = [_fold(w, case_insensitive) for w in line.split(delimiter)]
                    sim = float(sim)
                except (ValueError, TypeError):
                    logger.info("Skipping invalid line #%d in %s", line_no, pairs)
                    continue
                if a not in ok_vocab or b not in ok_vocab:
                    oov += 1
                    if dummy4unknown:
                        model.append(0.0)
                        gold.append(sim)
                    continue
                gold.append(sim)
                model.append(np.dot(_unitvec(self._vectors[ok_vocab[a]]), _unitvec(self._vectors[ok_vocab[b]])))
        if not gold:
            raise ValueError(f"No valid similarity judgements found in {pairs}: either invalid format or "
                             f"all are out-of-vocabulary in {self}")
        pearson, spearman = _correlations(gold, model)
        oov_ratio = float(oov) / (len(gold) if dummy4unknown else len(gold) + oov) * 100
        logger.info("Pearson correlation coefficient against %s: %.4f", pairs, pearson[0])
        logger.info("Spearman rank-order correlation coefficient against %s: %.4f", pairs, spearman[0])
        logger.info("Pairs with unknown words ratio: %.1f%%", oov_ratio)
        return pearson, spearman, oov_ratio

    # ---------------------------------------------------------------- word2vec format

    def _store_order(self, sort_attr: str) -> np.ndarray:
        """Rows in the order gensim writes them: by descending `sort_attr` (stable), else as stored."""
        if sort_attr not in self.expandos:
            return np.arange(len(self))
        self._allocate_vecattrs()
        values = self.expandos[sort_attr]
        if values.dtype == object:
            return np.array(sorted(range(len(values)), key=lambda i: -values[i]), dtype=np.int64)
        return np.argsort(-values, kind="stable")

    def save_word2vec_format(self, fname, fvocab=None, binary: bool = False, write_header: bool = True,
                             prefix: str = "", sort_attr: str = "count") -> None:
        """Write the vectors in word2vec.c's format, byte for byte what gensim's writer produces.

        Text: a header ``"V D\\n"`` (unless `write_header` is False: GloVe's format), then
        ``word v1 ... vD\\n`` per key, each value the shortest decimal that reads back as the same
        float32 (``str(numpy.float32)``, as gensim). Binary: the same header, then per key
        ``word`` + space + D little-endian float32, no separator (gensim; word2vec.c adds a newline,
        which :meth:`load_word2vec_format` accepts). Keys go most frequent first when `sort_attr`
        (``count``) is set, else in index order; `fvocab` gets ``word count`` lines (word2vec.c's
        ``-save-vocab``). Each file is written to a temporary file beside it and renamed over it, so
        an interrupted save leaves an existing file intact. gensim's ``append``/``total_vec`` are
        not supported (they cannot be atomic)."""
        if fvocab is not None and sort_attr not in self.expandos:
            raise ValueError(f"Cannot store vocabulary with '{sort_attr}' because that attribute does not exist")
        if self._vectors.shape != (len(self.index_to_key), self.vector_size):
            raise ValueError(f"vectors have shape {self._vectors.shape} but there are {len(self)} keys "
                             f"of size {self.vector_size}")
        order = self._store_order(sort_attr)
        words = [f"{prefix}{self.index_to_key[i]}" for i in order]
        for word in words:
            if " " in word or "\n" in word:
                raise ValueError(f"key {word!r} holds a space or newline, which the word2vec format cannot store")
        if fvocab is not None:
            counts = self.expandos[sort_attr][order]
            with atomic_write(fvocab, "wb") as vout:
                vout.write("".join(f"{w} {c}\n" for w, c in zip(words, counts)).encode("utf8"))
        rows = self._vectors[order]
        with atomic_write(fname, "wb") as fout:
            if write_header:
                fout.write(f"{len(words)} {self.vector_size}\n".encode("utf8"))
            if binary:
                data = rows.astype(_LE_FLOAT32)
                for word, row in zip(words, data):
                    fout.write(f"{word} ".encode("utf8") + row.tobytes())
            else:
                for word, row in zip(words, rows):
                    fout.write(f"{word} {' '.join(map(str, row))}\n".encode("utf8"))

    @classmethod
    def load_word2vec_format(cls, fname, fvocab=None, binary: bool = False, encoding: str = "utf8",
                             unicode_errors: str = "strict", limit: int | None = None,
                             no_header: bool = False) -> "KeyedVectors":
        """Read word2vec.c's text or binary format (gensim's ``load_word2vec_format``; the arguments
        keep its order). `limit` reads the first keys only. A repeated word keeps its first vector
        (with a warning). Counts come from `fvocab` (``word count`` lines) or, as gensim fakes them,
        ``V - index``, so the order survives a save. `no_header` reads a text file without the
        ``"V D"`` line (GloVe's format).

        Raises ValueError naming the file and line for a bad header, a row with the wrong number of
        values or a non-number, a file with fewer rows than its header declares (gensim: EOFError)
        or more (gensim ignores them), and UnicodeDecodeError for a word that is not valid
        `encoding` under ``unicode_errors='strict'``."""
        if limit is not None and (not isinstance(limit, Integral) or limit < 0):
            raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
        counts = None
        if fvocab is not None:
            counts = {}
            with open(fvocab, "rb") as fin:
                for line_no, line in enumerate(fin, 1):
                    fields = _decode(line, "utf8", unicode_errors, f"line {line_no} of {fvocab}").strip().split()
                    if len(fields) != 2:
                        raise ValueError(f"{fvocab}, line {line_no}: expected 'word count', got {line[:80]!r}")
                    counts[fields[0]] = int(fields[1])

        with open(fname, "rb") as fin:
            if no_header:
                if binary:
                    raise ValueError("no_header=True reads only text files (a binary file needs its header)")
                vocab_size, vector_size = 0, None
                for line in fin:
                    if limit is not None and vocab_size == limit:
                        break
                    if vector_size is None:
                        vector_size = len(line.rstrip().split(b" ")) - 1
                        if vector_size <= 0:
                            raise ValueError(f"{fname}, line 1: no vector after the word")
                    vocab_size += 1
                if vector_size is None:
                    raise ValueError(f"{fname} is empty")
                fin.seek(0)
                first_line_no = 1
            else:
                vocab_size, vector_size = _parse_header(fin.readline(), fname, encoding)
                first_line_no = 2
            n = vocab_size if limit is None else min(vocab_size, limit)

            vectors = np.empty((n, vector_size), dtype=REAL)
            keys, seen = [], {}
            if binary:
                rows = _read_binary_rows(fin, fname, n, vector_size, encoding, unicode_errors)
            else:
                rows = _read_text_rows(fin, fname, n, vector_size, first_line_no, encoding, unicode_errors)
            leftover = b""
            while True:
                try:
                    word, row = next(rows)
                except StopIteration as stop:
                    leftover = stop.value or b""
                    break
                if word in seen:
                    warnings.warn(f"{fname}: duplicate word {word!r}, keeping its first vector", stacklevel=2)
                    continue
                seen[word] = len(keys)
                vectors[len(keys)] = row
                keys.append(word)
            if limit is None:
                _check_no_more_rows(fin, leftover, fname, vocab_size)

        kv = cls(vector_size)
        kv.index_to_key = keys
        kv.key_to_index = seen
        kv._vectors = np.ascontiguousarray(vectors[: len(keys)])
        if counts is None:
            kv.expandos["count"] = np.arange(n, n - len(keys), -1, dtype=np.int64)
        else:
            missing = [k for k in keys if k not in counts]
            if missing:
                warnings.warn(f"vocabulary file {fvocab} lacks {len(missing)} words (e.g. {missing[0]!r}); "
                              "their count is 0", stacklevel=2)
            kv.expandos["count"] = np.array([counts.get(k, 0) for k in keys], dtype=np.int64)
        return kv


    # ---------------------------------------------------------------- native files, gensim objects

    def _to_tensors(self, prefix: str = "") -> tuple[dict[str, np.ndarray], dict]:
        """(tensors, header fields) of this object for :mod:`._storage` (shared with Word2Vec / GloVe)."""
        if self._vectors.shape != (len(self.index_to_key), self.vector_size):
            raise ValueError(f"vectors have shape {self._vectors.shape} but there are {len(self)} keys "
                             f"of size {self.vector_size}")
        tensors, key_type = _storage.encode_keys(self.index_to_key, prefix)
        tensors[f"{prefix}vectors"] = np.asarray(self._vectors, dtype=REAL)
        self._allocate_vecattrs()
        for attr, values in self.expandos.items():
            if values.dtype == object or values.dtype.kind not in "biuf":
                raise ValueError(f"cannot save attribute {attr!r} ({values.dtype}): the native format stores "
                                 "numeric per-key attributes only")
            tensors[f"{prefix}expandos.{attr}"] = values
        return tensors, {"vector_size": self.vector_size, "key_type": key_type,
                         "expandos": sorted(self.expandos)}

    @classmethod
    def _from_tensors(cls, header: dict, tensors: dict, fname, prefix: str = "") -> "KeyedVectors":
        vector_size = header.get("vector_size")
        if not isinstance(vector_size, int) or vector_size <= 0:
            raise ValueError(f"{fname}: vector_size {vector_size!r} in the header (damaged file)")
        keys = _storage.decode_keys(tensors, prefix, header.get("key_type"), fname)
        kv = cls(vector_size)
        vectors = _storage.need(tensors, f"{prefix}vectors", fname, (len(keys), vector_size))
        if vectors.dtype != REAL:
            raise ValueError(f"{fname}: vectors are {vectors.dtype}, expected float32 (damaged file)")
        kv.index_to_key = keys
        kv.key_to_index = {k: i for i, k in enumerate(keys)}
        if len(kv.key_to_index) != len(keys):
            raise ValueError(f"{fname}: the vocabulary holds a key twice (damaged file)")
        kv._vectors = vectors
        for attr in header.get("expandos", []):
            kv.expandos[attr] = _storage.need(tensors, f"{prefix}expandos.{attr}", fname, (len(keys),))
        return kv

    def save(self, fname) -> None:
        """Save keys, vectors and per-key attributes (``count``, ...) to one file (gensim's
        ``KeyedVectors.save`` name; llmkit's format: safetensors arrays plus JSON metadata, written
        atomically, never a pickle). Read it back with :meth:`load`. For word2vec.c / gensim
        interchange use :meth:`save_word2vec_format`."""
        tensors, header = self._to_tensors()
        _storage.write(fname, "KeyedVectors", header, tensors)

    @classmethod
    def load(cls, fname, mmap: str | None = None) -> "KeyedVectors":
        """Load a file written by :meth:`save`. ``mmap="r"`` maps the vectors read-only from the file
        (gensim's ``mmap='r'``: processes share the pages; the vectors cannot be modified).

        Raises ValueError for a gensim pickle (convert it with :meth:`from_gensim` instead: llmkit never
        unpickles), a word2vec-format file (:meth:`load_word2vec_format`) or a damaged file."""
        header, tensors = _storage.read(fname, "KeyedVectors", mmap=mmap)
        return cls._from_tensors(header, tensors, fname)

    def to_gensim(self):
        """A ``gensim.models.KeyedVectors`` with the same keys (same order), vectors and attributes.
        Needs gensim (ImportError naming it otherwise)."""
        from llmkit.utils import require

        gensim_models = require("gensim.models", "embeddings", "KeyedVectors.to_gensim()")
        out = gensim_models.KeyedVectors(self.vector_size, count=0, dtype=REAL)
        out.add_vectors(list(self.index_to_key), np.array(self._vectors, dtype=REAL, copy=True))
        self._allocate_vecattrs()
        # set one by one: gensim 4.4's add_vectors(extras=dict) iterates the dict as pairs and fails
        out.allocate_vecattrs(list(self.expandos), [values.dtype.type for values in self.expandos.values()])
        for attr, values in self.expandos.items():
            out.expandos[attr][:] = values
        return out

    @classmethod
    def from_gensim(cls, kv) -> "KeyedVectors":
        """A copy of a ``gensim.models.KeyedVectors`` (``gensim_model.wv``): keys in their order, vectors,
        per-key attributes. A whole gensim ``Word2Vec`` goes through ``Word2Vec.from_gensim``."""
        if hasattr(kv, "wv") and not hasattr(kv, "index_to_key"):
            raise TypeError(f"from_gensim takes a gensim KeyedVectors (model.wv), got a {type(kv).__name__}; "
                            "a gensim Word2Vec converts with llmkit.embeddings.Word2Vec.from_gensim")
        for attr in ("index_to_key", "vectors", "vector_size"):
            if not hasattr(kv, attr):
                raise TypeError(f"from_gensim takes a gensim KeyedVectors, got a {type(kv).__name__} "
                                f"(no {attr!r})")
        out = cls(int(kv.vector_size))
        keys = list(kv.index_to_key)
        vectors = np.array(kv.vectors, dtype=REAL, copy=True)
        if vectors.shape != (len(keys), out.vector_size):
            raise ValueError(f"gensim KeyedVectors has {len(keys)} keys but vectors of shape {vectors.shape}")
        out.index_to_key = keys
        out.key_to_index = {k: i for i, k in enumerate(keys)}
        out._vectors = np.ascontiguousarray(vectors)
        for attr, values in getattr(kv, "expandos", {}).items():
            values = np.asarray(values)
            if len(values) == len(keys):
                out.expandos[attr] = values.copy()
        return out
