"""scikit-learn importer of fastml.infer.Forest: fitted trees, forests and
(histogram) gradient boosting, read from their ``tree_`` / predictor arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastml.infer._forest_common import (
    _CAT_INVALID_LEFT,
    _CAT_SET_LEFT,
    _CATEGORICAL,
    _DEFAULT_LEFT,
    _EXP,
    _IDENTITY,
    _SIGMOID,
    _SOFTMAX,
    _f32_le_threshold_for_double,
    _names_or_none,
    _SpecBuilder,
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


def _sk_feature_names(est: Any) -> list[str] | None:
    names = getattr(est, "feature_names_in_", None)
    if names is None:
        return None
    return _names_or_none([str(n) for n in names], len(names))
