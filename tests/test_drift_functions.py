"""fastml.drift's exact two-sample functions against SciPy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.spatial.distance as ssd
import scipy.stats as ss
from hypothesis import example, given
from hypothesis import strategies as st

from fastml import _core, drift


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(b), 1e-300)


# Samples with many ties: values drawn from a small pool, or continuous.
@st.composite
def samples(draw, max_size=300):
    n = draw(st.integers(1, max_size))
    tied = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if tied:
        return rng.integers(0, draw(st.integers(1, 12)), size=n).astype(np.float64)
    shift = draw(st.floats(-1, 1))
    return rng.normal(shift, 1.0, size=n)


@given(samples(), samples())
# Heavy ties where SciPy's exact computation gives up ("Exact calculation
# unsuccessful. Switching to method=asymp.", a RuntimeWarning): found by random
# exploration (issue #13); fastml switches the same way and says exact=False.
@example(
    a=np.array(
        [
            2,
            1,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
            2,
            1,
            2,
            1,
            1,
            2,
            2,
            1,
            1,
            1,
            2,
            0,
            2,
            2,
            0,
            1,
            2,
            1,
            0,
            2,
            2,
            2,
            0,
            0,
            2,
            0,
            1,
        ],
        dtype=np.float64,
    ),
    b=np.array(
        [
            1,
            1,
            2,
            2,
            0,
            0,
            2,
            2,
            0,
            0,
            2,
            1,
            0,
            2,
            0,
            1,
            1,
            1,
            0,
            0,
            2,
            2,
            2,
            1,
            2,
            0,
            1,
            2,
            0,
            0,
            0,
            1,
            2,
            0,
            1,
            1,
        ],
        dtype=np.float64,
    ),
)
def test_ks_2samp_matches_scipy_small(a, b):
    ours = drift.ks_2samp(a, b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        ref = ss.ks_2samp(a, b)
    scipy_gave_up = any("Exact calculation unsuccessful" in str(w.message) for w in caught)
    assert ours.statistic == ref.statistic
    assert _rel(ours.pvalue, ref.pvalue) <= 1e-10
    assert ours.exact == (max(a.size, b.size) <= 10000 and not scipy_gave_up)


@pytest.mark.parametrize(
    ("n1", "n2", "shift"),
    [
        (10000, 10000, 0.0),  # largest exact, equal sizes
        (9999, 10000, 0.03),  # largest exact, lattice method
        (10001, 10001, 0.0),  # smallest asymptotic
        (20000, 15000, 0.02),  # asymptotic, Durbin or Pelz-Good region
        (30, 20000, 0.2),  # asymptotic with a tiny n (n <= 140 branches)
        (200, 12000, 0.5),  # asymptotic, one-sided Smirnov sum
        (100000, 100000, 0.01),  # asymptotic, large n
        (250000, 250000, 0.0),  # Pelz-Good
    ],
)
def test_ks_2samp_matches_scipy_large(n1, n2, shift):
    rng = np.random.default_rng(n1 + n2)
    a = rng.normal(size=n1)
    b = rng.normal(shift, size=n2)
    ours = drift.ks_2samp(a, b)
    ref = ss.ks_2samp(a, b)
    assert ours.statistic == ref.statistic
    assert _rel(ours.pvalue, ref.pvalue) <= 1e-10


@pytest.mark.parametrize("n", [1, 2, 5, 30, 140, 141, 500, 5000, 100000, 100001, 2000000])
def test_kstwo_sf_matches_scipy(n):
    xs = np.unique(np.r_[np.linspace(0.0, 1.0, 41), 0.5 / n, 1.0 / n, 2.0 / n, 1.4 / np.sqrt(n)])
    xs = xs[(xs >= 0) & (xs <= 1)]
    for x in xs:
        ours = _core._drift_kstwo_sf(n, float(x))
        ref = float(ss.kstwo.sf(x, n))
        if ref < 1e-300:
            assert ours < 1e-290
        else:
            assert _rel(ours, ref) <= 1e-10, (n, x, ours, ref)


@given(samples(500), samples(500), st.booleans())
def test_wasserstein_matches_scipy(a, b, weighted):
    if weighted:
        rng = np.random.default_rng(a.size * 7 + b.size)
        wa, wb = rng.uniform(0.1, 2.0, a.size), rng.uniform(0.1, 2.0, b.size)
        ours = drift.wasserstein_distance(a, b, wa, wb)
        ref = ss.wasserstein_distance(a, b, wa, wb)
    else:
        ours = drift.wasserstein_distance(a, b)
        ref = ss.wasserstein_distance(a, b)
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-300)


def test_wasserstein_large():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=200000), rng.standard_t(5, size=150000)
    assert _rel(drift.wasserstein_distance(a, b), ss.wasserstein_distance(a, b)) <= 1e-12


@given(
    st.lists(st.integers(0, 10000), min_size=2, max_size=40),
    st.integers(0, 2**32 - 1),
)
def test_chi2_test_matches_scipy(ref_counts, seed):
    rng = np.random.default_rng(seed)
    r = np.asarray(ref_counts, dtype=np.float64)
    c = rng.integers(0, 5000, size=r.size).astype(np.float64)
    keep = (r + c) > 0
    if keep.sum() < 2 or r.sum() == 0 or c.sum() == 0:
        with pytest.raises(ValueError, match="ref_counts"):
            drift.chi2_test(r, c)
        return
    ours = drift.chi2_test(r, c)
    stat, p, dof, _ = ss.chi2_contingency(np.stack([r[keep], c[keep]]))
    assert ours.dof == dof
    assert ours.statistic == pytest.approx(stat, rel=1e-12, abs=1e-12)
    assert ours.pvalue == pytest.approx(p, rel=1e-9, abs=1e-300)


def test_chi2_test_equals_chisquare_statistic_shape():
    # Two-row homogeneity with Yates correction at one degree of freedom.
    ours = drift.chi2_test([10, 20], [30, 5])
    stat, p, dof, _ = ss.chi2_contingency([[10, 20], [30, 5]])
    assert dof == 1 and ours.statistic == pytest.approx(stat, rel=1e-12)
    assert ours.pvalue == pytest.approx(p, rel=1e-10)


@given(samples(400), samples(400), st.integers(1, 20))
def test_psi_and_js_match_numpy_reference(a, b, bins):
    edges = np.unique(np.quantile(a, np.linspace(0, 1, bins + 1)))
    if edges.size == 1:
        edges = np.array([edges[0], edges[0]])
    inner = edges[1:-1]
    ha = np.bincount(np.searchsorted(inner, a, side="right"), minlength=edges.size - 1) / a.size
    hb = np.bincount(np.searchsorted(inner, b, side="right"), minlength=edges.size - 1) / b.size
    pa, pb = np.clip(ha, 1e-4, None), np.clip(hb, 1e-4, None)
    assert drift.psi(a, b, bins=bins) == pytest.approx(
        np.sum((pb - pa) * np.log(pb / pa)), rel=1e-12, abs=1e-15
    )
    js = ssd.jensenshannon(ha, hb)
    assert drift.js_distance(a, b, bins=bins) == pytest.approx(
        0.0 if np.isnan(js) else js, rel=1e-9, abs=1e-7
    )


def test_function_errors_name_the_argument():
    with pytest.raises(ValueError, match="a must not be empty"):
        drift.ks_2samp([], [1.0])
    with pytest.raises(ValueError, match="b contains NaN"):
        drift.ks_2samp([1.0], [np.nan])
    with pytest.raises(TypeError, match="a must be numeric"):
        drift.wasserstein_distance(["x"], [1.0])
    with pytest.raises(ValueError, match="a_weights and b_weights"):
        drift.wasserstein_distance([1.0], [2.0], a_weights=[1.0])
    with pytest.raises(ValueError, match="bins must be a positive int"):
        drift.psi([1.0, 2.0], [1.0], bins=0)
    with pytest.raises(ValueError, match="same length"):
        drift.chi2_test([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        drift.chi2_test([1, -2], [1, 2])


def test_ks_releases_the_gil():
    from _drift_helpers import progress_during

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=1_000_000), rng.normal(size=1_000_000)
    # A Python thread keeps counting while the native sort + KS runs.
    assert progress_during(lambda: drift.ks_2samp(a, b)) > 1000


@given(
    a=st.lists(st.sampled_from([0.0, 1.5, -2.0, np.inf, -np.inf]), min_size=1, max_size=6),
    b=st.lists(st.sampled_from([0.0, 3.0, np.inf, -np.inf]), min_size=1, max_size=6),
)
def test_wasserstein_with_infinities_matches_scipy(a, b):
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = ss.wasserstein_distance(a, b)
    got = drift.wasserstein_distance(a, b)
    assert (np.isnan(got) and np.isnan(want)) or got == want


def test_complex_and_duplicate_columns_are_refused():
    import pandas as pd

    with pytest.raises(TypeError, match="column 'z' is complex"):
        drift.Profile.from_data({"z": np.array([1 + 2j, 3 + 0j])})
    with pytest.raises(ValueError, match=r"duplicate column names: \['a'\]"):
        drift.Profile.from_data(pd.DataFrame([[1, 2], [3, 4]], columns=["a", "a"]))
