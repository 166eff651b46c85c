"""What every Forest importer shares: link and node-flag ids (the native
engine's), the spec builder the importers fill, threshold conversions, and the
one error rule for malformed model content (fastml.FormatError naming the source)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fastml import _core

# Link ids shared with csrc/infer/forest_node.hpp (ForestLink).
_IDENTITY, _SIGMOID, _SOFTMAX, _EXP, _HINGE = 0, 1, 2, 3, 4
# Node flags shared with csrc/infer/forest_node.hpp.
_DEFAULT_LEFT = 1 << 31
_CATEGORICAL = 1 << 30
_ZERO_MISSING = 1 << 29
_CAT_SET_LEFT = 1 << 28
_CAT_INVALID_LEFT = 1 << 27


class _SpecBuilder:
    """Collects trees as flat arrays (local child indices, -1 for leaves)."""

    def __init__(self, num_features: int, num_outputs: int) -> None:
        self.num_features = int(num_features)
        self.num_outputs = int(num_outputs)
        self.offsets = [0]
        self.groups: list[int] = []
        self.feature: list[np.ndarray] = []
        self.threshold: list[np.ndarray] = []
        self.left: list[np.ndarray] = []
        self.right: list[np.ndarray] = []
        self.flags: list[np.ndarray] = []
        self.cat: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.cat_sets: list[np.ndarray] = []
        self.cat_words = 0

    def add_cat_set(self, categories: Sequence[int] | np.ndarray) -> int:
        cats = np.asarray(categories, dtype=np.int64)
        if cats.size and (cats.min() < 0 or cats.max() >= 1 << 31):
            raise ValueError(
                f"category values must be in [0, 2^31), got {cats.min()}..{cats.max()}"
            )
        n = int(cats.max()) // 32 + 1 if cats.size else 1
        self._count_words(n, int(cats.max()) if cats.size else 0)
        words = np.zeros(n, dtype=np.uint32)
        np.bitwise_or.at(words, cats >> 5, (np.uint32(1) << (cats & 31).astype(np.uint32)))
        self.cat_sets.append(words)
        return len(self.cat_sets) - 1

    def add_bitset(self, words: np.ndarray) -> int:
        w = np.asarray(words, dtype=np.uint32).ravel()
        self._count_words(w.size, 32 * w.size - 1)
        self.cat_sets.append(w)
        return len(self.cat_sets) - 1

    def _count_words(self, n: int, largest: int) -> None:
        # A category set is a bitset as long as its largest category: one number
        # in a file can ask for megabytes, so the forest's total is capped.
        self.cat_words += n
        if self.cat_words > MAX_CATEGORY_WORDS:
            raise ValueError(
                f"the category sets need more than {MAX_CATEGORY_WORDS * 4 >> 20} MiB of "
                f"bitsets (largest category so far {largest}); fastml's limit is "
                f"{MAX_CATEGORY_WORDS * 4 >> 20} MiB per forest"
            )

    def add_tree(
        self,
        group: int,
        feature: np.ndarray,
        threshold: np.ndarray,
        left: np.ndarray,
        right: np.ndarray,
        flags: np.ndarray,
        values: np.ndarray,
        cat: np.ndarray | None = None,
    ) -> None:
        n = len(left)
        self.offsets.append(self.offsets[-1] + n)
        self.groups.append(int(group))
        self.feature.append(np.asarray(feature, dtype=np.int32))
        self.threshold.append(np.asarray(threshold, dtype=np.float64))
        self.left.append(np.asarray(left, dtype=np.int32))
        self.right.append(np.asarray(right, dtype=np.int32))
        self.flags.append(np.asarray(flags, dtype=np.uint32))
        self.cat.append(np.full(n, -1, np.int32) if cat is None else np.asarray(cat, np.int32))
        self.values.append(np.asarray(values, dtype=np.float64).ravel())

    def build(
        self,
        *,
        objective: str,
        link: int,
        base_margin: Sequence[float],
        threshold_f64: bool,
        accum_f64: bool,
        metadata: dict[str, Any],
        divisor: float = 1.0,
        divide_margin: bool = True,
        cat_lo: float = 0.0,
        cat_hi: float = 2147483648.0,
        cat_integral: bool = False,
    ) -> Any:
        def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        cat_offsets = np.zeros(len(self.cat_sets) + 1, dtype=np.int64)
        if self.cat_sets:
            cat_offsets[1:] = np.cumsum([len(c) for c in self.cat_sets])
        spec = {
            "num_features": self.num_features,
            "num_outputs": self.num_outputs,
            "threshold_f64": threshold_f64,
            "accum_f64": accum_f64,
            "link": link,
            "divisor": float(divisor),
            "divide_margin": bool(divide_margin),
            "cat_lo": float(cat_lo),
            "cat_hi": float(cat_hi),
            "cat_integral": bool(cat_integral),
            "objective": objective,
            "metadata": json.dumps(metadata),
            "tree_node_offsets": np.asarray(self.offsets, dtype=np.int64),
            "tree_group": np.asarray(self.groups, dtype=np.int32),
            "node_feature": cat(self.feature, np.int32),
            "node_threshold": cat(self.threshold, np.float64),
            "node_left": cat(self.left, np.int32),
            "node_right": cat(self.right, np.int32),
            "node_flags": cat(self.flags, np.uint32),
            "node_cat": cat(self.cat, np.int32),
            "cat_offsets": cat_offsets,
            "cat_bits": cat(self.cat_sets, np.uint32),
            "leaf_values": cat(self.values, np.float64),
            "base_margin": np.asarray(base_margin, dtype=np.float64).reshape(self.num_outputs),
        }
        return _core.ForestCore(spec)


def _f32_le_threshold_for_lt(t: np.ndarray) -> np.ndarray:
    """float32 thresholds t for "x < t" rewritten as "x <= t'" (exact for float32 x)."""
    t32 = np.asarray(t, dtype=np.float32)
    return np.nextafter(t32, np.float32(-np.inf)).astype(np.float64)


def _f32_le_threshold_for_double(t: np.ndarray) -> np.ndarray:
    """Double thresholds for "float32(x) <= t" as the largest float32 <= t (exact)."""
    t = np.asarray(t, dtype=np.float64)
    # Past float32's range the cast gives +-inf (no warning wanted): +inf is then
    # above t and steps down to the largest float32, -inf is the exact answer.
    with np.errstate(over="ignore", invalid="ignore"):
        t32 = t.astype(np.float32)
        above = t32.astype(np.float64) > t
    t32[above] = np.nextafter(t32[above], np.float32(-np.inf))
    return t32.astype(np.float64)


def _as_list(v: Any) -> list[Any]:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if not isinstance(v, list):
        raise ValueError(f"expected an array, got {type(v).__name__}")
    return v


#: Most classes (outputs) a forest may have.
MAX_CLASSES = 1 << 16

#: Most 32-bit words of category bitsets a forest may hold (128 MiB).
MAX_CATEGORY_WORDS = 1 << 25


class _ArgumentError(ValueError):
    """A bad argument of the caller's (not malformed model content)."""


# What parsing and validating a model's content raises when the content is bad.
_CONTENT_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
    UnicodeDecodeError,
)


@contextlib.contextmanager
def _reading(model: Any, kind: str) -> Iterator[None]:
    """Turns any failure on malformed model content into one fastml.FormatError
    naming the file (or the argument) and the problem; I/O errors (OSError) and
    the caller's argument errors pass through."""
    if isinstance(model, (str, os.PathLike)):
        source = repr(os.fspath(model))
    elif isinstance(model, (bytes, bytearray, memoryview)):
        source = "model (bytes)"
    else:
        source = f"model ({type(model).__name__})"
    try:
        yield
    except _ArgumentError:
        raise
    except _core.FormatError as e:
        raise _core.FormatError(f"{source}: {e}") from None
    except _CONTENT_ERRORS as e:
        what = str(e) if isinstance(e, ValueError) else f"missing or malformed {e!r}"
        raise _core.FormatError(f"{source}: not a valid {kind} model: {what}") from e


def _names_or_none(names: Any, num_features: int) -> list[str] | None:
    """Feature names when the source recorded one per feature, else None."""
    if not isinstance(names, list) or len(names) != num_features:
        return None
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return None
    return names
