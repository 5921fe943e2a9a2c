"""Gender bias in word embeddings: measure it and remove it (Bolukbasi et al., 2016).

"Man is to Computer Programmer as Woman is to Homemaker? Debiasing Word Embeddings" (NeurIPS 2016)
finds a *gender direction* ``g`` in an embedding as the first principal component of the centred
definitional pairs (she/he, woman/man, ...), shows that gender-neutral words such as occupations
project onto it (their Table 1: "extreme she" and "extreme he" occupations), measures this with
DirectBias, and removes it with *hard debiasing*: neutralize (gender-neutral words lose their
component along ``g``) then equalize (each equality pair such as grandfather/grandmother is made
symmetric about ``g``, so every neutral word is equidistant from both words).

The conventions follow the authors' ``debiaswe`` code: vectors are unit-normalised first, the
PCA is over two centred vectors per pair, ``drop`` removes the projection and the vectors are
renormalised after each step, and equality pairs are tried in lower, Title and UPPER case.

Functions take an :class:`~llmkit.embeddings.KeyedVectors` and never modify it::

    g = gender_direction(kv)                  # a unit vector (debiaswe: doPCA(...).components_[0])
    definitional_pca(kv).explained_variance_ratio_   # how much the first component explains
    she, he = extreme_professions(kv, g)
    direct_bias(kv, g)                        # > 0 on real embeddings
    debiased = hard_debias(kv, g)             # a new KeyedVectors
    direct_bias(debiased, g)                  # ~0
    print(bias_report(kv))
"""

from __future__ import annotations

import math
import os
from numbers import Real
from typing import NamedTuple

import numpy as np

from .keyed_vectors import KeyedVectors

__all__ = [
    "DEFINITIONAL_PAIRS",
    "EQUALIZE_PAIRS",
    "GENDER_SPECIFIC",
    "PROFESSIONS_PATH",
    "load_professions",
    "DefinitionalPCA",
    "definitional_pca",
    "gender_direction",
    "project",
    "extreme_professions",
    "direct_bias",
    "hard_debias",
    "bias_report",
]

PROFESSIONS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "professions.txt")

# The paper's ten definitional pairs, female word first.
DEFINITIONAL_PAIRS: tuple[tuple[str, str], ...] = (
    ("woman", "man"), ("girl", "boy"), ("she", "he"), ("mother", "father"), ("daughter", "son"),
    ("gal", "guy"), ("female", "male"), ("her", "his"), ("herself", "himself"), ("Mary", "John"),
)

# Equality pairs (either order: equalize takes each pair's side from the data). hard_debias tries
# each in lower, Title and UPPER case, as debiaswe does.
EQUALIZE_PAIRS: tuple[tuple[str, str], ...] = (
    ("monastery", "convent"), ("spokesman", "spokeswoman"), ("Catholic_priest", "nun"), ("Dad", "Mom"),
    ("Men", "Women"), ("councilman", "councilwoman"), ("grandpa", "grandma"), ("grandsons", "granddaughters"),
    ("prostate_cancer", "ovarian_cancer"), ("testosterone", "estrogen"), ("uncle", "aunt"), ("wives", "husbands"),
    ("Father", "Mother"), ("Grandpa", "Grandma"), ("He", "She"), ("boy", "girl"), ("boys", "girls"),
    ("brother", "sister"), ("brothers", "sisters"), ("businessman", "businesswoman"), ("chairman", "chairwoman"),
    ("colt", "filly"), ("congressman", "congresswoman"), ("dad", "mom"), ("dads", "moms"), ("dudes", "gals"),
    ("ex_girlfriend", "ex_boyfriend"), ("father", "mother"), ("fatherhood", "motherhood"), ("fathers", "mothers"),
    ("fella", "granny"), ("fraternity", "sorority"), ("gelding", "mare"), ("gentleman", "lady"),
    ("gentlemen", "ladies"), ("grandfather", "grandmother"), ("grandson", "granddaughter"), ("he", "she"),
    ("himself", "herself"), ("his", "her"), ("king", "queen"), ("kings", "queens"), ("male", "female"),
    ("males", "females"), ("man", "woman"), ("men", "women"), ("nephew", "niece"), ("prince", "princess"),
    ("schoolboy", "schoolgirl"), ("son", "daughter"), ("sons", "daughters"), ("twin_brother", "twin_sister"),
)

