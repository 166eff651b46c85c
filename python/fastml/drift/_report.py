"""Per-feature drift results and the Report that holds them."""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastml.drift import _functions as F
from fastml.drift._profile import Profile

#: Reference rows at or below which the default tests are KS / chi-square.
SMALL_REFERENCE_ROWS = 1000
#: Default thresholds: p-value below which KS/chi-square say "drift", and the
#: distance above which the distance tests say "drift".
DEFAULT_THRESHOLDS = {
    "ks": 0.05,
    "chi2": 0.05,
    "wasserstein": 0.1,
    "js": 0.1,
    "psi": 0.2,
    "hellinger": 0.1,
    "tv": 0.1,
    "kl": 0.1,
}
PVALUE_TESTS = {"ks", "chi2"}
#: Default data-quality thresholds (docs/drift.md, "Data quality"): a missing
#: rate drifts when a two-proportion z-test gives p below ``missing_pvalue``
#: and the rate moved by at least ``missing_change`` (large windows make tiny
#: changes significant, as with KS); new categories drift when their share of
#: the current window exceeds ``new_category_share``.
DEFAULT_QUALITY = {"missing_pvalue": 0.05, "missing_change": 0.02, "new_category_share": 0.05}
NUMERIC_TESTS = {"ks", "wasserstein", "psi", "js", "hellinger", "tv", "kl"}
CATEGORICAL_TESTS = {"chi2", "js", "psi", "hellinger", "tv", "kl"}


@dataclass
class FeatureResult:
    """The drift verdict and metrics of one feature.

    ``status`` is ``"drift"``, ``"ok"``, ``"inconclusive"`` (sketch mode: the
    statistic's error bound straddles the threshold) or ``"no_data"``.
    ``bound`` is the statistic's error bound (0 in exact mode).
    """

    name: str
    kind: str
    test: str
    statistic: float
    threshold: float
    status: str
    p_value: float | None = None
    bound: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    # What the HTML report draws: bin labels and reference/current shares.
    labels: list[str] = field(default_factory=list)
    reference_share: list[float] = field(default_factory=list)
    current_share: list[float] = field(default_factory=list)

    quality: list[QualityCheck] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        """True when the status is ``"drift"``."""
        return self.status == "drift"

    @property
    def reasons(self) -> list[str]:
        """Why the feature drifts: ``"distribution"`` and/or the data-quality checks that fired."""
        out = ["distribution"] if self.distribution_status == "drift" else []
        return out + [q.check for q in self.quality if q.status == "drift"]

    @property
    def distribution_status(self) -> str:
        """The verdict of the distribution test alone (``status`` adds data quality)."""
        return self._distribution_status or self.status

    _distribution_status: str = field(default="", repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "test": self.test,
            "statistic": _num(self.statistic),
            "p_value": None if self.p_value is None else _num(self.p_value),
            "threshold": self.threshold,
            "bound": _num(self.bound),
            "status": self.status,
            "drifted": self.drifted,
            "metrics": {k: _num(v) for k, v in self.metrics.items()},
            "labels": list(self.labels),
            "reference_share": [float(x) for x in self.reference_share],
            "current_share": [float(x) for x in self.current_share],
            "distribution_status": self.distribution_status,
            "reasons": self.reasons,
            "quality": [q.to_dict() for q in self.quality],
        }


@dataclass
class QualityCheck:
    """One data-quality verdict of a feature: ``check`` is ``"missing_rate"``
    (two-proportion z-test of the missing rates, with a minimum change),
    ``"all_missing"`` (every current value missing, not so in the reference) or
    ``"new_category"`` (share of categories the reference never had)."""

    check: str
    reference: float
    current: float
    status: str
    p_value: float | None = None
    threshold: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "reference": _num(self.reference),
            "current": _num(self.current),
            "status": self.status,
            "p_value": None if self.p_value is None else _num(self.p_value),
            "threshold": self.threshold,
        }


def _num(x: float) -> float | None:
    """JSON-safe float (NaN/inf become None)."""
    x = float(x)
    return x if math.isfinite(x) else None


