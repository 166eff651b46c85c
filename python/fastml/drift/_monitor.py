"""Monitor: compare a stream of production batches against a reference Profile."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastml.drift._columns import columns_of
from fastml.drift._profile import Profile
from fastml.drift._report import (
    CATEGORICAL_TESTS,
    DEFAULT_THRESHOLDS,
    NUMERIC_TESTS,
    FeatureResult,
    Report,
    build_report,
    default_test,
)


@dataclass(frozen=True)
class Window:
    """How a Monitor windows its stream.

    ``rows``: tumbling windows of exactly that many rows (batches are split at
    the boundaries); ``half_life``: exponentially decayed counts, each row's
    weight halving after ``half_life`` further rows. With neither, the window
    grows until :meth:`Monitor.rollover` or :meth:`Monitor.reset`.
    """

    rows: int | None = None
    half_life: float | None = None

    def __post_init__(self) -> None:
        if self.rows is not None and (
            isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1
        ):
            raise ValueError(f"window rows must be a positive int, got {self.rows!r}")
        if self.half_life is not None and not (
            isinstance(self.half_life, (int, float))
            and math.isfinite(self.half_life)
            and self.half_life > 0
        ):
            raise ValueError(f"window half_life must be a positive number, got {self.half_life!r}")
        if self.rows is not None and self.half_life is not None:
            raise ValueError("window takes rows or half_life, not both")


class Monitor:
    """Ingests production batches and reports drift against a reference Profile.

    ``tests`` and ``thresholds`` override the defaults per feature (a dict by
    name) or for every feature (a single test name / number). Defaults:
    numeric features use KS (p < 0.05) when the reference has at most 1,000
    rows, else Wasserstein-1 divided by the reference standard deviation
    (> 0.1); categorical features use chi-square (p < 0.05) when small, else
    Jensen-Shannon distance (> 0.1). The data set drifts when at least
    ``dataset_share`` (0.5) of the features drift.

    ``window``: None (grow until :meth:`rollover`), an int (tumbling windows
    of that many rows) or a :class:`Window`. ``on_drift(name, result)`` is
    called when a feature starts to drift: as each tumbling window closes, or,
    for growing and decayed windows, after each update.

    Data quality drifts too: a feature whose missing rate moved (two-proportion
    z-test p < 0.05 and a change of at least 0.02), whose current values are
    all missing, or (categorical) whose share of categories unseen in the
    reference exceeds 0.05, has status ``"drift"`` with that check among its
    ``reasons``. ``quality`` overrides those defaults (keys ``missing_pvalue``,
    ``missing_change``, ``new_category_share``).

    ``extra_columns``: what :meth:`update` does with batch columns the
    reference lacks (ids, predictions, timestamps): ``"error"`` (default:
    ``ValueError`` naming them) or ``"ignore"`` (listed in each report's
    ``unmonitored``). Missing reference columns are always an error.
    """

    def __init__(
        self,
        reference: Profile,
        tests: Mapping[str, str] | str | None = None,
        thresholds: Mapping[str, float] | float | None = None,
        window: int | Window | None = None,
        *,
        on_drift: Callable[[str, FeatureResult], Any] | None = None,
        dataset_share: float = 0.5,
        max_windows: int = 100,
        quality: Mapping[str, float] | None = None,
        extra_columns: str = "error",
    ) -> None:
        if not isinstance(reference, Profile):
            raise TypeError(f"reference must be a drift.Profile, got {type(reference).__name__}")
        if not (0 < dataset_share <= 1):
            raise ValueError(f"dataset_share must be in (0, 1], got {dataset_share!r}")
        if on_drift is not None and not callable(on_drift):
            raise TypeError("on_drift must be callable")
        self._ref = reference.copy()
        kinds = self._ref.kinds
        self._tests = self._resolve_tests(tests, kinds)
        self._thresholds = self._resolve_thresholds(thresholds, kinds)
        if window is None:
            self._window = Window()
        elif isinstance(window, Window):
            self._window = window
        elif isinstance(window, int) and not isinstance(window, bool):
            self._window = Window(rows=window)
        else:
            raise TypeError(
                f"window must be None, an int or a drift.Window, got {type(window).__name__}"
            )
        if extra_columns not in ("error", "ignore"):
            raise ValueError(f"extra_columns must be 'error' or 'ignore', got {extra_columns!r}")
        self._extra = extra_columns
        self._unmonitored: set[str] = set()
        from fastml.drift._report import DEFAULT_QUALITY

        self._quality = dict(DEFAULT_QUALITY)
        for key, value in dict(quality or {}).items():
            if key not in DEFAULT_QUALITY:
                raise ValueError(f"quality keys are {sorted(DEFAULT_QUALITY)}, got {key!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"quality[{key!r}] must be a non-negative number, got {value!r}")
            self._quality[key] = float(value)
        self._on_drift = on_drift
        self._share = float(dataset_share)
        self._max_windows = int(max_windows)
        self._cur = self._ref.empty()
        self._rows_in_window = 0
        self._windows: list[Report] = []
        self._drifting: set[str] = set()

    # ------------------------------------------------------------ settings
    def _resolve_tests(
        self, tests: Mapping[str, str] | str | None, kinds: dict[str, str]
    ) -> dict[str, str]:
        out = {n: default_test(k, self._ref_rows(n)) for n, k in kinds.items()}
        if tests is None:
            return out
        given = dict.fromkeys(kinds, tests) if isinstance(tests, str) else dict(tests)
        for name, test in given.items():
            if name not in kinds:
                raise ValueError(
                    f"tests names unknown feature {name!r}; features are {list(kinds)}"
                )
            allowed = NUMERIC_TESTS if kinds[name] == "numeric" else CATEGORICAL_TESTS
            if test not in allowed:
                raise ValueError(
                    f"tests[{name!r}] must be one of {sorted(allowed)} for a {kinds[name]} feature, got {test!r}"
                )
            out[name] = test
        return out

    def _ref_rows(self, name: str) -> float:
        s = self._ref.summary(name)
        return (
            float(s["count"] + s["missing"] + s["nonfinite"])
            if "count" in s
            else float(s["total"] + s["missing"])
        )

    def _resolve_thresholds(
        self, thresholds: Mapping[str, float] | float | None, kinds: dict[str, str]
    ) -> dict[str, float]:
        out = {n: DEFAULT_THRESHOLDS[self._tests[n]] for n in kinds}
        if thresholds is None:
            return out
        given = (
            dict.fromkeys(kinds, thresholds)
            if isinstance(thresholds, (int, float))
            else dict(thresholds)
        )
        for name, value in given.items():
            if name not in kinds:
                raise ValueError(
                    f"thresholds names unknown feature {name!r}; features are {list(kinds)}"
                )
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(
                    f"thresholds[{name!r}] must be a non-negative number, got {value!r}"
                )
            out[name] = float(value)
        return out

    @property
    def tests(self) -> dict[str, str]:
        """The test used for each feature."""
        return dict(self._tests)

    @property
    def thresholds(self) -> dict[str, float]:
        """The threshold used for each feature."""
        return dict(self._thresholds)

    # ------------------------------------------------------------ streaming
    def update(self, batch: Any) -> None:
        """Ingest a batch (same forms and columns as the reference). Empty batches are a no-op."""
        cols, nrows = columns_of(batch, "batch")
        if self._extra == "ignore":
            known = set(self._ref.features)
            extra = [c.name for c in cols if c.name not in known]
            if extra:
                self._unmonitored.update(extra)
                cols = [c for c in cols if c.name in known]
        cols = self._cur._align(cols)
        if nrows == 0:
            return
        w = self._window
        if w.rows is not None:
            start = 0
            while start < nrows:
                take = min(nrows - start, w.rows - self._rows_in_window)
                self._cur._ingest([c.slice(start, start + take) for c in cols], take)
                self._rows_in_window += take
                start += take
                if self._rows_in_window >= w.rows:
                    self.rollover()
        else:
            if w.half_life is not None and self._cur.rows > 0:
                self._cur._native.scale(0.5 ** (nrows / w.half_life))
            self._cur._ingest(cols, nrows)
            self._rows_in_window += nrows
        # Tumbling windows are judged when they close (in rollover): a verdict
        # on a partly filled window would flag noise from a handful of rows.
        if self._on_drift is not None and w.rows is None and self._rows_in_window > 0:
            self._check(self.report())

    def _check(self, rep: Report) -> None:
        now = set(rep.drifted_features)
        started = [n for n in rep.features if n in now and n not in self._drifting]
        self._drifting = now
        if self._on_drift is not None:
            for name in started:
                self._on_drift(name, rep.features[name])

    def rollover(self) -> Report:
        """Close the current window: report it, keep the report in :attr:`windows`, start a new one."""
        rep = self.report()
        if self._on_drift is not None:
            self._check(rep)
        self._windows.append(rep)
        del self._windows[: max(0, len(self._windows) - self._max_windows)]
        self._cur = self._ref.empty()
        self._rows_in_window = 0
        return rep

    def report(self) -> Report:
        """Drift of the current window against the reference."""
        return build_report(
            self._ref,
            self._cur,
            self._tests,
            self._thresholds,
            self._share,
            self._quality,
            sorted(self._unmonitored),
        )

    @property
    def current(self) -> Profile:
        """A snapshot (copy) of the current window's Profile."""
        return self._cur.copy()

    @property
    def reference(self) -> Profile:
        """The reference Profile (a copy taken at construction)."""
        return self._ref

    @property
    def windows(self) -> list[Report]:
        """Reports of the closed windows, oldest first (at most ``max_windows``)."""
        return list(self._windows)

    def reset(self) -> None:
        """Drop the current window, the closed windows and the drift state."""
        self._cur = self._ref.empty()
        self._rows_in_window = 0
        self._windows.clear()
        self._drifting = set()