_GENDERED_WORDS = """
actor actress actors actresses waiter waitress waiters waitresses steward stewardess host hostess
hero heroine heroes heroines god goddess gods goddesses emperor empress duke duchess lord lords
baron baroness count countess monk nun nuns monks priestess sultan
wife husband bride groom bridegroom brides grooms widow widower widows fiance fiancee
boyfriend girlfriend boyfriends girlfriends ex_wife ex_husband mistress
lad lads lass lasses guy guys gal gals dude dudes bloke chap fellow madam madame sir mr mrs ms miss
ladies lady gentleman gentlemen maiden maidens matriarch patriarch
mom moms mum mums mommy mama mamas daddy papa papas stepfather stepmother stepson stepdaughter
grandmothers grandfathers granddaughter granddaughters grandsons grandma grandpa granny
aunts uncles nephews nieces sisterhood brotherhood sisterly brotherly motherly fatherly
maternal paternal maternity paternity pregnant pregnancy womb uterus ovaries ovary prostate testicles
menopause menstruation breastfeeding lactation estrogen testosterone
feminine masculine femininity masculinity feminism feminist womanhood manhood girlhood boyhood
businesswoman businesswomen businessmen chairwoman chairmen chairwomen congresswomen congressmen
councilwoman councilwomen councilmen spokeswomen spokesmen salesman saleswoman salesmen saleswomen
policeman policewoman policemen policewomen fireman firemen housewife housewives
schoolgirl schoolgirls schoolboy schoolboys sorority sororities fraternity fraternities
stallion mare mares colt colts filly fillies gelding bull bulls cow cows hen hens rooster ram ewe
ballerina seamstress midwife nuns sisters brothers sister brother
kings queens king queen prince princess princes princesses
men women man woman boy boys girl girls he she him her his hers himself herself
male males female females son sons daughter daughters father fathers mother mothers
"""

# Words hard_debias must not neutralize: every definitional and equality pair word (as written and
# in lowercase) and common gendered words (kinship, titles, gendered job names, biology).
GENDER_SPECIFIC: frozenset[str] = frozenset(
    set(_GENDERED_WORDS.split())
    | {w for pair in DEFINITIONAL_PAIRS + EQUALIZE_PAIRS for w in pair}
    | {w.lower() for pair in DEFINITIONAL_PAIRS + EQUALIZE_PAIRS for w in pair}
)


# --------------------------------------------------------------------------------------------------
# helpers


