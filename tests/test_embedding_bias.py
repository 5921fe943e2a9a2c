"""llmkit.embeddings.bias: gender direction, extreme occupations, DirectBias and hard debiasing
(Bolukbasi et al. 2016) on a small synthetic embedding with a planted gender direction."""

import math

import numpy as np
import pytest

from llmkit.embeddings import KeyedVectors
from llmkit.embeddings import bias

DIM = 20
SHE_PROFESSIONS = {"homemaker": 0.9, "nurse": 0.7, "receptionist": 0.5}
HE_PROFESSIONS = {"carpenter": -0.9, "programmer": -0.7, "architect": -0.5}
NEUTRAL_PROFESSIONS = ["teacher", "lawyer", "doctor", "writer", "banker", "chef"]
OTHER_NEUTRAL = ["table", "river", "apple"]
# (male, female) equality pairs planted at -/+ 0.4 g, noise making them asymmetric
EQUALITY = [("king", "queen"), ("King", "Queen"), ("brother", "sister"), ("grandfather", "grandmother"),
            ("uncle", "aunt")]


def _unit(v):
    return v / np.linalg.norm(v)


def make_kv(seed=0, drop=()):
    """Random embedding with a planted gender direction g (she side positive); returns (kv, g)."""
    rng = np.random.default_rng(seed)
    g = _unit(rng.normal(size=DIM))

    def ortho():
        v = rng.normal(size=DIM)
        return _unit(v - (v @ g) * g)

    def noise(scale):
        return scale * rng.normal(size=DIM)

    words, vecs = [], []

    def add(word, vec):
        if word not in drop:
            words.append(word)
            vecs.append(vec)

    for f, m in bias.DEFINITIONAL_PAIRS:
        base = ortho()
        add(f, base + 0.5 * g + noise(0.02))
        add(m, base - 0.5 * g + noise(0.02))
    for m, f in EQUALITY:
        base = ortho()
        add(m, base - 0.4 * g + noise(0.1))
        add(f, base + 0.4 * g + noise(0.1))
    add("actress", ortho() + 0.3 * g)
    add("actor", ortho() - 0.3 * g)
    for w, k in {**SHE_PROFESSIONS, **HE_PROFESSIONS}.items():
        add(w, 3.0 * (ortho() + k * g))  # not unit length: everything must normalise
    for w in NEUTRAL_PROFESSIONS + OTHER_NEUTRAL:
        add(w, ortho())
    kv = KeyedVectors(DIM)
    kv.add_vectors(words, np.array(vecs))
    return kv, g


def make_signed_kv(seed, sign):
    """As make_kv, but the planted gender component mirrored when sign < 0 (she/he swap sides)."""
    kv, g = make_kv(seed)
    if sign > 0:
        return kv, g
    mirror = np.eye(DIM) - 2.0 * np.outer(g, g)  # reflection through the plane orthogonal to g
    out = KeyedVectors(DIM)
    out.add_vectors(list(kv.index_to_key), kv.vectors.astype(np.float64) @ mirror)
    return out, -g


@pytest.fixture(scope="module")
def planted():
    return make_kv(0)


@pytest.fixture(scope="module")
def direction(planted):
    return bias.gender_direction(planted[0])


def unit_of(kv, word):
    return _unit(kv[word].astype(np.float64))


# ----------------------------------------------------------------------------- word lists


def test_word_lists():
    assert len(bias.DEFINITIONAL_PAIRS) == 10
    assert ("she", "he") in bias.DEFINITIONAL_PAIRS and ("Mary", "John") in bias.DEFINITIONAL_PAIRS
    assert len(bias.EQUALIZE_PAIRS) >= 40
    for pair in bias.DEFINITIONAL_PAIRS + bias.EQUALIZE_PAIRS:
        assert len(pair) == 2 and all(w in bias.GENDER_SPECIFIC for w in pair)
    for w in ("actress", "actor", "waitress", "waiter", "queen", "businesswoman"):
        assert w in bias.GENDER_SPECIFIC
    for w in ("nurse", "programmer", "homemaker", "carpenter", "doctor"):
        assert w not in bias.GENDER_SPECIFIC


