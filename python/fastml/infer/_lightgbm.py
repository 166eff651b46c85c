"""LightGBM importer of fastml.infer.Forest: the text model format (files,
strings, Boosters, LGBMModels), read into the spec builder (raw scores to 1e-12)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fastml.infer._forest_common import (
    _CAT_SET_LEFT,
    _CATEGORICAL,
    _DEFAULT_LEFT,
    _EXP,
    _IDENTITY,
    _SIGMOID,
    _SOFTMAX,
    _ZERO_MISSING,
    _ArgumentError,
    _names_or_none,
    _reading,
    _SpecBuilder,
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


def _lgb_feature_names(text: str, num_features: int) -> list[str] | None:
    # LightGBM always writes names; Column_0, Column_1, ... mean "none were given".
    names = _names_or_none(text.split(), num_features)
    if names is not None and names == [f"Column_{i}" for i in range(num_features)]:
        return None
    return names
