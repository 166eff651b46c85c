"""fastml.infer.Forest: native tree-ensemble inference exact to XGBoost, LightGBM and scikit-learn.

The loaders here read each library's model (XGBoost JSON/UBJSON, LightGBM's text
format, scikit-learn's fitted ``tree_`` arrays) into flat NumPy arrays; the native
builder (``fastml._core.ForestCore``) validates them and builds the compact engine.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from fastml import _core
from fastml.infer import _ubjson

__all__ = ["Forest"]

Output = Literal["value", "margin", "class"]
Device = Literal["cpu", "cuda", "auto"]

# Link ids shared with csrc/infer/forest_node.hpp (ForestLink).
_IDENTITY, _SIGMOID, _SOFTMAX, _EXP, _HINGE = 0, 1, 2, 3, 4
# Node flags shared with csrc/infer/forest_node.hpp.
_DEFAULT_LEFT = 1 << 31
_CATEGORICAL = 1 << 30
_ZERO_MISSING = 1 << 29
_CAT_SET_LEFT = 1 << 28
_CAT_INVALID_LEFT = 1 << 27

# Rows from which device="auto" uses the GPU (when one is usable).
_AUTO_CUDA_MIN_ROWS = 16384


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

    def add_cat_set(self, categories: Sequence[int] | np.ndarray) -> int:
        cats = np.asarray(categories, dtype=np.int64)
        if cats.size and (cats.min() < 0 or cats.max() >= 1 << 31):
            raise ValueError(
                f"category values must be in [0, 2^31), got {cats.min()}..{cats.max()}"
            )
        words = np.zeros(int(cats.max()) // 32 + 1 if cats.size else 1, dtype=np.uint32)
        for c in cats.tolist():
            words[c >> 5] |= np.uint32(1 << (c & 31))
        self.cat_sets.append(words)
        return len(self.cat_sets) - 1

    def add_bitset(self, words: np.ndarray) -> int:
        self.cat_sets.append(np.asarray(words, dtype=np.uint32).ravel())
        return len(self.cat_sets) - 1

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
    t32 = t.astype(np.float32)
    with np.errstate(invalid="ignore"):
        above = t32.astype(np.float64) > t
    t32[above] = np.nextafter(t32[above], np.float32(-np.inf))
    return t32.astype(np.float64)


# ---------------------------------------------------------------------------- XGBoost

_XGB_LINKS = {
    "binary:logistic": (_SIGMOID, "logit", "binary"),
    "reg:logistic": (_SIGMOID, "logit", "regression"),
    "binary:logitraw": (_IDENTITY, "identity", "binary"),
    "binary:hinge": (_HINGE, "identity", "binary"),
    "multi:softprob": (_SOFTMAX, "identity", "multiclass"),
    "multi:softmax": (_SOFTMAX, "identity", "multiclass"),
    "reg:squarederror": (_IDENTITY, "identity", "regression"),
    "reg:squaredlogerror": (_IDENTITY, "identity", "regression"),
    "reg:pseudohubererror": (_IDENTITY, "identity", "regression"),
    "reg:absoluteerror": (_IDENTITY, "identity", "regression"),
    "count:poisson": (_EXP, "log", "regression"),
    "reg:gamma": (_EXP, "log", "regression"),
    "reg:tweedie": (_EXP, "log", "regression"),
    "survival:cox": (_EXP, "log", "regression"),
    "rank:pairwise": (_IDENTITY, "identity", "ranking"),
    "rank:ndcg": (_IDENTITY, "identity", "ranking"),
    "rank:map": (_IDENTITY, "identity", "ranking"),
}


def _xgb_base_margin(base_score: Any, kind: str, k: int) -> list[float]:
    text = str(base_score).strip()
    if text.startswith("["):
        text = text[1:-1] if text.endswith("]") else text[1:]
    parts = [p for p in text.split(",") if p.strip()] or ["0"]
    vals = [float(p) for p in parts]
    if len(vals) == 1:
        vals = vals * k
    if len(vals) != k:
        raise ValueError(f"XGBoost base_score has {len(vals)} values for {k} outputs")
    out = []
    for v in vals:
        if kind == "logit" and not 0.0 <= v <= 1.0:
            raise ValueError(f"XGBoost base_score {v} must be in [0, 1] for a logistic objective")
        if kind == "logit":
            # XGBoost clips a logistic intercept to [1e-6, 1 - 1e-6] (a model trained on
            # one class has base_score 0 or 1), and predicts a finite margin: so do we.
            v = min(max(v, 1e-6), 1.0 - 1e-6)
        if kind == "log" and not v > 0.0:
            raise ValueError(f"XGBoost base_score {v} must be > 0 for a log-link objective")
        # float32 arithmetic with the C library's logf, as XGBoost computes it.
        out.append(float(_core.forest_f32_prob_to_margin(kind, float(np.float32(v)))))
    return out


def _xgb_model_json(model: Any) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """The model as parsed JSON, and the default iteration range of an XGBModel."""
    default_range = None
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as fh:
            raw = fh.read()
        return _xgb_parse_bytes(raw), None
    if isinstance(model, (bytes, bytearray, memoryview)):
        return _xgb_parse_bytes(bytes(model)), None
    booster = model
    if hasattr(model, "get_booster"):  # the scikit-learn wrapper (XGBModel)
        booster = model.get_booster()
        best = getattr(model, "best_iteration", None) if _has_best_iteration(model) else None
        if best is not None:
            default_range = (0, int(best) + 1)
    if not hasattr(booster, "save_raw"):
        raise TypeError(
            "model must be a path, bytes, an xgboost.Booster or an XGBModel, "
            f"got {type(model).__name__}"
        )
    return json.loads(bytes(booster.save_raw("json"))), default_range


def _has_best_iteration(model: Any) -> bool:
    try:
        return getattr(model, "best_iteration", None) is not None
    except AttributeError:
        return False


def _xgb_parse_bytes(raw: bytes) -> dict[str, Any]:
    head = raw.lstrip()[:1]
    if head == b"{" and raw.lstrip()[1:2] in (b'"', b" ", b"\n", b"\r", b"\t", b"}"):
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a valid XGBoost JSON model: {e}") from None
    if head == b"{":
        obj = _ubjson.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("not a valid XGBoost UBJSON model: the top level is not an object")
        return obj
    raise ValueError(
        "not an XGBoost JSON or UBJSON model (the legacy binary format is not supported; "
        "re-save it with booster.save_model('model.json'))"
    )


def _as_list(v: Any) -> list[Any]:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if not isinstance(v, list):
        raise ValueError(f"expected an array, got {type(v).__name__}")
    return v


#: Most classes (outputs) a forest may have.
MAX_CLASSES = 1 << 16


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


def _check_iteration_range(iteration_range: Any) -> tuple[int, int] | None:
    if iteration_range is None:
        return None
    try:
        b, e = (operator.index(x) for x in iteration_range)
    except (TypeError, ValueError):
        raise TypeError(
            f"iteration_range must be a (begin, end) pair of ints, got {iteration_range!r}"
        ) from None
    return b, e


def _load_xgboost(model: Any, iteration_range: tuple[int, int] | None) -> Any:
    iteration_range = _check_iteration_range(iteration_range)
    if not isinstance(model, (str, os.PathLike, bytes, bytearray, memoryview)) and not (
        hasattr(model, "save_raw") or hasattr(model, "get_booster")
    ):
        raise TypeError(
            "model must be a path, bytes, an xgboost.Booster or an XGBModel, "
            f"got {type(model).__name__}"
        )
    # XGBoost parses its numbers as float32: a value past float32's range becomes
    # +-inf there, and here too, without numpy's overflow warning.
    with _reading(model, "XGBoost"), np.errstate(over="ignore"):
        j, default_range = _xgb_model_json(model)
        return _build_xgboost(j, iteration_range if iteration_range is not None else default_range)


def _build_xgboost(j: dict[str, Any], iteration_range: tuple[int, int] | None) -> Any:
    learner = j["learner"]
    obj_name = learner["objective"]["name"]
    if obj_name not in _XGB_LINKS:
        raise ValueError(
            f"unsupported XGBoost objective {obj_name!r}; supported: {sorted(_XGB_LINKS)}"
        )
    link, base_kind, task = _XGB_LINKS[obj_name]
    lmp = learner["learner_model_param"]
    num_feature = int(lmp["num_feature"])
    num_class = int(lmp.get("num_class", 0))
    num_target = int(lmp.get("num_target", 1))
    if num_target > 1:
        raise ValueError("unsupported XGBoost model: multi-target (num_target > 1)")
    if not 0 <= num_feature < 2**31:
        raise ValueError(f"XGBoost num_feature {num_feature} is out of range [0, 2^31)")
    k = max(num_class, 1)
    # Declared sizes are checked against what the file holds before anything is
    # sized by them: a class needs trees or a base score of its own.
    trees_present = (
        len(learner["gradient_booster"].get("model", {}).get("trees", []))
        if isinstance(learner["gradient_booster"], dict)
        else 0
    )
    base_values = len(
        [p for p in str(lmp.get("base_score", "")).strip("[]").split(",") if p.strip()]
    )
    if num_class < 0 or k > MAX_CLASSES or k > max(trees_present, base_values, 1):
        raise ValueError(
            f"XGBoost num_class {num_class} does not match the model ({trees_present} trees, "
            f"{base_values} base scores; at most {MAX_CLASSES} classes)"
        )
    gb = learner["gradient_booster"]
    booster_name = gb["name"]
    weights = None
    if booster_name == "dart":
        weights = [float(np.float32(w)) for w in _as_list(gb["weight_drop"])]
        gb = gb["gbtree"]
    elif booster_name != "gbtree":
        raise ValueError(f"unsupported XGBoost booster {booster_name!r} (only gbtree and dart)")
    m = gb["model"]
    trees = m["trees"]
    tree_info = [int(g) for g in _as_list(m["tree_info"])]
    if len(tree_info) != len(trees):
        raise ValueError(f"XGBoost tree_info has {len(tree_info)} entries for {len(trees)} trees")
    npt = int(m["gbtree_model_param"].get("num_parallel_tree", 1))
    indptr = m.get("iteration_indptr")
    if indptr is not None:
        indptr = [int(i) for i in _as_list(indptr)]
    else:
        per_iter = max(k * npt, 1)
        indptr = list(range(0, len(trees) + 1, per_iter))
    n_iter = len(indptr) - 1
    begin, end = 0, n_iter
    if iteration_range is not None:
        b, e = iteration_range
        if not (b == 0 and e == 0):
            if not (0 <= b < e <= n_iter):
                raise _ArgumentError(
                    f"iteration_range must satisfy 0 <= begin < end <= {n_iter}, got {(b, e)}"
                )
            begin, end = b, e
    t_begin, t_end = indptr[begin], indptr[end]
    if not 0 <= t_begin <= t_end <= len(trees):
        raise ValueError("XGBoost iteration_indptr is inconsistent with the trees")

    base = _xgb_base_margin(lmp.get("base_score", "0.5"), base_kind, k)
    sb = _SpecBuilder(num_feature, k)
    for t in range(t_begin, t_end):
        tr = trees[t]
        size_leaf = int(tr.get("tree_param", {}).get("size_leaf_vector", 1))
        if size_leaf > 1:
            raise ValueError("unsupported XGBoost model: vector-leaf (multi-target) trees")
        left = np.asarray(_as_list(tr["left_children"]), dtype=np.int64)
        right = np.asarray(_as_list(tr["right_children"]), dtype=np.int64)
        n = len(left)
        feat = np.asarray(_as_list(tr["split_indices"]), dtype=np.int64)
        cond = np.asarray(_as_list(tr["split_conditions"]), dtype=np.float64)
        dleft = np.asarray(_as_list(tr["default_left"]), dtype=np.int64)
        stype = np.asarray(_as_list(tr.get("split_type", [0] * n)), dtype=np.int64)
        if not (len(right) == len(feat) == len(cond) == len(dleft) == len(stype) == n) or n == 0:
            raise ValueError(f"XGBoost tree {t} has node arrays of different lengths")
        for name, arr in (("left_children", left), ("right_children", right)):
            if arr.size and (arr.min() < -1 or arr.max() >= n):
                raise ValueError(f"XGBoost tree {t} {name} index out of range")
        is_leaf = left == -1
        odd = ~is_leaf & (stype != 0) & (stype != 1)
        if np.any(odd):
            i = int(np.flatnonzero(odd)[0])
            raise ValueError(
                f"XGBoost tree {t} node {i} has split_type {int(stype[i])} "
                "(0 numerical and 1 categorical are the types fastml reads)"
            )
        thr = np.zeros(n, dtype=np.float64)
        numeric = ~is_leaf & (stype == 0)
        if np.any(np.isneginf(cond[numeric])) or np.any(np.isnan(cond[numeric])):
            raise ValueError(f"XGBoost tree {t} has a -inf or NaN split condition")
        thr[numeric] = _f32_le_threshold_for_lt(cond[numeric])
        # XGBoost takes default_left as true only when it is exactly 1 (2, 255, -1
        # all read as false there): the same here, so margins stay identical.
        flags = np.where(dleft == 1, _DEFAULT_LEFT, 0).astype(np.uint64)
        cat_idx = np.full(n, -1, dtype=np.int64)
        if np.any(stype[~is_leaf] == 1):
            cats = [int(c) for c in _as_list(tr["categories"])]
            nodes = [int(c) for c in _as_list(tr["categories_nodes"])]
            segs = [int(c) for c in _as_list(tr["categories_segments"])]
            sizes = [int(c) for c in _as_list(tr["categories_sizes"])]
            if not len(nodes) == len(segs) == len(sizes):
                raise ValueError(f"XGBoost tree {t} has inconsistent category arrays")
            for nid, seg, size in zip(nodes, segs, sizes, strict=True):
                if not (0 <= nid < n and 0 <= seg and seg + size <= len(cats)):
                    raise ValueError(f"XGBoost tree {t} has a category segment out of range")
                # Categories in the set go right; invalid ones (negative or too large) go left.
                cat_idx[nid] = sb.add_cat_set(cats[seg : seg + size])
                flags[nid] |= _CATEGORICAL | _CAT_INVALID_LEFT
            missing = (stype == 1) & ~is_leaf & (cat_idx < 0)
            if np.any(missing):
                raise ValueError(f"XGBoost tree {t} has a categorical split without categories")
        values = np.where(is_leaf, cond, 0.0).astype(np.float32)
        group = tree_info[t]
        if not 0 <= group < k:
            raise ValueError(f"XGBoost tree {t} has output group {group} of {k}")
        if weights is not None:
            # DART predicts each tree on top of the intercept, then adds
            # (prediction - intercept) * weight, all in float32.
            b32 = np.float32(base[group])
            values = (((b32 + values) - b32) * np.float32(weights[t])).astype(np.float32)
        sb.add_tree(
            group,
            np.where(is_leaf, -1, feat),
            thr,
            np.where(is_leaf, -1, left),
            np.where(is_leaf, -1, right),
            flags,
            values.astype(np.float64),
            cat_idx,
        )
    return sb.build(
        objective=obj_name,
        link=link,
        base_margin=base,
        threshold_f64=False,
        accum_f64=False,
        metadata={
            "source": "xgboost",
            "task": task,
            "feature_names": _names_or_none(learner.get("feature_names"), num_feature),
        },
        cat_lo=0.0,
        cat_hi=2147483648.0,
    )


# ---------------------------------------------------------------------------- LightGBM

_LGB_LINKS = {
    "binary": (_SIGMOID, "binary"),
    "cross_entropy": (_SIGMOID, "regression"),
    "xentropy": (_SIGMOID, "regression"),
    "multiclass": (_SOFTMAX, "multiclass"),
    "softmax": (_SOFTMAX, "multiclass"),
    "multiclassova": (_SIGMOID, "multiclass_ova"),
    "regression": (_IDENTITY, "regression"),
    "regression_l2": (_IDENTITY, "regression"),
    "regression_l1": (_IDENTITY, "regression"),
    "l2": (_IDENTITY, "regression"),
    "l1": (_IDENTITY, "regression"),
    "huber": (_IDENTITY, "regression"),
    "fair": (_IDENTITY, "regression"),
    "quantile": (_IDENTITY, "regression"),
    "mape": (_IDENTITY, "regression"),
    "poisson": (_EXP, "regression"),
    "gamma": (_EXP, "regression"),
    "tweedie": (_EXP, "regression"),
    "lambdarank": (_IDENTITY, "ranking"),
    "rank_xendcg": (_IDENTITY, "ranking"),
}


def _lgb_text(model: Any, num_iteration: int | None) -> tuple[str, int | None]:
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as fh:
            raw = fh.read()
        try:
            return raw.decode("utf-8"), num_iteration
        except UnicodeDecodeError:
            raise ValueError("not a LightGBM text model (not UTF-8 text)") from None
    booster = getattr(model, "booster_", model)
    if not hasattr(booster, "model_to_string"):
        raise TypeError(
            f"model must be a path, a lightgbm.Booster or an LGBMModel, got {type(model).__name__}"
        )
    # model_to_string(num_iteration=None) keeps the best iteration when there is one,
    # the same default as Booster.predict.
    kwargs = {} if num_iteration is None else {"num_iteration": int(num_iteration)}
    return booster.model_to_string(**kwargs), None


def _lgb_arr(fields: dict[str, str], key: str, dtype: Any, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=dtype)
    text = fields.get(key)
    if text is None:
        raise ValueError(f"LightGBM tree is missing '{key}'")
    try:
        arr = np.array(text.split(), dtype=np.float64 if dtype is np.float64 else np.int64)
    except ValueError:
        raise ValueError(f"LightGBM tree field '{key}' is not numeric") from None
    if len(arr) != n:
        raise ValueError(f"LightGBM tree field '{key}' has {len(arr)} values, expected {n}")
    return arr.astype(dtype)


def _load_lightgbm(model: Any, num_iteration: int | None) -> Any:
    if num_iteration is not None:
        if isinstance(num_iteration, bool) or not isinstance(num_iteration, (int, np.integer)):
            raise TypeError(f"num_iteration must be an int, got {type(num_iteration).__name__}")
        if num_iteration < 0:
            raise ValueError(f"num_iteration must be >= 0, got {num_iteration}")
    if not isinstance(model, (str, os.PathLike)) and not hasattr(
        getattr(model, "booster_", model), "model_to_string"
    ):
        raise TypeError(
            f"model must be a path, a lightgbm.Booster or an LGBMModel, got {type(model).__name__}"
        )
    with _reading(model, "LightGBM"):
        text, slice_iters = _lgb_text(model, num_iteration)
        return _build_lightgbm(text, slice_iters)


def _build_lightgbm(text: str, slice_iters: int | None) -> Any:
    if not text.startswith("tree\n") and not text.startswith("tree\r\n"):
        raise ValueError("not a LightGBM text model (it must start with 'tree')")
    blocks = text.split("\nTree=")
    header = {}
    for line in blocks[0].splitlines():
        key, sep, val = line.partition("=")
        if sep:
            header[key.strip()] = val.strip()
        elif line.strip():
            header[line.strip()] = ""
    try:
        k = int(header.get("num_tree_per_iteration", header.get("num_class", "1")))
        max_feature_idx = int(header["max_feature_idx"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a valid LightGBM model header: {e!r}") from None
    if k < 1 or k > 1 << 20 or max_feature_idx < 0:
        raise ValueError(
            f"LightGBM header has num_tree_per_iteration={k}, max_feature_idx={max_feature_idx}"
        )
    objective = header.get("objective", "regression")
    obj_parts = objective.split()
    obj_name = obj_parts[0] if obj_parts else "regression"
    if obj_name not in _LGB_LINKS:
        raise ValueError(
            f"unsupported LightGBM objective {obj_name!r}; supported: {sorted(_LGB_LINKS)}"
        )
    for part in obj_parts[1:]:
        if part.startswith("sigmoid:") and float(part.split(":", 1)[1]) != 1.0:
            raise ValueError(f"unsupported LightGBM objective parameter {part!r} (only sigmoid:1)")
    link, task = _LGB_LINKS[obj_name]
    average_output = "average_output" in header

    tree_texts = []
    for block in blocks[1:]:
        body = block.split("\nend of trees", 1)[0]
        tree_texts.append(body)
    if slice_iters is not None:
        if slice_iters < 0:
            raise _ArgumentError(f"num_iteration must be >= 0, got {slice_iters}")
        if slice_iters > 0:
            tree_texts = tree_texts[: slice_iters * k]
    if len(tree_texts) % k:
        raise ValueError(f"LightGBM model has {len(tree_texts)} trees, not a multiple of {k}")

    sb = _SpecBuilder(max_feature_idx + 1, k)
    for t, body in enumerate(tree_texts):
        fields = {}
        for line in body.splitlines()[1:]:
            key, sep, val = line.partition("=")
            if sep:
                fields[key.strip()] = val
        if fields.get("is_linear", "0").strip() not in ("0", ""):
            raise ValueError("unsupported LightGBM model: linear trees (linear_tree=True)")
        try:
            num_leaves = int(fields["num_leaves"])
            num_cat = int(fields.get("num_cat", "0"))
        except (KeyError, ValueError):
            raise ValueError(f"LightGBM tree {t} has no valid num_leaves") from None
        if num_leaves < 1 or num_leaves > 1 << 24 or num_cat < 0:
            raise ValueError(f"LightGBM tree {t} has num_leaves={num_leaves}")
        ni = num_leaves - 1
        leaf_value = _lgb_arr(fields, "leaf_value", np.float64, num_leaves)
        feat = _lgb_arr(fields, "split_feature", np.int64, ni)
        thr = _lgb_arr(fields, "threshold", np.float64, ni)
        dtype_ = _lgb_arr(fields, "decision_type", np.int64, ni)
        lc = _lgb_arr(fields, "left_child", np.int64, ni)
        rc = _lgb_arr(fields, "right_child", np.int64, ni)
        n = ni + num_leaves
        # Internal nodes first, then leaves: leaf j (child ~j) is node ni + j.
        left = np.full(n, -1, np.int64)
        right = np.full(n, -1, np.int64)
        left[:ni] = np.where(lc >= 0, lc, ni + ~lc)
        right[:ni] = np.where(rc >= 0, rc, ni + ~rc)
        if ni and (
            left[:ni].min() < 0 or right[:ni].min() < 0 or max(left.max(), right.max()) >= n
        ):
            raise ValueError(f"LightGBM tree {t} has a child index out of range")
        feature = np.full(n, -1, np.int64)
        feature[:ni] = feat
        threshold = np.zeros(n, np.float64)
        flags = np.zeros(n, np.uint64)
        cat_idx = np.full(n, -1, np.int64)
        if num_cat:
            bounds = _lgb_arr(fields, "cat_boundaries", np.int64, num_cat + 1)
            if bounds[0] != 0 or np.any(np.diff(bounds) < 0):
                raise ValueError(f"LightGBM tree {t} has invalid cat_boundaries")
            bits = _lgb_arr(fields, "cat_threshold", np.int64, int(bounds[-1]))
            if bits.size and (bits.min() < 0 or bits.max() >= 1 << 32):
                raise ValueError(f"LightGBM tree {t} has invalid cat_threshold words")
            sets = [sb.add_bitset(bits[bounds[c] : bounds[c + 1]]) for c in range(num_cat)]
        for i in range(ni):
            d = int(dtype_[i])
            default_left = bool(d & 2)
            missing_type = (d >> 2) & 3
            if d & 1:  # categorical: the set goes left; NaN and negatives go right
                c = int(thr[i])
                if not 0 <= c < num_cat:
                    raise ValueError(f"LightGBM tree {t} node {i} refers to category set {c}")
                cat_idx[i] = sets[c]
                flags[i] = _CATEGORICAL | _CAT_SET_LEFT
                continue
            threshold[i] = thr[i]
            # LightGBM's missing types: 0 none, 1 zero, 2 NaN. It reads 3, which
            # it never writes, as "none" too (NaN -> 0.0, then the comparison).
            if missing_type in (0, 3):  # None: NaN is treated as 0.0
                default_left = 0.0 <= thr[i]
            elif missing_type == 1:  # Zero
                flags[i] |= _ZERO_MISSING
            flags[i] |= _DEFAULT_LEFT if default_left else 0
        values = np.zeros(n, np.float64)
        values[ni:] = leaf_value
        sb.add_tree(t % k, feature, threshold, left, right, flags, values, cat_idx)
    n_iter = len(tree_texts) // k
    return sb.build(
        objective=objective,
        link=link,
        base_margin=[0.0] * k,
        threshold_f64=True,
        accum_f64=True,
        metadata={
            "source": "lightgbm",
            "task": task,
            "feature_names": _lgb_feature_names(
                header.get("feature_names", ""), max_feature_idx + 1
            ),
        },
        divisor=float(n_iter) if average_output and n_iter else 1.0,
        divide_margin=False,  # LightGBM's raw score of a random forest is the sum
        cat_lo=float(np.nextafter(-1.0, 0.0)),
        cat_hi=2147483648.0,
    )


# ---------------------------------------------------------------------------- scikit-learn


def _sk_tree_arrays(tree: Any, float32_inputs: bool) -> tuple[np.ndarray, ...]:
    t = tree.tree_
    left = np.asarray(t.children_left, dtype=np.int64)
    right = np.asarray(t.children_right, dtype=np.int64)
    is_leaf = left < 0
    feature = np.where(is_leaf, -1, np.asarray(t.feature, dtype=np.int64))
    thr = np.asarray(t.threshold, dtype=np.float64)
    thr = np.where(is_leaf, 0.0, thr)
    if float32_inputs:
        thr = _f32_le_threshold_for_double(thr)
    mgl = getattr(t, "missing_go_to_left", None)
    mgl = np.zeros(len(left), np.uint8) if mgl is None else np.asarray(mgl, dtype=np.uint8)
    flags = np.where(mgl != 0, _DEFAULT_LEFT, 0).astype(np.uint64)
    return feature, thr, np.where(is_leaf, -1, left), np.where(is_leaf, -1, right), flags, is_leaf


def _classes_meta(est: Any) -> list[Any] | None:
    classes = getattr(est, "classes_", None)
    if classes is None:
        return None
    out = np.asarray(classes).tolist()
    return out if all(isinstance(c, (int, float, str, bool)) for c in out) else None


def _load_sklearn(est: Any) -> Any:
    name = type(est).__name__
    try:
        from sklearn.ensemble import (
            ExtraTreesClassifier,
            ExtraTreesRegressor,
            GradientBoostingClassifier,
            GradientBoostingRegressor,
            HistGradientBoostingClassifier,
            HistGradientBoostingRegressor,
            RandomForestClassifier,
            RandomForestRegressor,
        )
        from sklearn.tree import BaseDecisionTree
    except ImportError as e:  # pragma: no cover - sklearn is a test dependency
        raise TypeError(f"scikit-learn is needed to load {name}: {e}") from None
    if not hasattr(est, "n_features_in_"):
        raise ValueError(f"{name} is not fitted")
    nf = int(est.n_features_in_)
    if isinstance(est, (HistGradientBoostingClassifier, HistGradientBoostingRegressor)):
        return _load_sklearn_hgb(est, nf)
    if isinstance(est, (GradientBoostingClassifier, GradientBoostingRegressor)):
        return _load_sklearn_gb(est, nf)
    if isinstance(
        est,
        (RandomForestClassifier, RandomForestRegressor, ExtraTreesClassifier, ExtraTreesRegressor),
    ):
        trees = list(est.estimators_)
    elif isinstance(est, BaseDecisionTree):
        trees = [est]
    else:
        raise TypeError(
            "estimator must be a fitted RandomForest*, ExtraTrees*, GradientBoosting*, "
            f"HistGradientBoosting* or DecisionTree*, got {name}"
        )
    classifier = hasattr(est, "classes_")
    n_outputs = int(getattr(est, "n_outputs_", 1))
    if classifier and n_outputs > 1:
        raise ValueError(f"unsupported: multi-output {name}")
    k = len(est.classes_) if classifier else n_outputs
    sb = _SpecBuilder(nf, k)
    for tree in trees:
        feature, thr, left, right, flags, is_leaf = _sk_tree_arrays(tree, float32_inputs=True)
        value = np.asarray(tree.tree_.value, dtype=np.float64)
        if classifier:
            v = value[:, 0, :k]
            s = v.sum(axis=1, keepdims=True)
            s[s == 0.0] = 1.0
            v = v / s
        else:
            v = value[:, :, 0]
        v = np.where(is_leaf[:, None], v, 0.0)
        sb.add_tree(-1 if k > 1 else 0, feature, thr, left, right, flags, v)
    return sb.build(
        objective=name,
        link=_IDENTITY,
        base_margin=[0.0] * k,
        threshold_f64=False,
        accum_f64=True,
        divisor=float(len(trees)),
        metadata={
            "source": "sklearn",
            "task": "proba" if classifier else "regression",
            "classes": _classes_meta(est),
            "feature_names": _sk_feature_names(est),
        },
    )


def _load_sklearn_gb(est: Any, nf: int) -> Any:
    name = type(est).__name__
    classifier = hasattr(est, "classes_")
    if est.init_ == "zero":
        base = np.zeros(est.estimators_.shape[1])
    else:
        if type(est.init_).__name__ not in ("DummyClassifier", "DummyRegressor"):
            raise ValueError(f"unsupported {name}: a custom init estimator")
        base = np.asarray(est._raw_predict_init(np.zeros((1, nf), dtype=np.float32)))[0]
    k = est.estimators_.shape[1]
    link, task = _IDENTITY, "regression"
    if classifier:
        loss = getattr(est, "loss", "log_loss")
        if loss != "log_loss":
            raise ValueError(f"unsupported {name} loss {loss!r} (only 'log_loss')")
        link, task = (_SIGMOID, "binary") if k == 1 else (_SOFTMAX, "multiclass")
    lr = float(est.learning_rate)
    sb = _SpecBuilder(nf, k)
    for stage in est.estimators_:
        for g, tree in enumerate(stage):
            feature, thr, left, right, flags, is_leaf = _sk_tree_arrays(tree, True)
            v = np.asarray(tree.tree_.value, dtype=np.float64)[:, 0, 0] * lr
            sb.add_tree(g, feature, thr, left, right, flags, np.where(is_leaf, v, 0.0))
    return sb.build(
        objective=name,
        link=link,
        base_margin=base,
        threshold_f64=False,
        accum_f64=True,
        metadata={
            "source": "sklearn",
            "task": task,
            "classes": _classes_meta(est),
            "feature_names": _sk_feature_names(est),
        },
    )


def _hgb_categories(est: Any, nf: int) -> tuple[np.ndarray, list[np.ndarray | None], float]:
    """Undo HistGradientBoosting's categorical preprocessing.

    With categorical features, sklearn reorders columns (categorical first) and
    ordinal-encodes raw category values (unknown ones become NaN). Returns the
    input column of each internal feature, the raw categories (sorted, as the
    encoder's codes) of each internal feature, and the bitset bound: raw values
    at or above it are unknown categories.
    """
    pre = getattr(est, "_preprocessor", None)
    if pre is None:
        return np.arange(nf), [None] * nf, 256.0
    is_cat = np.asarray(est.is_categorical_, dtype=bool)
    out_to_in = np.concatenate([np.nonzero(is_cat)[0], np.nonzero(~is_cat)[0]])
    encoder = pre.named_transformers_["encoder"]
    raw: list[np.ndarray | None] = [None] * nf
    hi = 0.0
    for pos, cats in enumerate(encoder.categories_):
        vals = np.asarray(cats)
        if vals.dtype.kind not in "biuf":
            raise ValueError(
                f"unsupported {type(est).__name__}: non-numeric categories {vals[:3].tolist()}"
            )
        vals = vals.astype(np.float64)
        vals = vals[~np.isnan(vals)]
        if vals.size and (
            np.any(vals < 0) or np.any(vals != np.floor(vals)) or vals.max() >= 1 << 16
        ):
            raise ValueError(
                f"unsupported {type(est).__name__}: categories must be integers in [0, 65536)"
            )
        raw[pos] = vals
        hi = max(hi, float(vals.max()) + 1 if vals.size else 0.0)
    return out_to_in, raw, max(hi, 1.0)


def _load_sklearn_hgb(est: Any, nf: int) -> Any:
    classifier = hasattr(est, "classes_")
    k = int(est.n_trees_per_iteration_)
    loss = type(est._loss).__name__
    link, task = _IDENTITY, "regression"
    if classifier:
        link, task = (_SIGMOID, "binary") if k == 1 else (_SOFTMAX, "multiclass")
    elif loss in ("HalfPoissonLoss", "HalfGammaLoss", "HalfTweedieLoss"):
        link = _EXP
    out_to_in, raw_cats, cat_hi = _hgb_categories(est, nf)
    sb = _SpecBuilder(nf, k)
    for predictors in est._predictors:
        for g, pred in enumerate(predictors):
            nodes = pred.nodes
            n = len(nodes)
            is_leaf = nodes["is_leaf"].astype(bool)
            left = np.where(is_leaf, -1, nodes["left"].astype(np.int64))
            right = np.where(is_leaf, -1, nodes["right"].astype(np.int64))
            feat_out = nodes["feature_idx"].astype(np.int64)
            feature = np.where(is_leaf, -1, out_to_in[np.where(is_leaf, 0, feat_out)])
            thr = np.where(is_leaf, 0.0, nodes["num_threshold"].astype(np.float64))
            mgl = nodes["missing_go_to_left"].astype(bool)
            flags = np.where(mgl, _DEFAULT_LEFT, 0).astype(np.uint64)
            cat_idx = np.full(n, -1, np.int64)
            is_cat = nodes["is_categorical"].astype(bool) & ~is_leaf
            for i in np.nonzero(is_cat)[0]:
                # sklearn: codes in the left bitset go left, other known codes go
                # right, unknown values (and negatives) follow the missing direction.
                f = int(feat_out[i])
                left_bits = np.asarray(pred.raw_left_cat_bitsets[nodes["bitset_idx"][i]], np.uint32)
                codes_left = np.nonzero(np.unpackbits(left_bits.view(np.uint8), bitorder="little"))[
                    0
                ]
                cats = raw_cats[f]
                if cats is None:
                    raise ValueError(
                        "HistGradientBoosting model has a categorical split on a numeric feature"
                    )
                raw_left = cats[codes_left[codes_left < len(cats)]].astype(np.int64)
                members = set(raw_left.tolist())
                if mgl[i]:
                    known_raw = set(cats.astype(np.int64).tolist())
                    members |= {v for v in range(int(cat_hi)) if v not in known_raw}
                cat_idx[i] = sb.add_cat_set(sorted(members))
                flags[i] |= _CATEGORICAL | _CAT_SET_LEFT | (_CAT_INVALID_LEFT if mgl[i] else 0)
            values = np.where(is_leaf, nodes["value"].astype(np.float64), 0.0)
            sb.add_tree(g, feature, thr, left, right, flags, values, cat_idx)
    base = np.asarray(est._baseline_prediction, dtype=np.float64).ravel()
    if base.size == 1 and k > 1:
        base = np.repeat(base, k)
    return sb.build(
        objective=type(est).__name__,
        link=link,
        base_margin=base,
        threshold_f64=True,
        accum_f64=True,
        metadata={
            "source": "sklearn",
            "task": task,
            "classes": _classes_meta(est),
            "feature_names": _sk_feature_names(est),
        },
        cat_lo=0.0,
        cat_hi=cat_hi,
        cat_integral=True,  # the encoder treats non-integer values as unknown
    )


# ---------------------------------------------------------------------------- inputs


def _names_or_none(names: Any, num_features: int) -> list[str] | None:
    """Feature names when the source recorded one per feature, else None."""
    if not isinstance(names, list) or len(names) != num_features:
        return None
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return None
    return names


def _lgb_feature_names(text: str, num_features: int) -> list[str] | None:
    # LightGBM always writes names; Column_0, Column_1, ... mean "none were given".
    names = _names_or_none(text.split(), num_features)
    if names is not None and names == [f"Column_{i}" for i in range(num_features)]:
        return None
    return names


def _sk_feature_names(est: Any) -> list[str] | None:
    names = getattr(est, "feature_names_in_", None)
    if names is None:
        return None
    return _names_or_none([str(n) for n in names], len(names))


def _frame_columns(X: Any) -> list[str] | None:
    """Column names of a pandas/polars DataFrame or an Arrow table, else None."""
    mod = type(X).__module__
    if mod.startswith(("pandas", "polars")) and hasattr(X, "columns"):
        return [str(c) for c in X.columns]
    if mod.startswith("pyarrow") and hasattr(X, "column_names"):
        return [str(c) for c in X.column_names]
    return None


def _select_by_name(X: Any, names: list[str]) -> Any:
    """X's columns in the model's feature order, matched by name (as XGBoost
    refuses a frame whose names differ, fastml refuses it too, naming them)."""
    cols = _frame_columns(X)
    if cols is None or cols == names:
        return X
    missing = [n for n in names if n not in cols]
    extra = [c for c in cols if c not in set(names)]
    if missing or extra or len(set(cols)) != len(cols):
        raise ValueError(
            "X's columns do not match the model's feature names: "
            + ", ".join(
                part
                for part in (
                    f"missing {missing}" if missing else "",
                    f"unknown {extra}" if extra else "",
                    "duplicate columns" if len(set(cols)) != len(cols) else "",
                )
                if part
            )
        )
    mod = type(X).__module__
    if mod.startswith("pandas"):
        return X[names]
    if mod.startswith("polars"):
        return X.select(names)
    return X.select(names)  # pyarrow Table / RecordBatch


def _as_matrix(X: Any) -> Any:
    """A 2-D float32/float64 array-like the native predict accepts (no copy when possible)."""
    if isinstance(X, np.ndarray):
        if X.dtype in (np.float32, np.float64):
            return X
        if X.dtype.kind in "biuf":
            return X.astype(np.float64)
        raise TypeError(f"X must be numeric, got dtype {X.dtype}")
    mod = type(X).__module__
    if mod.startswith("torch"):
        return X
    if mod.startswith("pandas"):
        import pandas as pd

        if isinstance(X, pd.DataFrame):
            cols = []
            for c in X.columns:
                s = X[c]
                if isinstance(s.dtype, pd.CategoricalDtype):
                    codes = s.cat.codes.to_numpy().astype(np.float64)
                    codes[codes < 0] = np.nan
                    cols.append(codes)
                else:
                    cols.append(s.to_numpy(dtype=np.float64, na_value=np.nan))
            if not cols:
                return np.zeros((len(X), 0))
            return np.ascontiguousarray(np.column_stack(cols))
    if mod.startswith("pyarrow"):
        import pyarrow as pa

        if isinstance(X, (pa.Table, pa.RecordBatch)):
            cols = []
            for col in X.columns:
                if pa.types.is_dictionary(col.type):
                    col = (
                        pa.chunked_array([c.indices for c in col.chunks])
                        if isinstance(col, pa.ChunkedArray)
                        else col.indices
                    )
                arr = col.to_numpy(zero_copy_only=False)
                cols.append(np.asarray(arr, dtype=np.float64))
            if not cols:
                return np.zeros((X.num_rows, 0))
            return np.ascontiguousarray(np.column_stack(cols))
    if mod.startswith("polars"):
        return np.ascontiguousarray(X.to_numpy(), dtype=np.float64)
    return X


def _parse_metadata(text: str) -> dict[str, Any]:
    """A forest's metadata: empty, or a JSON object (ValueError otherwise)."""
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"its metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"its metadata is a JSON {type(meta).__name__}, not an object")
    return meta


def _is_cuda_tensor(X: Any) -> bool:
    return type(X).__module__.startswith("torch") and getattr(X, "is_cuda", False)


# ---------------------------------------------------------------------------- Forest


class Forest:
    """A tree ensemble in fastml's compact native form.

    Build one with :meth:`from_xgboost`, :meth:`from_lightgbm`, :meth:`from_sklearn`
    or :meth:`load`. Prediction is exact to the source library's own predictor:
    XGBoost margins are bit-identical (float32 splits and accumulation, in XGBoost's
    tree order), LightGBM and scikit-learn accumulate in float64.
    """

    def __init__(self, core: Any) -> None:
        if not isinstance(core, _core.ForestCore):
            raise TypeError(
                "Forest is built with Forest.from_xgboost / from_lightgbm / from_sklearn / load"
            )
        spec = core.spec()
        meta = _parse_metadata(spec["metadata"])
        # Assigned last: a Forest either exists whole or not at all.
        self._core = core
        self._meta: dict[str, Any] = meta
        self._objective = str(spec["objective"])

    # -------------------------------------------------------------- constructors

    @classmethod
    def from_xgboost(cls, model: Any, *, iteration_range: tuple[int, int] | None = None) -> Forest:
        """Load an XGBoost model: a JSON or UBJSON file path (or its bytes), a Booster or an XGBModel.

        ``iteration_range=(begin, end)`` keeps boosting rounds ``[begin, end)``, as
        XGBoost's own ``iteration_range`` (``(0, 0)`` means all). By default a
        Booster keeps all rounds and an XGBModel fitted with early stopping keeps
        ``best_iteration + 1``, as ``XGBModel.predict`` does.
        """
        return cls(_load_xgboost(model, iteration_range))

    @classmethod
    def from_lightgbm(cls, model: Any, *, num_iteration: int | None = None) -> Forest:
        """Load a LightGBM model: a text model file path, a Booster or an LGBMModel.

        ``num_iteration`` keeps the first rounds; by default a Booster or LGBMModel keeps
        its best iteration when it has one (as ``predict`` does), a file keeps all.
        """
        return cls(_load_lightgbm(model, num_iteration))

    @classmethod
    def from_sklearn(cls, estimator: Any) -> Forest:
        """Load a fitted scikit-learn RandomForest*, ExtraTrees*, GradientBoosting*,
        HistGradientBoosting* (or DecisionTree*) estimator."""
        return cls(_load_sklearn(estimator))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Forest:
        """Read a forest written by :meth:`save`.

        The file is validated as a fresh build is: a truncated, corrupted or foreign
        file raises :class:`fastml.FormatError` (a ``ValueError``) naming the file,
        the field and its byte offset; a file that cannot be opened or read raises
        ``OSError``.
        """
        with open(path, "rb") as fh:
            data = fh.read()
        return cls._from_bytes(data, repr(os.fspath(path)))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Forest:
        """Decode bytes written by :meth:`to_bytes` (validated as :meth:`load` is)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        return cls._from_bytes(bytes(data), "data")

    @classmethod
    def _from_bytes(cls, data: bytes, source: str) -> Forest:
        core = _core.ForestCore.from_bytes(data, source)
        try:
            return cls(core)
        except ValueError as e:
            raise _core.FormatError(f"{source}: not a valid fastml forest file: {e}") from None

    def to_bytes(self) -> bytes:
        """The forest in fastml's versioned binary format (what :meth:`save` writes)."""
        return bytes(self._core.to_bytes())

    def __reduce__(self) -> tuple[Any, ...]:
        return (Forest.from_bytes, (self.to_bytes(),))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the forest in fastml's versioned binary format (magic, version, checksum)."""
        data = self.to_bytes()
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    # -------------------------------------------------------------- properties

    @property
    def num_features(self) -> int:
        """Number of input features (columns of X)."""
        return int(self._core.num_features)

    @property
    def num_trees(self) -> int:
        """Number of trees kept (after iteration_range / num_iteration)."""
        return int(self._core.num_trees)

    @property
    def num_outputs(self) -> int:
        """Outputs per row: 1, or the number of classes of a multi-class model."""
        return int(self._core.num_outputs)

    @property
    def objective(self) -> str:
        """The source model's objective (e.g. ``'binary:logistic'``, ``'multiclass num_class:3'``,
        or the scikit-learn estimator's class name)."""
        return self._objective

    @property
    def output_dtype(self) -> np.dtype[Any]:
        """dtype of margin/value outputs: float32 for XGBoost, float64 otherwise."""
        return np.dtype(self._core.output_dtype)

    @property
    def max_depth(self) -> int:
        """Depth of the deepest tree."""
        return int(self._core.max_depth)

    def __repr__(self) -> str:
        return (
            f"Forest(objective={self.objective!r}, num_trees={self.num_trees}, "
            f"num_features={self.num_features}, num_outputs={self.num_outputs})"
        )

    def _fastml_native_handler(self) -> Any:
        """The native handler that fastml.infer.Batcher runs without the GIL
        (its output is predict(X, output='value'))."""
        return self._core

    # -------------------------------------------------------------- prediction

    def predict(
        self,
        X: Any,
        output: Output = "value",
        device: Device = "cpu",
        out: np.ndarray | None = None,
    ) -> Any:
        """Predict rows of ``X``.

        X: a 2-D float32/float64 NumPy array (other numeric dtypes are converted),
        a CPU or CUDA torch tensor, or a pandas/pyarrow table of numeric columns
        (categorical columns use their codes). NaN is a missing value.

        output: ``"margin"`` (raw score), ``"value"`` (after the objective's link:
        probabilities, exp for Poisson/Gamma/Tweedie, identity for regression and
        ranking) or ``"class"`` (int64 class index, or the estimator's class label
        for scikit-learn classifiers).

        device: ``"cpu"``, ``"cuda"`` (needs a CUDA build and GPU), or ``"auto"``
        (the GPU for CUDA tensors and large batches when one is usable).

        Returns a NumPy array of shape (rows,) when num_outputs == 1 else
        (rows, num_outputs), dtype :attr:`output_dtype` (int64 or the label dtype
        for "class"); a CUDA torch tensor when X is one and the GPU ran it. ``out``
        receives margin/value results in place (C-contiguous, right shape and dtype).
        One row given as a 1-D array of ``num_features`` values is answered with
        one row of output (``predict(X[0]) == predict(X[0:1])[0]``), as
        :class:`~fastml.infer.Batcher` answers it.
        """
        if output not in ("value", "margin", "class"):
            raise ValueError(f"output must be 'value', 'margin' or 'class', got {output!r}")
        if (
            type(X).__module__.split(".")[0] in ("numpy", "torch")
            and len(getattr(X, "shape", ())) == 1
        ):
            if out is not None:
                raise ValueError("out is for batches: give X as (rows, features) to use it")
            return self.predict(X[None], output=output, device=device)[0]
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
        if output == "class":
            task = self._meta.get("task")
            if task not in ("binary", "multiclass", "proba", "multiclass_ova"):
                raise ValueError(
                    f"output='class' needs a classification model, this forest's objective "
                    f"is {self.objective!r}"
                )
        use_cuda = device == "cuda" or (device == "auto" and self._auto_cuda(X))
        apply_link = output == "value"
        if use_cuda:
            res = self._predict_cuda(X, apply_link)
        else:
            Xm = _as_matrix(self._by_name(X))
            if output == "class" or out is None:
                res = self._core.predict(Xm, apply_link)
            else:
                return self._core.predict(Xm, apply_link, out)
        if output == "class":
            res = self._to_class(res)
        if out is not None:
            if type(res).__module__.startswith("torch"):
                res = res.cpu().numpy()
            if out.shape != res.shape:
                raise ValueError(f"out must have shape {res.shape}, got {out.shape}")
            np.copyto(out, res, casting="same_kind")
            return out
        return res

    @property
    def feature_names(self) -> list[str] | None:
        """The feature names the source model recorded (None when it had none).

        With names, a pandas/polars DataFrame or Arrow table passed to
        :meth:`predict` is matched by column name (reordered if needed); a frame
        whose names differ is refused, naming the missing and unknown columns.
        Arrays are always taken by position.
        """
        names = self._meta.get("feature_names")
        return list(names) if isinstance(names, list) else None

    def _by_name(self, X: Any) -> Any:
        names = self.feature_names
        return X if names is None else _select_by_name(X, names)

    def _auto_cuda(self, X: Any) -> bool:
        import fastml

        if not _core.forest_cuda_compiled() or not fastml.cuda_available():
            return False
        if _is_cuda_tensor(X):
            return True
        shape = getattr(X, "shape", None)
        return bool(shape) and int(shape[0]) >= _AUTO_CUDA_MIN_ROWS

    def _predict_cuda(self, X: Any, apply_link: bool) -> Any:
        if _is_cuda_tensor(X):
            import torch

            if X.dim() != 2:
                raise ValueError(f"X must be 2-D (rows, features), got shape {tuple(X.shape)}")
            if X.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"X must be float32 or float64, got {X.dtype}")
            Xc = X.contiguous()
            rows = int(Xc.shape[0])
            odt = torch.float32 if self.output_dtype == np.float32 else torch.float64
            shape = (rows,) if self.num_outputs == 1 else (rows, self.num_outputs)
            res = torch.empty(shape, dtype=odt, device=Xc.device)
            stream = torch.cuda.current_stream(Xc.device).cuda_stream
            self._core.predict_cuda_ptr(
                Xc.data_ptr(),
                rows,
                int(Xc.shape[1]),
                "float32" if Xc.dtype == torch.float32 else "float64",
                res.data_ptr(),
                apply_link,
                stream,
            )
            return res
        return self._core.predict_cuda(_as_matrix(self._by_name(X)), apply_link)

    def _to_class(self, margin: Any) -> Any:
        if type(margin).__module__.startswith("torch"):
            margin = margin.cpu().numpy()
        # From margins: > 0 is class 1 for every one-output link; argmax otherwise
        # (the links are monotonic, so argmax of the margin is argmax of the value).
        if margin.ndim == 1:
            idx = (margin > 0).astype(np.int64)
        else:
            idx = np.argmax(margin, axis=1).astype(np.int64)
        classes = self._meta.get("classes")
        if classes is not None:
            return np.asarray(classes)[idx]
        return idx