def test_professions_file(tmp_path):
    words = bias.load_professions()
    assert 250 <= len(words) <= 320
    assert len(set(words)) == len(words)
    assert all(w == w.lower() and " " not in w and not w.startswith("#") for w in words)
    for w in ("nurse", "homemaker", "carpenter", "computer_programmer", "receptionist", "architect"):
        assert w in words
    with open(bias.PROFESSIONS_PATH, encoding="utf8") as fin:
        first = fin.readline()
    assert first.startswith("#") and "CC0" in open(bias.PROFESSIONS_PATH, encoding="utf8").read(400)

    p = tmp_path / "p.txt"
    p.write_text("# header\nnurse\n\n  chef \nnurse\n#x\n", encoding="utf8")
    assert bias.load_professions(p) == ["nurse", "chef"]


# ----------------------------------------------------------------------------- direction


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gender_direction_recovers_planted(seed, sign):
    kv, g = make_signed_kv(seed, sign)
    d = bias.gender_direction(kv)
    assert isinstance(d, np.ndarray) and d.shape == (DIM,) and abs(np.linalg.norm(d) - 1) < 1e-9
    pca = bias.definitional_pca(kv)
    ratios = pca.explained_variance_ratio_
    np.testing.assert_array_equal(pca.components_[0], d)  # the same sign-fixed first component
    assert pca.components_.shape == (10, DIM)
    assert abs(d @ g) > 0.95
    assert (unit_of(kv, "she") - unit_of(kv, "he")) @ d > 0  # sign fixed whatever the SVD gave
    assert d @ g > 0.95  # the planted g points to the she side
    assert len(ratios) == 10
    assert ratios[0] > 0.8 and np.all(np.diff(ratios) <= 1e-12) and ratios.sum() <= 1 + 1e-9


def test_gender_direction_sign_falls_back_to_woman_man():
    for sign in (1.0, -1.0):
        kv, g = make_signed_kv(1, sign)
        rest = [w for w in kv.index_to_key if w not in ("she", "he")]
        small = KeyedVectors(DIM)
        small.add_vectors(rest, kv[rest])
        d = bias.gender_direction(small)
        assert (unit_of(small, "woman") - unit_of(small, "man")) @ d > 0
        assert d @ g > 0.95


def test_gender_direction_matches_pca_by_hand(planted):
    kv, _ = planted
    pairs = [("she", "he"), ("woman", "man"), ("girl", "boy")]
    d, ratios = bias.definitional_pca(kv, pairs=pairs, num_components=2)
    d = d[0]
    np.testing.assert_array_equal(d, bias.gender_direction(kv, pairs=pairs))
    rows = []
    for a, b in pairs:
        va, vb = unit_of(kv, a), unit_of(kv, b)
        c = (va + vb) / 2
        rows += [va - c, vb - c]
    cov = np.cov(np.array(rows).T)
    evals, evecs = np.linalg.eigh(cov)
    assert abs(abs(evecs[:, -1] @ d) - 1) < 1e-9
    np.testing.assert_allclose(ratios, evals[::-1][:2] / evals.sum(), rtol=1e-9, atol=1e-12)


def test_gender_direction_skips_missing_pairs_and_errors():
    kv, g = make_kv(2, drop=("gal", "guy", "Mary"))
    d = bias.gender_direction(kv)
    assert d @ g > 0.95

    keep = ["she", "he", "woman", "nurse"]
    full, _ = make_kv(2)
    small = KeyedVectors(DIM)
    small.add_vectors(keep, full[keep])
    with pytest.raises(ValueError, match="missing words:.*man") as err:
        bias.gender_direction(small)
    assert "girl" in str(err.value) and "found 1 of 10" in str(err.value)
    with pytest.raises(ValueError, match="num_components"):
        bias.definitional_pca(full, num_components=0)


# ----------------------------------------------------------------------------- projections


def test_project(planted, direction):
    kv, _ = planted
    proj = bias.project(kv, ["nurse", "carpenter", "teacher"], direction)
    for w, p in proj.items():
        assert abs(p - unit_of(kv, w) @ direction) < 1e-6
    assert proj["nurse"] > 0.4 and proj["carpenter"] < -0.4 and abs(proj["teacher"]) < 0.05
    assert bias.project(kv, "nurse", 5 * direction) == pytest.approx({"nurse": proj["nurse"]})
    with pytest.raises(KeyError, match="zzz"):
        bias.project(kv, ["nurse", "zzz"], direction)
    with pytest.raises(ValueError, match="size 20"):
        bias.project(kv, ["nurse"], direction[:5])
    with pytest.raises(ValueError, match="non-zero"):
        bias.project(kv, ["nurse"], np.zeros(DIM))


