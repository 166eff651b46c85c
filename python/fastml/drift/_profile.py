"""Profile: mergeable, serialisable per-feature statistics of a data set."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fastml import _core
from fastml.drift import _gpu
from fastml.drift._columns import _Column, category_counts, columns_of, numeric_data
from fastml.drift._functions import _equal_mass_edges
from fastml.drift._gpu import fold_pending, ingest_cuda, ingest_cuda_histogram

#: Default number of equal-mass histogram bins per numeric feature.
DEFAULT_BINS = 20
#: Default quantile-sketch parameter k (at most ``sketch_bytes(k)`` bytes of items).
DEFAULT_SKETCH_K = 400
#: Default number of distinct categories counted exactly per categorical feature.
DEFAULT_CATEGORY_CAP = 1000

_MODES = ("exact", "sketch", "histogram")


def sketch_bytes(k: int = DEFAULT_SKETCH_K) -> int:
    """Upper bound on the bytes one feature's quantile sketch holds, whatever the stream length.

    Items (8 bytes each, at most ``capacity_bound(k)``) plus one vector header
    per level (at most 64 levels) and the sketch object itself; 14.5 KB at the
    default ``k = 400``.
    """
    return int(_core._drift_sketch_capacity_bound(k)) * 8 + 64 * 24 + 64


class Profile:
    """Per-feature statistics of a data set, mergeable across shards.

    Numeric features hold counts (finite, missing NaN/None, non-finite ±inf),
    min/max, mean and variance (merged with Chan's parallel formula), a
    histogram over edges fixed from the reference (equal-mass, plus underflow
    and overflow bins), and, by ``mode``:

    - ``"exact"`` (default): every finite value too: exact KS and Wasserstein,
      exact merges of independently built profiles; memory grows with the data;
    - ``"sketch"``: a quantile sketch of fixed memory (:func:`sketch_bytes`): KS
      and Wasserstein within the sketch's rank-error bound;
    - ``"histogram"``: nothing more (the fastest ingest, constant memory): PSI,
      JS, KL, Hellinger, TV and chi-square are exact on the bins; KS and
      Wasserstein are intervals derived from the histograms (reported as the
      midpoint with half the interval as ``bound``; docs/drift.md).

    Categorical features hold exact counts of up to ``category_cap`` distinct
    values, then heavy hitters with an "other" bucket.

    Build one with :meth:`from_data`; build shards that merge with it with
    :meth:`empty` and :meth:`update`.
    """

    __slots__ = ("_fold_lock", "_native_raw", "_pending")

    def __init__(self, native: Any) -> None:
        if not isinstance(native, _core._DriftProfile):
            raise TypeError("use Profile.from_data, Profile.from_bytes or Profile.empty")
        self._native_raw = native
        # GPU ingests (histogram mode) still on the device: folded into the
        # native profile by the first read of it (see _native and _gpu.py).
        self._pending: dict[Any, Any] | None = None  # device -> _gpu.DeviceState
        self._fold_lock = threading.Lock()

    @property
    def _native(self) -> Any:
        """The native profile, with any pending GPU ingest folded in first."""
        if self._pending:
            with self._fold_lock:  # a reader on another thread waits for the fold
                if self._pending:
                    fold_pending(self._native_raw, self._pending)
        return self._native_raw

    # ------------------------------------------------------------ construction
    @classmethod
    def from_data(
        cls,
        reference: Any,
        categorical: Iterable[str] | None = None,
        mode: str = "exact",
        *,
        bins: int = DEFAULT_BINS,
        sketch_k: int = DEFAULT_SKETCH_K,
        category_cap: int = DEFAULT_CATEGORY_CAP,
    ) -> Profile:
        """Profile ``reference`` (2-D array, dict of columns, Arrow, pandas or polars).

        ``categorical`` names columns to treat as categorical even when numeric
        (strings, booleans and Arrow dictionaries always are). ``bins`` sets the
        histogram resolution: edges are the reference's ``bins``-quantiles.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be 'exact', 'sketch' or 'histogram', got {mode!r}")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be a positive int, got {bins!r}")
        cols, nrows = columns_of(reference, "reference")
        forced = set(categorical or ())
        unknown = forced - {c.name for c in cols}
        if unknown:
            raise ValueError(f"categorical names unknown columns: {sorted(unknown)}")
        names, kinds, edges = [], [], []
        for c in cols:
            is_cat = c.categorical or c.name in forced
            names.append(c.name)
            kinds.append(1 if is_cat else 0)
            if is_cat:
                edges.append(np.array([0.0, 0.0]))
            else:
                values = np.asarray(numeric_data(c), dtype=np.float64)
                edges.append(_equal_mass_edges(values, bins))
        native = _core._DriftProfile.create(
            names, kinds, edges, mode, sketch_k, category_cap, bins, edges_own=True
        )
        prof = cls(native)
        prof._ingest(cols, nrows)
        return prof

    def empty(self) -> Profile:
        """A profile with the same features, edges and settings, and no data."""
        return Profile(self._native.empty_like())

    def copy(self) -> Profile:
        """A deep copy."""
        return Profile(self._native.copy())

    def update(self, batch: Any) -> None:
        """Add a batch with this profile's columns (names must match)."""
        cols, nrows = columns_of(batch, "batch")
        self._ingest(self._align(cols), nrows)

    # ------------------------------------------------------------ ingest
    def _align(self, cols: list[_Column]) -> list[_Column]:
        names = self.features
        by_name = {c.name: c for c in cols}
        if len(by_name) != len(cols):
            raise ValueError("batch has duplicate column names")
        unknown = [n for n in by_name if n not in set(names)]
        missing = [n for n in names if n not in by_name]
        if unknown or missing:
            detail = []
            if missing:
                detail.append(f"missing {missing}")
            if unknown:
                detail.append(f"unknown {unknown}")
            raise ValueError(
                f"batch columns do not match the profile's {len(names)} features: "
                + ", ".join(detail)
            )
        out = []
        kinds = self._native_raw.kinds
        for name, kind in zip(names, kinds, strict=False):
            c = by_name[name]
            if kind == 0 and c.categorical:
                raise TypeError(
                    f"column '{name}' is numeric in the reference but the batch holds "
                    f"non-numeric values (dtype {getattr(c.data, 'dtype', getattr(c.data, 'type', '?'))})"
                )
            out.append(c)
        return out

    def _ingest(self, cols: Sequence[_Column], nrows: int) -> None:
        if nrows == 0:
            return  # documented no-op
        # The update path writes through the raw native profile: it commutes
        # with pending GPU sums (those are per feature and folded on read).
        native = self._native_raw
        kinds = native.kinds
        num_cols, num_idx, gpu_cols = [], [], []
        for i, (c, kind) in enumerate(zip(cols, kinds, strict=False)):
            if kind == 0 and _gpu.is_cuda_tensor(c.data):
                gpu_cols.append((i, c.data))
            elif kind == 0:
                num_cols.append(numeric_data(c))
                num_idx.append(i)
        # Validate categorical columns before any state changes.
        cats = [
            (i, category_counts(c))
            for i, (c, kind) in enumerate(zip(cols, kinds, strict=False))
            if kind == 1
        ]
        if num_cols:
            native.ingest_columns(num_cols, num_idx, nrows)
        if gpu_cols and native.mode == "histogram":
            ingest_cuda_histogram(self, gpu_cols)  # one launch for all columns
        else:
            for i, tensor in gpu_cols:
                ingest_cuda(self, i, tensor)
        for i, (keys, counts, missing) in cats:
            native.ingest_categorical(i, keys, counts, missing)
        native.add_rows(float(nrows))

    # ------------------------------------------------------------ merge / bytes
    @staticmethod
    def merge(profiles: Iterable[Profile]) -> Profile:
        """Merge profiles of disjoint parts of a data set: associative and commutative.

        Shards of one reference (:meth:`empty` of it, same edges) merge as they
        are. Profiles built independently (:meth:`from_data` on each part, each
        with its own equal-mass edges) merge too: the union's edges are
        recomputed (also when the parts' edges happen to coincide: a profile
        records whether its edges come from its own data, and :meth:`to_bytes`
        keeps that) and each part's histogram is moved onto them, exactly in
        ``"exact"`` mode (from the stored values: the result equals
        :meth:`from_data` of the union, with as many bins as the finest part),
        within the sketches' rank error in ``"sketch"`` mode (edges from the
        merged sketch's quantiles). ``"histogram"`` profiles keep no values, so
        they merge only over the same edges; otherwise the error names the first
        edge that differs.
        """
        profiles = list(profiles)
        if not profiles:
            raise ValueError("profiles must hold at least one Profile, got none")
        for p in profiles:
            if not isinstance(p, Profile):
                raise TypeError(f"profiles must hold Profile objects, got {type(p).__name__}")
        first = profiles[0]
        for p in profiles[1:]:
            if p.features != first.features or p._native.kinds != first._native.kinds:
                raise ValueError(
                    "profiles must have the same features of the same kinds, got "
                    f"{first.kinds} and {p.kinds}"
                )
            if p.mode != first.mode:
                raise ValueError(f"profiles have different modes: {first.mode!r} and {p.mode!r}")
        parts = [p.copy() for p in profiles]
        # Shards that share a reference's edges (empty() copies) keep them; profiles
        # whose edges come from their own data are re-binned to the union's edges,
        # also when their edges happen to be identical (ties: the union's quantiles
        # can fall elsewhere).
        all_own = all(p._native.edges_own for p in parts)
        own = all_own
        if len(parts) > 1 and first.mode != "histogram":
            for i, kind in enumerate(first._native.kinds):
                if kind != 0:
                    continue
                name = first.features[i]
                edges = [np.asarray(p.summary(name)["edges"]) for p in parts]
                same = all(np.array_equal(edges[0], e) for e in edges[1:])
                if same and not all_own:
                    continue
                asked = max(p._native.bins for p in parts)  # 0: profiles of format < 3
                union = _union_edges(parts, i, asked or max(len(e) - 1 for e in edges))
                own = own or not same
                if same and np.array_equal(union, edges[0]):
                    continue
                for p in parts:
                    p._native.rebin(i, union)
        out = parts[0]
        for p in parts[1:]:
            out._native.merge(p._native)
        out._native.edges_own = own
        return out

    @classmethod
    def from_partitions(
        cls, partitions: Iterable[Any], *, mode: str = "exact", **options: Any
    ) -> Profile:
        """Profile each part of a data set on its own and merge the results.

        ``partitions``: an iterable of anything :meth:`from_data` takes (NumPy
        arrays, dicts, pandas/polars frames, Arrow tables); with Dask, Ray or
        Spark, run ``Profile.from_data(part, mode=...)`` where each part lives
        and pass the returned profiles (or their :meth:`to_bytes`) to
        :meth:`merge` (docs/drift.md has the recipes). ``options`` go to
        :meth:`from_data` (``categorical``, ``bins``, ``sketch_k``, ``category_cap``).
        """
        built = [cls.from_data(part, mode=mode, **options) for part in partitions]
        if not built:
            raise ValueError("partitions must hold at least one part, got none")
        return cls.merge(built)

    def to_bytes(self) -> bytes:
        """A versioned binary encoding (magic, version, length, CRC-32, payload)."""
        return bytes(self._native.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Profile:
        """Decode :meth:`to_bytes` output; raises ValueError on truncated, corrupted or foreign bytes."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        return cls(_core._DriftProfile.from_bytes(bytes(data)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Profile.from_bytes, (self.to_bytes(),))

    # ------------------------------------------------------------ inspection
    @property
    def features(self) -> list[str]:
        """Feature names, in order."""
        return list(self._native_raw.names)  # metadata: no pending GPU sums to fold

    @property
    def kinds(self) -> dict[str, str]:
        """``{name: "numeric" | "categorical"}``."""
        return {
            n: ("numeric" if k == 0 else "categorical")
            for n, k in zip(self._native_raw.names, self._native_raw.kinds, strict=False)
        }

    @property
    def mode(self) -> str:
        """``"exact"``, ``"sketch"`` or ``"histogram"``."""
        return str(self._native_raw.mode)

    @property
    def rows(self) -> float:
        """Rows ingested (a float: decayed windows scale it)."""
        return float(self._native.rows)

    def _index(self, name: str) -> int:
        try:
            return self.features.index(name)
        except ValueError:
            raise KeyError(f"unknown feature {name!r}; features are {self.features}") from None

    def summary(self, name: str) -> dict[str, Any]:
        """The statistics held for one feature, as a dict."""
        i = self._index(name)
        if self._native.kinds[i] == 0:
            return dict(self._native.numeric_summary(i))
        return dict(self._native.categorical_summary(i))

    def values(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Sorted stored values and weights (empty weights: unit) of a numeric feature."""
        items, weights = self._native.quantile_points(self._index(name))
        return np.asarray(items), np.asarray(weights)

    def __repr__(self) -> str:
        return f"Profile(features={len(self.features)}, rows={self.rows:g}, mode={self.mode!r})"


def _union_edges(parts: list[Profile], i: int, bins: int) -> np.ndarray:
    """Equal-mass edges of the union of the parts' feature ``i`` (as from_data
    computes them): from the stored values (exact), or the weighted quantiles of
    the sketches' items (sketch)."""
    items, weights = [], []
    for p in parts:
        x, w = p._native.quantile_points(i)
        x = np.asarray(x)
        if p.mode == "exact" and np.asarray(w).size:
            raise ValueError(
                "profiles with decayed windows cannot be re-binned onto common edges; "
                "merge shards of one reference (Profile.empty()) instead"
            )
        items.append(x)
        weights.append(np.asarray(w) if np.asarray(w).size else np.ones(x.size))
    x = np.concatenate(items)
    if parts[0].mode == "exact":
        return _equal_mass_edges(x, bins)
    w = np.concatenate(weights)
    if x.size == 0:
        return np.array([0.0, 0.0])
    order = np.argsort(x, kind="stable")
    x, w = x[order], w[order]
    cdf = (np.cumsum(w) - 0.5 * w) / w.sum()
    edges = np.unique(np.interp(np.linspace(0.0, 1.0, bins + 1), cdf, x))
    return edges if edges.size > 1 else np.array([edges[0], edges[0]])
