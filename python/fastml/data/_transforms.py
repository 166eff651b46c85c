"""Transforms fused into the loader's native gather."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastml.data._sources import check_dtype


class Transform(abc.ABC):
    """Base of the fused transforms; applied in order, per element, in float64."""

    @abc.abstractmethod
    def _op(self, name: str, row_elements: int) -> tuple[Any, ...]:
        """The native plan entry for column `name` with `row_elements` values per row."""


@dataclass(frozen=True)
class FillNa(Transform):
    """Replace NaN with ``value``."""

    value: float = 0.0

    def _op(self, name: str, row_elements: int) -> tuple[Any, ...]:
        return ("fillna", float(self.value))


@dataclass(frozen=True)
class Clip(Transform):
    """Clamp to ``[lo, hi]`` (NaN passes through, as with ``numpy.clip``)."""

    lo: float
    hi: float

    def _op(self, name: str, row_elements: int) -> tuple[Any, ...]:
        lo, hi = float(self.lo), float(self.hi)
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise ValueError(f"Clip for column '{name}' needs lo <= hi, got lo={lo}, hi={hi}")
        return ("clip", lo, hi)


@dataclass(frozen=True)
class Standardize(Transform):
    """``(x - mean) / std`` with scalars or one value per element of a row."""

    mean: Any
    std: Any
    _arrays: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        m = np.asarray(self.mean, dtype=np.float64).ravel()
        s = np.asarray(self.std, dtype=np.float64).ravel()
        object.__setattr__(self, "_arrays", (m, s))

    def _op(self, name: str, row_elements: int) -> tuple[Any, ...]:
        m, s = self._arrays
        for label, a in (("mean", m), ("std", s)):
            if a.size not in (1, row_elements):
                raise ValueError(
                    f"Standardize {label} for column '{name}' must be a scalar or hold one value "
                    f"per row element ({row_elements}), got {a.size} values"
                )
        if m.size != s.size:
            raise ValueError(
                f"Standardize for column '{name}': mean has {m.size} values but std has {s.size}"
            )
        if np.any(s == 0) or not np.all(np.isfinite(s)):
            raise ValueError(f"Standardize std for column '{name}' must be finite and non-zero")
        return ("standardize", m, s)


@dataclass(frozen=True)
class Cast(Transform):
    """Store the column as ``dtype`` (last in a list). Floats round to nearest; integers
    truncate toward zero and saturate, with NaN stored as 0."""

    dtype: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", check_dtype("Cast", np.dtype(self.dtype)))

    def _op(self, name: str, row_elements: int) -> tuple[Any, ...]:
        raise AssertionError("Cast is handled by the plan")


def column_plan(
    name: str, dtype: np.dtype, row_shape: tuple[int, ...], transforms: Any
) -> tuple[str, str, list[int], str, list[tuple[Any, ...]]]:
    """The native plan of one column: (name, src dtype, row shape, out dtype, ops)."""
    ops: list[tuple[Any, ...]] = []
    out = dtype
    if transforms is None:
        transforms = []
    elif isinstance(transforms, Transform):
        transforms = [transforms]
    row_elements = int(np.prod(row_shape, dtype=np.int64)) if row_shape else 1
    transforms = list(transforms)
    for i, t in enumerate(transforms):
        if not isinstance(t, Transform):
            raise TypeError(
                f"transforms['{name}'] must hold fastml.data transforms (FillNa, Standardize, "
                f"Clip, Cast), got {type(t).__name__}"
            )
        if isinstance(t, Cast):
            if i != len(transforms) - 1:
                raise ValueError(f"transforms['{name}']: Cast must be the last transform")
            out = t.dtype
        else:
            ops.append(t._op(name, row_elements))
    if any(op[0] == "standardize" for op in ops) and out.kind in "biu" and out == dtype:
        out = np.dtype(np.float32)  # standardized integers become float32 unless Cast says
    return (name, dtype.name, list(row_shape), out.name, ops)