def _unit_rows(mat: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float64 (a zero row stays zero)."""
    mat = np.asarray(mat, dtype=np.float64)
    norms = np.linalg.norm(mat, axis=-1, keepdims=True)
    return np.divide(mat, norms, out=np.zeros_like(mat), where=norms > 0)


def _unit_vector(kv: KeyedVectors, word: str) -> np.ndarray:
    return _unit_rows(kv.vectors[kv.key_to_index[word]])


def _check_direction(kv: KeyedVectors, direction) -> np.ndarray:
    """`direction` as a float64 unit vector of the embedding's size."""
    g = np.asarray(direction, dtype=np.float64)
    if g.shape != (kv.vector_size,):
        raise ValueError(f"direction must be a vector of size {kv.vector_size}, got shape {g.shape}")
    norm = float(np.linalg.norm(g))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("direction must be a finite non-zero vector")
    return g / norm


def load_professions(path=None) -> list[str]:
    """The profession words of `path` (default: llmkit's ``data/professions.txt``): one per line,
    blank lines and lines starting with '#' skipped, duplicates dropped (first kept)."""
    path = PROFESSIONS_PATH if path is None else path
    words: dict[str, None] = {}
    with open(path, encoding="utf8") as fin:
        for line in fin:
            word = line.strip()
            if word and not word.startswith("#"):
                words.setdefault(word, None)
    return list(words)


def _present_professions(kv: KeyedVectors, professions) -> list[str]:
    words = load_professions() if professions is None else list(dict.fromkeys(professions))
    present = [w for w in words if w in kv.key_to_index]
    if not present:
        shown = ", ".join(map(repr, words[:5])) + (", ..." if len(words) > 5 else "")
        raise ValueError(f"none of the {len(words)} professions ({shown}) is in the vocabulary")
    return present


# --------------------------------------------------------------------------------------------------
# the gender direction and projections


class DefinitionalPCA(NamedTuple):
    """The PCA of the centred definitional pairs, with sklearn's attribute names (debiaswe's
    ``doPCA`` returns an sklearn PCA): ``components_`` (rows: unit principal directions, the first
    sign-fixed as :func:`gender_direction`) and ``explained_variance_ratio_``."""

    components_: np.ndarray
    explained_variance_ratio_: np.ndarray


def definitional_pca(kv: KeyedVectors, pairs=DEFINITIONAL_PAIRS, num_components: int = 10) -> DefinitionalPCA:
    """debiaswe's ``doPCA``: for each pair whose two words are in the vocabulary (others are
    skipped), both unit-normalised vectors are centred on the pair's mean; the PCA of these 2·n
    vectors (SVD, as sklearn's PCA) gives the components. The first is the gender direction, its
    sign fixed so that ``she − he`` projects positively (``woman − man`` when she/he are not both
    present, else the first pair's first word minus its second).

    Returns the first ``min(num_components, 2·n, vector_size)`` components and their
    explained-variance ratios (sklearn's ``explained_variance_ratio_``; the first dominates in a
    real embedding). Raises ValueError, naming the missing words, when fewer than two pairs are in
    the vocabulary."""
    if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
        raise ValueError(f"num_components must be a positive int, got {num_components!r}")
    pairs = [tuple(p) for p in pairs]
    for p in pairs:
        if len(p) != 2:
            raise ValueError(f"each definitional pair must hold two words, got {p!r}")
    present = [p for p in pairs if p[0] in kv.key_to_index and p[1] in kv.key_to_index]
    if len(present) < 2:
        missing = sorted({w for p in pairs for w in p if w not in kv.key_to_index})
        raise ValueError(f"the gender direction needs at least 2 definitional pairs in the vocabulary, found "
                         f"{len(present)} of {len(pairs)}; missing words: {', '.join(missing)}")
    rows = []
    for a, b in present:
        va, vb = _unit_vector(kv, a), _unit_vector(kv, b)
        center = (va + vb) / 2
        rows += [va - center, vb - center]
    matrix = np.array(rows)
    matrix -= matrix.mean(axis=0)  # sklearn's PCA centres again (a no-op here: each pair sums to zero)
    _, s, vt = np.linalg.svd(matrix, full_matrices=False)
    variance = s ** 2
    total = float(variance.sum())
    if total == 0.0:
        raise ValueError("the definitional pairs are identical vectors: no direction to find")
    k = min(num_components, len(variance))
    components = vt[:k] / np.linalg.norm(vt[:k], axis=1, keepdims=True)
    for f, m in [("she", "he"), ("woman", "man")] + [present[0]]:
        if f in kv.key_to_index and m in kv.key_to_index:
            if float(np.dot(_unit_vector(kv, f) - _unit_vector(kv, m), components[0])) < 0:
                components[0] = -components[0]
            break
    return DefinitionalPCA(components, variance[:k] / total)


def gender_direction(kv: KeyedVectors, pairs=DEFINITIONAL_PAIRS) -> np.ndarray:
    """The gender direction ``g``: the first principal component of the centred definitional
    `pairs`, a float64 unit vector with ``she − he`` projecting positively (debiaswe:
    ``doPCA(pairs, E).components_[0]``). Its explained-variance ratio, and the other components,
    are in :func:`definitional_pca`. Raises ValueError, naming the missing words, when fewer than
    two pairs are in the vocabulary."""
    return definitional_pca(kv, pairs, num_components=1).components_[0]


def project(kv: KeyedVectors, words, direction) -> dict[str, float]:
    """``{word: cos(word, direction)}`` (the unit-normalised vector dotted with the unit direction).
    Raises KeyError for a word not in the vocabulary."""
    g = _check_direction(kv, direction)
    words = [words] if isinstance(words, str) else list(words)
    missing = [w for w in words if w not in kv.key_to_index]
    if missing:
        raise KeyError(f"not in the vocabulary: {', '.join(map(repr, missing))}")
    if not words:
        return {}
    unit = _unit_rows(kv.vectors[[kv.key_to_index[w] for w in words]])
    return {w: float(p) for w, p in zip(words, unit @ g)}


def extreme_professions(kv: KeyedVectors, direction, professions=None, n: int = 10):
    """The paper's Table 1: the `n` professions projecting most onto the she side of `direction` and
    the `n` most onto the he side, each a list of ``(word, projection)`` most extreme first.

    `professions` defaults to :func:`load_professions`; those not in the vocabulary are skipped
    (ValueError when none is left)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    proj = project(kv, _present_professions(kv, professions), direction)
    ranked = sorted(proj.items(), key=lambda item: (-item[1], item[0]))
    she = ranked[:n]
    he = sorted(proj.items(), key=lambda item: (item[1], item[0]))[:n]
    return she, he


def direct_bias(kv: KeyedVectors, direction, words=None, c: float = 1.0) -> float:
    """The paper's DirectBias_c: mean over gender-neutral `words` of ``|cos(w, g)|^c``.

    `words` defaults to the professions in the vocabulary that are not in :data:`GENDER_SPECIFIC`;
    given words are used as they are, those not in the vocabulary skipped. ``c`` (> 0) sets how
    strict the measure is (the paper: c = 0 counts any projection, larger c discounts small ones;
    here c must be positive so that an unbiased word scores 0). Raises ValueError when no word is
    left or c <= 0."""
    if isinstance(c, bool) or not isinstance(c, Real) or not math.isfinite(c) or c <= 0:
        raise ValueError(f"c must be a finite number > 0, got {c!r}")
    if words is None:
        words = [w for w in _present_professions(kv, None) if w not in GENDER_SPECIFIC]
        if not words:
            raise ValueError("every profession in the vocabulary is gender-specific: no neutral word to measure")
    else:
        words = [words] if isinstance(words, str) else list(dict.fromkeys(words))
        words = [w for w in words if w in kv.key_to_index]
        if not words:
            raise ValueError("none of the given words is in the vocabulary")
    proj = np.array(list(project(kv, words, direction).values()))
    return float(np.mean(np.abs(proj) ** c))


# --------------------------------------------------------------------------------------------------
# hard debiasing


def _equalize_candidates(kv: KeyedVectors, equalize_pairs) -> list[tuple[str, str]]:
    """debiaswe's candidate set, in a fixed order: each pair in lower, Title and UPPER case, kept
    when both words are in the vocabulary."""
    out: dict[tuple[str, str], None] = {}
    for pair in equalize_pairs:
        if len(pair) != 2:
            raise ValueError(f"each equalize pair must hold two words, got {pair!r}")
        e1, e2 = pair
        for a, b in ((e1.lower(), e2.lower()), (e1.title(), e2.title()), (e1.upper(), e2.upper())):
            if a != b and a in kv.key_to_index and b in kv.key_to_index and (b, a) not in out:
                out.setdefault((a, b), None)
    return list(out)


def hard_debias(kv: KeyedVectors, direction=None, gender_specific=GENDER_SPECIFIC,
                equalize_pairs=EQUALIZE_PAIRS) -> KeyedVectors:
    """Bolukbasi et al.'s hard debiasing (debiaswe's ``debias``); returns a new KeyedVectors, `kv`
    is left as it was.

    All vectors are unit-normalised. Neutralize: every word not in `gender_specific` loses its
    component along the direction ``g`` (default: :func:`gender_direction`) and is renormalised.
    Equalize: for each pair of `equalize_pairs` present in lower, Title or UPPER case, with
    ``mu = (e1 + e2) / 2`` and ``nu = mu − (mu·g) g``, ``z = sqrt(1 − |nu|²)``: ``e1 = nu + z g``,
    ``e2 = nu − z g``, ``z`` negated when ``(e1 − e2)·g < 0``. Both words then project equally and
    oppositely onto ``g`` and are equidistant from every neutralized word. Finally every vector is
    renormalised (as debiaswe)."""
    g = gender_direction(kv) if direction is None else _check_direction(kv, direction)
    specific = set(gender_specific)
    vecs = _unit_rows(kv.vectors)

    neutral = np.array([w not in specific for w in kv.index_to_key], dtype=bool)
    if neutral.any():
        sub = vecs[neutral]
        vecs[neutral] = _unit_rows(sub - np.outer(sub @ g, g))

    for a, b in _equalize_candidates(kv, equalize_pairs):
        ia, ib = kv.key_to_index[a], kv.key_to_index[b]
        mu = (vecs[ia] + vecs[ib]) / 2
        nu = mu - np.dot(mu, g) * g
        z = math.sqrt(max(0.0, 1.0 - float(np.dot(nu, nu))))
        if float(np.dot(vecs[ia] - vecs[ib], g)) < 0:
            z = -z
        vecs[ia] = nu + z * g
        vecs[ib] = nu - z * g
    vecs = _unit_rows(vecs)

    out = KeyedVectors(kv.vector_size)
    out.index_to_key = list(kv.index_to_key)
    out.key_to_index = dict(kv.key_to_index)
    out.vectors = vecs.astype(np.float32)
    out.expandos = {attr: values.copy() for attr, values in kv.expandos.items()}
    return out


# --------------------------------------------------------------------------------------------------
# report


def bias_report(kv: KeyedVectors, n: int = 10, professions=None) -> str:
    """A text report like the paper's: the gender direction's explained variance, the `n` extreme
    she and he occupations side by side with their projections, and DirectBias_1 over the neutral
    professions before and after :func:`hard_debias` (measured along the same direction)."""
    pca = definitional_pca(kv)
    g, ratios = pca.components_[0], pca.explained_variance_ratio_
    she, he = extreme_professions(kv, g, professions=professions, n=n)
    if professions is None:
        neutral = None
    else:
        neutral = [w for w in _present_professions(kv, professions) if w not in GENDER_SPECIFIC]
        if not neutral:
            raise ValueError("every given profession is gender-specific: no neutral word to measure")
    before = direct_bias(kv, g, words=neutral)
    after = direct_bias(hard_debias(kv, g), g, words=neutral)

    width = max([len("extreme she")] + [len(w) for w, _ in she + he]) + 9
    lines = [
        "Gender direction: first principal component of the definitional pairs",
        f"  explained variance ratio: {ratios[0]:.3f} (first) ; next: "
        + ", ".join(f"{r:.3f}" for r in ratios[1:4]),
        "",
        f"{'extreme she':<{width}}  extreme he",
    ]
    for i in range(max(len(she), len(he))):
        left = f"{she[i][0]:<{width - 9}} {she[i][1]:+.4f}" if i < len(she) else ""
        right = f"{he[i][0]:<{width - 9}} {he[i][1]:+.4f}" if i < len(he) else ""
        lines.append(f"{left:<{width}}  {right}".rstrip())
    lines += [
        "",
        f"DirectBias_1 (neutral professions): before {before:.4f}, after hard debiasing {after:.4f}",
    ]
    return "\n".join(lines)