def test_extreme_professions(planted, direction):
    kv, _ = planted
    she, he = bias.extreme_professions(kv, direction, n=3)
    assert [w for w, _ in she] == ["homemaker", "nurse", "receptionist"]
    assert [w for w, _ in he] == ["carpenter", "programmer", "architect"]
    assert she[0][1] > she[1][1] > she[2][1] > 0 > he[2][1] > he[1][1] > he[0][1]
    assert she[0][1] == pytest.approx(bias.project(kv, ["homemaker"], direction)["homemaker"])

    # default list: actress (gendered, weaker) comes right after the planted she-professions
    she10, he10 = bias.extreme_professions(kv, direction)
    assert [w for w, _ in she10][:4] == ["homemaker", "nurse", "receptionist", "actress"]
    assert len(she10) == 10 and len(he10) == 10
    present = [w for w in bias.load_professions() if w in kv]
    assert {w for w, _ in she10} <= set(present) and "table" not in dict(she10)

    she_all, he_all = bias.extreme_professions(kv, direction, professions=["nurse", "chef", "nope"], n=10)
    assert [w for w, _ in she_all] == ["nurse", "chef"] and [w for w, _ in he_all] == ["chef", "nurse"]
    with pytest.raises(ValueError, match="none of the 2 professions"):
        bias.extreme_professions(kv, direction, professions=["nope", "zilch"])
    with pytest.raises(ValueError, match="n must be"):
        bias.extreme_professions(kv, direction, n=-1)


# ----------------------------------------------------------------------------- DirectBias


def test_direct_bias(planted, direction):
    kv, g = planted
    neutral = list(SHE_PROFESSIONS) + list(HE_PROFESSIONS) + NEUTRAL_PROFESSIONS
    cos = np.array([unit_of(kv, w) @ direction for w in neutral])
    assert bias.direct_bias(kv, direction) == pytest.approx(np.mean(np.abs(cos)), rel=1e-6)
    assert bias.direct_bias(kv, direction, c=2) == pytest.approx(np.mean(cos ** 2), rel=1e-6)
    assert bias.direct_bias(kv, direction) > 0.2
    # explicit words are used as given (gender-specific ones too), unknown ones skipped
    assert bias.direct_bias(kv, direction, words=["actress", "nurse", "nope"]) == pytest.approx(
        (abs(unit_of(kv, "actress") @ direction) + abs(unit_of(kv, "nurse") @ direction)) / 2, rel=1e-6)
    assert bias.direct_bias(kv, g, words=OTHER_NEUTRAL) < 1e-6  # planted orthogonal to g
    assert bias.direct_bias(kv, g, words=["homemaker"]) == pytest.approx(0.9 / math.sqrt(1 + 0.9 ** 2), rel=1e-5)
    for c in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="c must be"):
            bias.direct_bias(kv, direction, c=c)
    with pytest.raises(ValueError, match="none of the given words"):
        bias.direct_bias(kv, direction, words=["nope"])


# ----------------------------------------------------------------------------- hard debiasing


