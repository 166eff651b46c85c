"""Stream drift detectors over whole arrays: ADWIN, Page-Hinkley, DDM."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fastml import _core


def _values(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"values must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"values must be 1-D, got {arr.ndim}-D with shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("values must be finite (no NaN or inf)")
    return arr


class ADWIN:
    """ADaptive WINdowing (Bifet and Gavalda 2007), as River's ``drift.ADWIN``.

    Keeps a window of recent values in exponential-histogram buckets (at most
    ``max_buckets`` per size) and every ``clock`` values checks all splits of
    the window into old/new parts of at least ``min_window_length`` values;
    a mean difference above the Hoeffding-style bound (confidence ``delta``)
    drops the oldest bucket and reports drift. No checks before
    ``grace_period`` values. As in River, the window restarts empty on the
    value after a detection.
    """

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 32,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
    ) -> None:
        self._impl = _core._DriftADWIN(delta, clock, max_buckets, min_window_length, grace_period)

    def update(self, values: Any) -> np.ndarray:
        """Feed values in order; returns the indices in ``values`` where drift was detected."""
        return np.asarray(self._impl.update(_values(values)), dtype=np.int64)

    def reset(self) -> None:
        """Forget the window."""
        self._impl.reset()

    @property
    def width(self) -> float:
        """Values in the current window."""
        return float(self._impl.width)

    @property
    def estimation(self) -> float:
        """Mean of the current window."""
        w = self._impl.width
        return float(self._impl.total / w) if w else 0.0

    @property
    def n_detections(self) -> int:
        """Detections so far."""
        return int(self._impl.n_detections)


class PageHinkley:
    """Page-Hinkley test, as River's ``drift.PageHinkley``.

    Tracks cumulative deviations from the running mean (forgetting factor
    ``alpha``, tolerance ``delta``) and reports drift when the increase
    and/or decrease statistic exceeds ``threshold`` after ``min_instances``
    values. ``mode`` is ``"both"``, ``"up"`` or ``"down"``. The state restarts
    on the value after a detection.
    """

    _MODES: ClassVar[dict[str, int]] = {"both": 0, "up": 1, "down": 2}

    def __init__(
        self,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 50.0,
        alpha: float = 1 - 0.0001,
        mode: str = "both",
    ) -> None:
        if mode not in self._MODES:
            raise ValueError(f"mode must be 'both', 'up' or 'down', got {mode!r}")
        self._impl = _core._DriftPageHinkley(
            min_instances, delta, threshold, alpha, self._MODES[mode]
        )

    def update(self, values: Any) -> np.ndarray:
        """Feed values in order; returns the indices in ``values`` where drift was detected."""
        return np.asarray(self._impl.update(_values(values)), dtype=np.int64)

    def reset(self) -> None:
        """Forget all state."""
        self._impl.reset()


class DDM:
    """Drift Detection Method (Gama et al. 2004), as River's ``drift.binary.DDM``.

    Takes a stream of 0/1 errors; tracks the error rate ``p`` and its standard
    deviation ``s``; after ``warm_start`` values, warns when ``p + s`` exceeds
    the minimum ``p_min + warning_threshold * s_min`` and reports drift past
    ``p_min + drift_threshold * s_min``. The state restarts on the value after
    a detection.
    """

    def __init__(
        self, warm_start: int = 30, warning_threshold: float = 2.0, drift_threshold: float = 3.0
    ) -> None:
        self._impl = _core._DriftDDM(warm_start, warning_threshold, drift_threshold)
        self._warnings = np.zeros(0, dtype=np.int64)

    def update(self, values: Any) -> np.ndarray:
        """Feed 0/1 errors in order; returns the indices where drift was detected."""
        arr = _values(values)
        if ((arr != 0) & (arr != 1)).any():
            raise ValueError("values must be 0/1 errors (or booleans)")
        idx, warnings = self._impl.update(arr)
        self._warnings = np.asarray(warnings, dtype=np.int64)
        return np.asarray(idx, dtype=np.int64)

    @property
    def warnings(self) -> np.ndarray:
        """Indices of the last ``update`` call where the warning level was on."""
        return self._warnings

    @property
    def warning_detected(self) -> bool:
        """True when the last value left the detector at the warning level."""
        return bool(self._impl.warning)

    def reset(self) -> None:
        """Forget all state."""
        self._impl.reset()
