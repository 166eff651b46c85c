"""fastml.drift: streaming, mergeable drift statistics, tests and detectors.

Profile a reference data set once, ingest production batches natively, merge
profiles across workers and report which features drifted::

    from fastml import drift
    ref = drift.Profile.from_data(reference)          # 2-D array, dict, Arrow, pandas, polars
    mon = drift.Monitor(ref, window=10_000)
    mon.update(batch)
    rep = mon.report(); rep.dataset_drift; rep.to_html("drift.html")

See docs/drift.md for the semantics and defaults.
"""

from fastml.drift._detectors import ADWIN, DDM, PageHinkley
from fastml.drift._functions import (
    Chi2Result,
    KsResult,
    chi2_test,
    js_distance,
    ks_2samp,
    psi,
    wasserstein_distance,
)
from fastml.drift._monitor import Monitor, Window
from fastml.drift._profile import (
    DEFAULT_BINS,
    DEFAULT_CATEGORY_CAP,
    DEFAULT_SKETCH_K,
    Profile,
    sketch_bytes,
)
from fastml.drift._report import DEFAULT_THRESHOLDS, SMALL_REFERENCE_ROWS, FeatureResult, Report

__all__ = [
    "ADWIN",
    "DDM",
    "DEFAULT_BINS",
    "DEFAULT_CATEGORY_CAP",
    "DEFAULT_SKETCH_K",
    "DEFAULT_THRESHOLDS",
    "SMALL_REFERENCE_ROWS",
    "Chi2Result",
    "FeatureResult",
    "KsResult",
    "Monitor",
    "PageHinkley",
    "Profile",
    "Report",
    "Window",
    "chi2_test",
    "js_distance",
    "ks_2samp",
    "psi",
    "sketch_bytes",
    "wasserstein_distance",
]