class Report:
    """Drift of every feature of a window against the reference.

    ``features`` maps names to :class:`FeatureResult`; ``dataset_drift`` is
    True when at least ``dataset_share`` of the features drift.
    """

    def __init__(
        self,
        features: dict[str, FeatureResult],
        dataset_share: float,
        reference_rows: float,
        current_rows: float,
        unmonitored: list[str] | None = None,
    ) -> None:
        self.features = features
        self.dataset_share = dataset_share
        self.reference_rows = reference_rows
        self.current_rows = current_rows
        #: Columns of the batches that the Monitor ignored (``extra_columns="ignore"``).
        self.unmonitored = list(unmonitored or [])

    @property
    def drifted_features(self) -> list[str]:
        """Names of the features whose status is ``"drift"``."""
        return [n for n, r in self.features.items() if r.drifted]

    @property
    def drift_share(self) -> float:
        """Fraction of features that drift."""
        return len(self.drifted_features) / len(self.features) if self.features else 0.0

    @property
    def dataset_drift(self) -> bool:
        """True when at least ``dataset_share`` of the features drift."""
        return bool(self.features) and self.drift_share >= self.dataset_share

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return {
            "dataset_drift": self.dataset_drift,
            "drift_share": self.drift_share,
            "dataset_share_threshold": self.dataset_share,
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
            "features": {n: r.to_dict() for n, r in self.features.items()},
            "unmonitored": list(self.unmonitored),
        }

    def to_json(self, indent: int | None = None) -> str:
        """The report as JSON (non-finite numbers become null)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_html(self, path: str | os.PathLike[str]) -> str:
        """Write one self-contained HTML file (inline SVG, no network); returns its path."""
        from fastml.drift._html import render_html

        text = render_html(self)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return os.fspath(path)

    def to_prometheus(self, registry: Any | None = None) -> Any:
        """Export gauges to a prometheus-client registry (a new one when None).

        Gauges: ``fastml_drift_statistic{feature,test}``, ``fastml_drift_pvalue{feature,test}``
        (p-value tests), ``fastml_drift_detected{feature}`` (1/0),
        ``fastml_drift_inconclusive{feature}``, ``fastml_drift_dataset_drift`` and
        ``fastml_drift_share``.
        """
        try:
            from prometheus_client import CollectorRegistry, Gauge
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "to_prometheus needs prometheus-client (pip install prometheus-client)"
            ) from e
        reg = registry if registry is not None else CollectorRegistry()
        stat = Gauge(
            "fastml_drift_statistic",
            "Drift test statistic per feature",
            ["feature", "test"],
            registry=reg,
        )
        pval = Gauge(
            "fastml_drift_pvalue",
            "Drift test p-value per feature",
            ["feature", "test"],
            registry=reg,
        )
        det = Gauge("fastml_drift_detected", "1 when the feature drifts", ["feature"], registry=reg)
        inc = Gauge(
            "fastml_drift_inconclusive",
            "1 when the verdict is inconclusive",
            ["feature"],
            registry=reg,
        )
        ds = Gauge("fastml_drift_dataset_drift", "1 when the data set drifts", registry=reg)
        share = Gauge("fastml_drift_share", "Fraction of features that drift", registry=reg)
        for name, r in self.features.items():
            stat.labels(feature=name, test=r.test).set(float(r.statistic))
            if r.p_value is not None:
                pval.labels(feature=name, test=r.test).set(float(r.p_value))
            det.labels(feature=name).set(1.0 if r.drifted else 0.0)
            inc.labels(feature=name).set(1.0 if r.status == "inconclusive" else 0.0)
        ds.set(1.0 if self.dataset_drift else 0.0)
        share.set(self.drift_share)
        return reg

    def __repr__(self) -> str:
        return (
            f"Report(features={len(self.features)}, drifted={self.drifted_features}, "
            f"dataset_drift={self.dataset_drift})"
        )


# ---------------------------------------------------------------- computing a report


def default_test(kind: str, reference_rows: float) -> str:
    """The documented default test for a feature of ``kind`` and reference size."""
    small = reference_rows <= SMALL_REFERENCE_ROWS
    if kind == "numeric":
        return "ks" if small else "wasserstein"
    return "chi2" if small else "js"


def _verdict(test: str, stat: float, bound: float, threshold: float) -> str:
    """Distance tests drift above the threshold, p-value tests below it; a bound
    that straddles the threshold gives "inconclusive"."""
    if not math.isfinite(stat):
        return "no_data"
    if test in PVALUE_TESTS:
        lo, hi = stat - bound, stat + bound  # here `bound` spans the p-value
        if hi < threshold:
            return "drift"
        if lo >= threshold:
            return "ok"
        return "inconclusive"
    if stat - bound > threshold:
        return "drift"
    if stat + bound <= threshold:
        return "ok"
    return "inconclusive"


def _numeric_result(
    ref: Profile, cur: Profile, i: int, name: str, test: str, threshold: float
) -> FeatureResult:
    rs = ref._native.numeric_summary(i)
    cs = cur._native.numeric_summary(i)
    rh, ch = np.asarray(rs["hist"]), np.asarray(cs["hist"])
    edges = np.asarray(rs["edges"])
    labels = ["< " + _fmt(edges[0])] + [
        f"{_fmt(a)} .. {_fmt(b)}" for a, b in itertools.pairwise(edges)
    ]
    labels.append("> " + _fmt(edges[-1]))
    ref_total = rs["count"] + rs["missing"] + rs["nonfinite"]
    cur_total = cs["count"] + cs["missing"] + cs["nonfinite"]
    result = FeatureResult(name, "numeric", test, float("nan"), threshold, "no_data", labels=labels)
    result.reference_share = list(F._probs(rh))
    result.current_share = list(F._probs(ch))
    if cs["count"] <= 0 or rs["count"] <= 0:
        return result
    ref_std = math.sqrt(rs["m2"] / rs["count"])
    cur_std = math.sqrt(cs["m2"] / cs["count"])
    scale = ref_std if ref_std > 0 else 1.0
    cmp = dict(ref._native.compare_numeric(i, cur._native, i))
    m: dict[str, float] = {
        "psi": F.psi_from_counts(rh, ch),
        "kl": F.kl_from_counts(rh, ch),
        "js": F.js_from_counts(rh, ch),
        "hellinger": F.hellinger_from_counts(rh, ch),
        "tv": F.tv_from_counts(rh, ch),
        "mean_shift": (cs["mean"] - rs["mean"]) / scale,
        "std_ratio": cur_std / ref_std if ref_std > 0 else float("nan"),
        "missing_rate_change": (cs["missing"] / cur_total if cur_total else 0.0)
        - (rs["missing"] / ref_total if ref_total else 0.0),
        "nonfinite_rate_change": (cs["nonfinite"] / cur_total if cur_total else 0.0)
        - (rs["nonfinite"] / ref_total if ref_total else 0.0),
        "reference_mean": rs["mean"],
        "current_mean": cs["mean"],
    }
    if cmp["available"]:
        m.update(
            ks_statistic=cmp["ks_statistic"],
            ks_pvalue=cmp["ks_pvalue"],
            ks_bound=cmp["ks_bound"],
            wasserstein=cmp["wasserstein"],
            wasserstein_norm=cmp["wasserstein"] / scale,
            wasserstein_bound=cmp["wasserstein_bound"],
        )
    result.metrics = m
    bound = 0.0
    p_value = None
    if test == "ks":
        if not cmp["available"]:
            return result
        stat = cmp["ks_pvalue"]
        p_value = stat
        # Sketch mode: the p-values at D -/+ bound give the p-value's range.
        lo, hi = cmp["ks_pvalue_low"], cmp["ks_pvalue_high"]
        stat_mid = (lo + hi) / 2.0 if hi != lo else stat
        bound = (hi - lo) / 2.0
        result.status = _verdict("ks", stat_mid, bound, threshold)
        result.statistic = cmp["ks_statistic"]
        result.bound = cmp["ks_bound"]
        result.p_value = p_value
        return result
    if test == "wasserstein":
        if not cmp["available"]:
            return result
        stat = cmp["wasserstein"] / scale
        bound = cmp["wasserstein_bound"] / scale
    else:
        stat = m[test]
    result.statistic = stat
    result.bound = bound
    result.status = _verdict(test, stat, bound, threshold)
    return result


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _categorical_result(
    ref: Profile, cur: Profile, i: int, name: str, test: str, threshold: float
) -> FeatureResult:
    rs = ref._native.categorical_summary(i)
    cs = cur._native.categorical_summary(i)
    rc: dict[str, float] = dict(rs["counts"])
    cc: dict[str, float] = dict(cs["counts"])
    keys = sorted(rc)
    ref_overflowed = rs["other"] > 0
    unseen = sum(v for k, v in cc.items() if k not in rc)
    new = 0.0 if ref_overflowed else unseen
    cur_other = cs["other"] + (unseen if ref_overflowed else 0.0)
    if not ref_overflowed and cs["other"] > 0:
        new += cs["other"]  # the current window's own overflow never appeared in the reference
        cur_other = 0.0
    ref_vec = np.array([rc[k] for k in keys] + [rs["other"], 0.0])
    cur_vec = np.array([cc.get(k, 0.0) for k in keys] + [cur_other, new])
    labels = [*keys, "(other)", "(new)"]
    result = FeatureResult(
        name, "categorical", test, float("nan"), threshold, "no_data", labels=labels
    )
    result.reference_share = list(F._probs(ref_vec))
    result.current_share = list(F._probs(cur_vec))
    if cs["total"] <= 0 or rs["total"] <= 0:
        return result
    ref_all = rs["total"] + rs["missing"]
    cur_all = cs["total"] + cs["missing"]
    m: dict[str, float] = {
        "psi": F.psi_from_counts(ref_vec, cur_vec),
        "kl": F.kl_from_counts(ref_vec, cur_vec),
        "js": F.js_from_counts(ref_vec, cur_vec),
        "hellinger": F.hellinger_from_counts(ref_vec, cur_vec),
        "tv": F.tv_from_counts(ref_vec, cur_vec),
        "new_category_share": new / cs["total"],
        "missing_rate_change": cs["missing"] / cur_all - rs["missing"] / ref_all,
    }
    try:
        chi = F.chi2_test(ref_vec, cur_vec)
        m["chi2_statistic"], m["chi2_pvalue"] = chi.statistic, chi.pvalue
    except ValueError:  # a single category in both: nothing to test
        m["chi2_statistic"], m["chi2_pvalue"] = 0.0, 1.0
    result.metrics = m
    if test == "chi2":
        result.statistic = m["chi2_statistic"]
        result.p_value = m["chi2_pvalue"]
        result.status = _verdict("chi2", m["chi2_pvalue"], 0.0, threshold)
    else:
        result.statistic = m[test]
        result.status = _verdict(test, m[test], 0.0, threshold)
    return result


def two_proportion_pvalue(k1: float, n1: float, k2: float, n2: float) -> float:
    """Two-sided p-value of the pooled two-proportion z-test of k1/n1 against k2/n2."""
    if n1 <= 0 or n2 <= 0:
        return 1.0
    pooled = (k1 + k2) / (n1 + n2)
    var = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if var <= 0:
        return 1.0 if k1 / n1 == k2 / n2 else 0.0
    z = (k2 / n2 - k1 / n1) / math.sqrt(var)
    return math.erfc(abs(z) / math.sqrt(2.0))


def _quality(
    result: FeatureResult, missing: tuple[float, float, float, float], quality: dict[str, float]
) -> None:
    """Adds the missing-rate checks to ``result`` and folds them into its status."""
    ref_missing, ref_all, cur_missing, cur_all = missing
    if cur_all <= 0:
        return
    r_rate = ref_missing / ref_all if ref_all else 0.0
    c_rate = cur_missing / cur_all
    p = two_proportion_pvalue(ref_missing, ref_all, cur_missing, cur_all)
    moved = abs(c_rate - r_rate) >= quality["missing_change"]
    result.quality.append(
        QualityCheck(
            "missing_rate",
            r_rate,
            c_rate,
            "drift" if p < quality["missing_pvalue"] and moved else "ok",
            p_value=p,
            threshold=quality["missing_pvalue"],
        )
    )
    if c_rate >= 1.0:
        result.quality.append(
            QualityCheck(
                "all_missing", r_rate, c_rate, "drift" if r_rate < 1.0 else "ok", None, 1.0
            )
        )


def _fold_quality(result: FeatureResult) -> None:
    result._distribution_status = result.status
    if any(q.status == "drift" for q in result.quality):
        result.status = "drift"


def build_report(
    ref: Profile,
    cur: Profile,
    tests: dict[str, str],
    thresholds: dict[str, float],
    dataset_share: float,
    quality: dict[str, float] | None = None,
    unmonitored: list[str] | None = None,
) -> Report:
    """Compare ``cur`` against ``ref`` feature by feature: the distribution test,
    then the data-quality checks (their ``drift`` makes the feature drift too)."""
    q = dict(DEFAULT_QUALITY, **(quality or {}))
    results: dict[str, FeatureResult] = {}
    for i, (name, kind) in enumerate(ref.kinds.items()):
        if kind == "numeric":
            r = _numeric_result(ref, cur, i, name, tests[name], thresholds[name])
            rs, cs = ref._native.numeric_summary(i), cur._native.numeric_summary(i)
            ref_all = rs["count"] + rs["missing"] + rs["nonfinite"]
            cur_all = cs["count"] + cs["missing"] + cs["nonfinite"]
            _quality(r, (rs["missing"], ref_all, cs["missing"], cur_all), q)
        else:
            r = _categorical_result(ref, cur, i, name, tests[name], thresholds[name])
            rs, cs = ref._native.categorical_summary(i), cur._native.categorical_summary(i)
            ref_all, cur_all = rs["total"] + rs["missing"], cs["total"] + cs["missing"]
            _quality(r, (rs["missing"], ref_all, cs["missing"], cur_all), q)
            share = r.metrics.get("new_category_share")
            if share is not None and rs["other"] <= 0:  # an overflowed reference cannot tell
                r.quality.append(
                    QualityCheck(
                        "new_category",
                        0.0,
                        share,
                        "drift" if share > q["new_category_share"] else "ok",
                        None,
                        q["new_category_share"],
                    )
                )
        _fold_quality(r)
        results[name] = r
    return Report(results, dataset_share, ref.rows, cur.rows, unmonitored)