def test_hard_debias(planted, direction):
    kv, _ = planted
    before_vectors = kv.vectors.copy()
    before_keys = list(kv.index_to_key)
    before = bias.direct_bias(kv, direction)

    out = bias.hard_debias(kv, direction)
    assert out is not kv and out.vectors is not kv.vectors
    np.testing.assert_array_equal(kv.vectors, before_vectors)  # input untouched
    assert kv.index_to_key == before_keys and out.index_to_key == before_keys
    assert out.vectors.dtype == np.float32 and out.vectors.shape == kv.vectors.shape
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-6)

    assert before > 0.2
    assert bias.direct_bias(out, direction) < 1e-6
    for w in NEUTRAL_PROFESSIONS + list(SHE_PROFESSIONS) + OTHER_NEUTRAL:
        expected = _unit(unit_of(kv, w) - (unit_of(kv, w) @ direction) * direction)
        np.testing.assert_allclose(unit_of(out, w), expected, atol=1e-6)

    # gender-specific words keep the sign of their projection; those outside any pair are untouched
    old = bias.project(kv, ["she", "he", "woman", "man", "queen", "king", "actress", "actor"], direction)
    new = bias.project(out, list(old), direction)
    for w in old:
        assert np.sign(new[w]) == np.sign(old[w]) and abs(new[w]) > 0.1, w
    for w in ("actress", "actor", "Mary", "John"):
        np.testing.assert_allclose(unit_of(out, w), unit_of(kv, w), atol=1e-6)

    # equalized pairs: symmetric about g, equidistant from every neutral word
    pairs = [("he", "she"), ("man", "woman"), ("boy", "girl"), ("father", "mother"), ("son", "daughter"),
             ("male", "female"), ("his", "her"), ("himself", "herself")] + EQUALITY
    for a, b in pairs:
        pa, pb = (unit_of(out, w) @ direction for w in (a, b))
        assert abs(pa + pb) < 1e-6, (a, b)
        assert abs(pa) > 0.05, (a, b)
        for n in NEUTRAL_PROFESSIONS + OTHER_NEUTRAL + ["nurse", "carpenter"]:
            assert abs(out.similarity(a, n) - out.similarity(b, n)) < 1e-6, (a, b, n)
        diff = unit_of(out, a) - unit_of(out, b)
        assert abs(abs(_unit(diff) @ direction) - 1) < 1e-6  # they differ only along g
    # planted orientation kept where the pair words are gender-specific: queen on the she side
    assert unit_of(out, "queen") @ direction > 0 > unit_of(out, "king") @ direction
    # a gendered pair outside EQUALIZE_PAIRS is not equalized: not equidistant from neutral words
    assert max(abs(out.similarity("actress", n) - out.similarity("actor", n)) for n in NEUTRAL_PROFESSIONS) > 1e-2


def test_hard_debias_equalize_matches_debiaswe_rule(planted, direction):
    kv, _ = planted
    out = bias.hard_debias(kv, direction, gender_specific=bias.GENDER_SPECIFIC, equalize_pairs=[("sister", "brother")])
    e1, e2 = unit_of(kv, "sister"), unit_of(kv, "brother")  # gender-specific: not neutralized
    mu = (e1 + e2) / 2
    nu = mu - (mu @ direction) * direction
    z = math.sqrt(1 - nu @ nu)
    if (e1 - e2) @ direction < 0:
        z = -z
    np.testing.assert_allclose(unit_of(out, "sister"), _unit(nu + z * direction), atol=1e-6)
    np.testing.assert_allclose(unit_of(out, "brother"), _unit(nu - z * direction), atol=1e-6)
    # "uncle"/"aunt" not in the given pairs: left as they were
    np.testing.assert_allclose(unit_of(out, "aunt"), unit_of(kv, "aunt"), atol=1e-6)


def test_hard_debias_defaults_and_errors(planted, direction):
    kv, _ = planted
    np.testing.assert_allclose(bias.hard_debias(kv).vectors, bias.hard_debias(kv, 2.0 * direction).vectors,
                               atol=1e-6)
    everything = bias.hard_debias(kv, direction, gender_specific=(), equalize_pairs=())
    assert bias.direct_bias(everything, direction, words=list(kv.index_to_key)) < 1e-6
    with pytest.raises(ValueError, match="size 20"):
        bias.hard_debias(kv, np.ones(3))
    with pytest.raises(ValueError, match="two words"):
        bias.hard_debias(kv, direction, equalize_pairs=[("a", "b", "c")])


# ----------------------------------------------------------------------------- report


def test_bias_report(planted):
    kv, _ = planted
    text = bias.bias_report(kv, n=3)
    assert "extreme she" in text and "extreme he" in text
    rows = text.splitlines()
    header = next(i for i, line in enumerate(rows) if "extreme she" in line)
    first = rows[header + 1].split()
    assert first[0] == "homemaker" and first[2] == "carpenter"
    assert float(first[1]) > 0 > float(first[3])
    assert rows[header + 3].split()[0] == "receptionist" and rows[header + 3].split()[2] == "architect"
    assert "explained variance ratio" in text
    last = rows[-1]
    assert "DirectBias" in last and "after hard debiasing 0.0000" in last
    before = float(last.split("before ")[1].split(",")[0])
    assert before == pytest.approx(bias.direct_bias(kv, bias.gender_direction(kv)), abs=1e-4)
    with pytest.raises(ValueError, match="none of the"):
        bias.bias_report(kv, professions=["nope"])
