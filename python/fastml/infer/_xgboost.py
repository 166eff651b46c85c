"""XGBoost importer of fastml.infer.Forest: JSON and UBJSON models, Boosters and
XGBModels, read into the spec builder (bit-identical margins)."""

from __future__ import annotations

import json
import operator
import os
from typing import Any

import numpy as np

from fastml import _core
from fastml.infer import _ubjson
from fastml.infer._forest_common import (
    _CAT_INVALID_LEFT,
    _CATEGORICAL,
    _DEFAULT_LEFT,
    _EXP,
    _HINGE,
    _IDENTITY,
    _SIGMOID,
    _SOFTMAX,
    MAX_CLASSES,
    _ArgumentError,
    _as_list,
    _f32_le_threshold_for_lt,
    _names_or_none,
    _reading,
    _SpecBuilder,
)

# ---------------------------------------------------------------------------- XGBoost

# XGBoost's first invalid category: inputs from 2^24 up (float32 stops being
# exact there) go the invalid way (measured against xgboost 3.2 and 3.4).
_XGB_MAX_CAT = 1 << 24

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
                # XGBoost takes inputs >= 2^24 (no longer exact in float32) as invalid,
                # so set members from 2^24 up can never match: they are left out.
                members = [c for c in cats[seg : seg + size] if c < _XGB_MAX_CAT]
                cat_idx[nid] = sb.add_cat_set(members)
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
        cat_hi=float(_XGB_MAX_CAT),
    )
