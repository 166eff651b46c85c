"""Exact two-sample functions on arrays (native, agreeing with SciPy)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from fastml import _core

#: Probabilities below this are clipped before logs (PSI, KL): empty bins
#: would otherwise make the divergences infinite.
EPS = 1e-4


class KsResult(NamedTuple):
    """Two-sided two-sample Kolmogorov-Smirnov result."""

    statistic: float
    pvalue: float
    exact: bool


class Chi2Result(NamedTuple):
    """Chi-square test of homogeneity of a 2 x k table of counts."""

    statistic: float
    pvalue: float
    dof: int


def _sample(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; drop missing values first")
    return arr


def ks_2samp(a: Any, b: Any) -> KsResult:
    """Two-sided two-sample Kolmogorov-Smirnov test.

    Matches ``scipy.stats.ks_2samp(a, b)`` (``method="auto"``): the exact
    p-value when both samples have at most 10,000 values (the statistic then
    rounded to a multiple of ``1 / lcm(len(a), len(b))`` as SciPy does),
    otherwise the asymptotic ``kstwo`` distribution. Sorting and the p-value
    run natively with the GIL released. NaN raises ``ValueError``.
    """
    x, y = _sample(a, "a"), _sample(b, "b")
    stat, p, exact = _core._drift_ks_2samp(x, y)
    return KsResult(float(stat), float(p), bool(exact))


def wasserstein_distance(
    a: Any, b: Any, a_weights: Any | None = None, b_weights: Any | None = None
) -> float:
    """First Wasserstein distance between two 1-D samples (optionally weighted).

    The integral of ``|F_a - F_b|``, as ``scipy.stats.wasserstein_distance``.
    """
    x, y = _sample(a, "a"), _sample(b, "b")
    if (a_weights is None) != (b_weights is None):
        raise ValueError("a_weights and b_weights must be given together")
    if a_weights is not None:
        wa = np.ascontiguousarray(a_weights, dtype=np.float64).ravel()
        wb = np.ascontiguousarray(b_weights, dtype=np.float64).ravel()
        if wa.shape != x.shape or wb.shape != y.shape:
            raise ValueError(
                f"a_weights and b_weights must match a and b in length, got "
                f"{wa.size} for {x.size} and {wb.size} for {y.size}"
            )
        if (wa < 0).any() or (wb < 0).any() or wa.sum() <= 0 or wb.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
    else:
        wa = wb = None
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return _wasserstein_nonfinite(x, y, wa, wb)
    if wa is not None:
        return float(_core._drift_wasserstein(x, y, wa, wb))
    return float(_core._drift_wasserstein(x, y))


def _wasserstein_nonfinite(x: np.ndarray, y: np.ndarray, wa: Any, wb: Any) -> float:
    """SciPy's CDF-distance formula, for samples holding +-inf (inf where SciPy
    gives inf, NaN where it gives NaN); the native path takes finite samples."""
    xs, ys = np.argsort(x), np.argsort(y)
    values = np.sort(np.concatenate((x, y)))
    with np.errstate(invalid="ignore"):
        deltas = np.diff(values)
        xi = np.searchsorted(x[xs], values[:-1], "right")
        yi = np.searchsorted(y[ys], values[:-1], "right")
        if wa is None:
            fx, fy = xi / x.size, yi / y.size
        else:
            cx = np.concatenate(([0.0], np.cumsum(wa[xs])))
            cy = np.concatenate(([0.0], np.cumsum(wb[ys])))
            fx, fy = cx[xi] / cx[-1], cy[yi] / cy[-1]
        return float(np.sum(np.multiply(np.abs(fx - fy), deltas)))


def _equal_mass_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    finite = reference[np.isfinite(reference)]
    if finite.size == 0:
        return np.array([0.0, 0.0])
    edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size == 1:
        edges = np.array([edges[0], edges[0]])
    return edges


def _binned(a: Any, b: Any, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of a and b over a's equal-mass edges, outliers in the end bins."""
    x, y = _sample(a, "a"), _sample(b, "b")
    edges = _equal_mass_edges(x, bins)
    inner = edges[1:-1]
    hx = np.bincount(np.searchsorted(inner, x, side="right"), minlength=edges.size - 1)
    hy = np.bincount(np.searchsorted(inner, y, side="right"), minlength=edges.size - 1)
    return hx.astype(np.float64), hy.astype(np.float64)


def _probs(h: np.ndarray) -> np.ndarray:
    total = h.sum()
    return h / total if total > 0 else np.zeros_like(h)


def psi_from_counts(ref: np.ndarray, cur: np.ndarray) -> float:
    """Population stability index of two count vectors over the same bins."""
    p = np.clip(_probs(ref), EPS, None)
    q = np.clip(_probs(cur), EPS, None)
    return float(np.sum((q - p) * np.log(q / p)))


def kl_from_counts(ref: np.ndarray, cur: np.ndarray) -> float:
    """KL divergence KL(current || reference), natural log, clipped at EPS."""
    p = np.clip(_probs(ref), EPS, None)
    q = np.clip(_probs(cur), EPS, None)
    return float(np.sum(q * np.log(q / p)))


def js_from_counts(ref: np.ndarray, cur: np.ndarray) -> float:
    """Jensen-Shannon distance (natural log), as scipy.spatial.distance.jensenshannon."""
    p, q = _probs(ref), _probs(cur)
    m = (p + q) / 2.0

    def _rel(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log(x[nz] / m[nz])))

    return float(np.sqrt(max(0.0, (_rel(p) + _rel(q)) / 2.0)))


def hellinger_from_counts(ref: np.ndarray, cur: np.ndarray) -> float:
    """Hellinger distance, in [0, 1]."""
    p, q = _probs(ref), _probs(cur)
    return float(np.sqrt(max(0.0, 0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2))))


def tv_from_counts(ref: np.ndarray, cur: np.ndarray) -> float:
    """Total variation distance, in [0, 1]."""
    return float(0.5 * np.sum(np.abs(_probs(ref) - _probs(cur))))


def psi(a: Any, b: Any, bins: int = 10) -> float:
    """Population stability index of ``b`` against reference ``a``.

    Bins are ``bins`` equal-mass bins of ``a`` (values outside ``a``'s range
    fall in the end bins); bin probabilities are clipped at ``EPS`` = 1e-4.
    """
    ha, hb = _binned(a, b, bins)
    return psi_from_counts(ha, hb)


def js_distance(a: Any, b: Any, bins: int = 10) -> float:
    """Jensen-Shannon distance (natural log) between the binned samples.

    Same bins as :func:`psi`; equals ``scipy.spatial.distance.jensenshannon``
    of the two histograms.
    """
    ha, hb = _binned(a, b, bins)
    return js_from_counts(ha, hb)


def chi2_test(ref_counts: Any, cur_counts: Any) -> Chi2Result:
    """Chi-square test that two count vectors come from one distribution.

    The test of homogeneity of the 2 x k table ``[ref_counts, cur_counts]``,
    equal to ``scipy.stats.chi2_contingency`` (with its Yates correction when
    ``dof == 1``). Categories with zero counts in both rows are dropped.
    """
    r = np.asarray(ref_counts, dtype=np.float64).ravel()
    c = np.asarray(cur_counts, dtype=np.float64).ravel()
    if r.shape != c.shape:
        raise ValueError(
            f"ref_counts and cur_counts must have the same length, got {r.size} and {c.size}"
        )
    if not (np.isfinite(r).all() and np.isfinite(c).all()) or (r < 0).any() or (c < 0).any():
        raise ValueError("ref_counts and cur_counts must be finite and non-negative")
    keep = (r + c) > 0
    table = np.stack([r[keep], c[keep]])
    if table.shape[1] < 2 or (table.sum(axis=1) <= 0).any():
        raise ValueError(
            "ref_counts and cur_counts need at least 2 non-empty categories and a "
            "positive total each"
        )
    dof = table.shape[1] - 1
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    observed = table
    if dof == 1:
        diff = expected - observed
        observed = observed + np.minimum(0.5, np.abs(diff)) * np.sign(diff)
    stat = float(np.sum((observed - expected) ** 2 / expected))
    return Chi2Result(stat, float(_core._drift_chi2_sf(stat, float(dof))), int(dof))
