"""fastml.infer.Forest against XGBoost, LightGBM and scikit-learn's own predictors.

Models are small (few trees, small data) so the whole file stays fast; inputs
include values exactly at split thresholds and one ULP either side, NaN, ±inf,
-0.0, unseen and negative categories.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest

import fastml
from fastml import _core
from fastml.infer import Forest

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")

RNG = np.random.default_rng(1234)
NF = 6


def _train_data(n=600, nan_frac=0.05, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, NF))
    X[:, 2] = rng.integers(0, 8, n)  # a small-integer column (categorical in some models)
    X[rng.random(X.shape) < nan_frac] = np.nan
    score = np.nan_to_num(X[:, 0]) + np.isin(X[:, 2], [1, 3, 6]) - 0.5 * np.nan_to_num(X[:, 1])
    return X, score


def _edge_matrix(thresholds: dict[int, np.ndarray], n: int, seed: int, dtype=np.float64):
    """Rows whose values sit on split thresholds, one ULP either side, and at special values."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, NF)).astype(dtype)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-36, -1e-36], dtype=dtype)
    for f in range(NF):
        t = np.asarray(thresholds.get(f, np.zeros(0)), dtype=dtype)
        if t.size:
            cand = np.concatenate(
                [t, np.nextafter(t, dtype(np.inf)), np.nextafter(t, dtype(-np.inf)), special]
            )
        else:
            cand = special
        mask = rng.random(n) < 0.6
        X[mask, f] = rng.choice(cand, int(mask.sum()))
    # categorical-ish column: seen, unseen, negative, fractional, huge
    cats = np.array([0, 1, 2, 3, 6, 7, 9, 11, 40, -1, -0.5, 0.5, 2.5, 1e10, np.nan], dtype=dtype)
    mask = rng.random(n) < 0.7
    X[mask, 2] = rng.choice(cats, int(mask.sum()))
    return X


def _xgb_thresholds(booster) -> dict[int, np.ndarray]:
    j = json.loads(bytes(booster.save_raw("json")))
    out: dict[int, list[float]] = {}
    for t in j["learner"]["gradient_booster"]["model"]["trees"]:
        for lc, f, c, st in zip(
            t["left_children"],
            t["split_indices"],
            t["split_conditions"],
            t["split_type"],
            strict=False,
        ):
            if lc != -1 and st == 0:
                out.setdefault(f, []).append(c)
    return {f: np.array(v, dtype=np.float32) for f, v in out.items()}


def _lgb_thresholds(booster) -> dict[int, np.ndarray]:
    out: dict[int, list[float]] = {}
    for tree in booster.dump_model()["tree_info"]:
        stack = [tree["tree_structure"]]
        while stack:
            node = stack.pop()
            if "split_feature" in node:
                if node["decision_type"] == "<=":
                    out.setdefault(node["split_feature"], []).append(node["threshold"])
                stack += [node["left_child"], node["right_child"]]
    return {f: np.array(v) for f, v in out.items()}


def _sk_thresholds(trees) -> dict[int, np.ndarray]:
    out: dict[int, list[float]] = {}
    for tree in trees:
        t = tree.tree_
        for f, thr, lc in zip(t.feature, t.threshold, t.children_left, strict=False):
            if lc >= 0:
                out.setdefault(int(f), []).append(float(thr))
    return {f: np.array(v) for f, v in out.items()}


# ---------------------------------------------------------------------------- XGBoost

XGB_CASES = {
    "binary:logistic": {},
    "binary:logitraw": {},
    "binary:hinge": {},
    "reg:logistic": {},
    "multi:softprob": {"num_class": 3},
    "multi:softmax": {"num_class": 3},
    "reg:squarederror": {},
    "reg:absoluteerror": {},
    "count:poisson": {},
    "reg:gamma": {},
    "reg:tweedie": {},
    "rank:pairwise": {},
}


def _xgb_label(obj, score, rng):
    if obj.startswith("multi"):
        return np.digitize(score, [-0.3, 0.7])
    if obj in ("binary:logistic", "binary:logitraw", "binary:hinge", "reg:logistic"):
        return (score > 0.3).astype(float)
    if obj in ("count:poisson",):
        return rng.poisson(np.exp(np.clip(score, -2, 2)))
    if obj in ("reg:gamma", "reg:tweedie"):
        return np.exp(np.clip(score, -2, 2)) + 0.1
    if obj.startswith("rank"):
        return np.digitize(score, [0, 1])
    return score


@pytest.fixture(scope="module")
def xgb_models():
    X, score = _train_data()
    rng = np.random.default_rng(5)
    models = {}
    for obj, extra in XGB_CASES.items():
        y = _xgb_label(obj, score, rng)
        d = xgb.DMatrix(X, y)
        if obj.startswith("rank"):
            d.set_group([100] * 6)
        params = {"objective": obj, "max_depth": 4, "eta": 0.3, "nthread": 1, **extra}
        models[obj] = xgb.train(params, d, 8)
    return models


def _check_xgb(booster, forest, X32):
    m = booster.inplace_predict(X32, predict_type="margin")
    fm = forest.predict(X32, output="margin")
    assert fm.dtype == np.float32
    np.testing.assert_array_equal(fm, m.reshape(fm.shape))  # bit-identical
    # float64 input is rounded to float32 first, as XGBoost does
    np.testing.assert_array_equal(forest.predict(X32.astype(np.float64), output="margin"), fm)
    return m, fm


@pytest.mark.parametrize("obj", list(XGB_CASES))
def test_xgboost_margins_bit_identical_and_values(xgb_models, obj, tmp_path):
    b = xgb_models[obj]
    f = Forest.from_xgboost(b)
    X = _edge_matrix(_xgb_thresholds(b), 700, seed=len(obj)).astype(np.float32)
    _check_xgb(b, f, X)
    v = b.inplace_predict(X)
    fv = f.predict(X)
    if obj == "multi:softmax":
        np.testing.assert_array_equal(f.predict(X, output="class"), v.astype(np.int64))
        assert fv.shape == (len(X), 3)
        np.testing.assert_allclose(fv.sum(axis=1), 1.0, rtol=1e-5)
    else:
        np.testing.assert_allclose(fv, v.reshape(fv.shape), rtol=2e-6, atol=1e-7)
    if obj == "binary:logistic":
        np.testing.assert_array_equal(f.predict(X, output="class"), (v > 0.5).astype(np.int64))
    # JSON and UBJSON files give the same forest
    for ext in ("json", "ubj"):
        p = tmp_path / f"m.{ext}"
        b.save_model(str(p))
        f2 = Forest.from_xgboost(str(p))
        np.testing.assert_array_equal(f2.predict(X, output="margin"), f.predict(X, output="margin"))
    assert f.objective == obj
    assert f.num_features == NF
    assert f.num_outputs == (3 if obj.startswith("multi") else 1)


def test_xgboost_parallel_trees_iteration_range_and_dart():
    X, score = _train_data(seed=3)
    y = (score > 0.3).astype(float)
    Xt = _edge_matrix({}, 400, seed=9).astype(np.float32)
    b = xgb.train(
        {
            "objective": "binary:logistic",
            "num_parallel_tree": 3,
            "subsample": 0.7,
            "colsample_bynode": 0.7,
            "max_depth": 3,
            "nthread": 1,
        },
        xgb.DMatrix(X, y),
        5,
    )
    f = Forest.from_xgboost(b)
    assert f.num_trees == 15
    _check_xgb(b, f, Xt)
    f = Forest.from_xgboost(b, iteration_range=(1, 4))
    assert f.num_trees == 9
    np.testing.assert_array_equal(
        f.predict(Xt, output="margin"),
        b.inplace_predict(Xt, predict_type="margin", iteration_range=(1, 4)),
    )
    with pytest.raises(ValueError, match="iteration_range"):
        Forest.from_xgboost(b, iteration_range=(3, 9))
    # multi-class with iteration_range
    y3 = np.digitize(score, [-0.3, 0.7])
    b3 = xgb.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "nthread": 1},
        xgb.DMatrix(X, y3),
        6,
    )
    f3 = Forest.from_xgboost(b3, iteration_range=(2, 5))
    np.testing.assert_array_equal(
        f3.predict(Xt, output="margin"),
        b3.inplace_predict(Xt, predict_type="margin", iteration_range=(2, 5)),
    )
    # dart: tree weights
    bd = xgb.train(
        {
            "booster": "dart",
            "objective": "reg:squarederror",
            "rate_drop": 0.3,
            "max_depth": 3,
            "nthread": 1,
        },
        xgb.DMatrix(X, score),
        6,
    )
    _check_xgb(bd, Forest.from_xgboost(bd), Xt)


def test_xgboost_sklearn_wrapper_best_iteration():
    X, score = _train_data(seed=4)
    y = (score > 0.3).astype(int)
    clf = xgb.XGBClassifier(
        n_estimators=40, max_depth=3, early_stopping_rounds=3, n_jobs=1, learning_rate=0.8
    )
    clf.fit(X[:400], y[:400], eval_set=[(X[400:], y[400:])], verbose=False)
    assert clf.best_iteration < 39
    f = Forest.from_xgboost(clf)
    Xt = _edge_matrix({}, 300, seed=2).astype(np.float32)
    assert f.num_trees == clf.best_iteration + 1
    np.testing.assert_array_equal(
        f.predict(Xt, output="margin"), clf.predict(Xt, output_margin=True)
    )
    np.testing.assert_array_equal(f.predict(Xt, output="class"), clf.predict(Xt))
    np.testing.assert_allclose(f.predict(Xt), clf.predict_proba(Xt)[:, 1], rtol=2e-6)


def test_xgboost_categorical_splits():
    rng = np.random.default_rng(7)
    n = 800
    c = rng.integers(0, 12, n)
    x = rng.random(n)
    y = np.isin(c, [1, 3, 5, 8]) * 2.0 + x + rng.normal(0, 0.1, n)
    X = np.stack([c.astype(float), x], 1)
    X[rng.random(n) < 0.05, 0] = np.nan
    d = xgb.DMatrix(X, y, enable_categorical=True, feature_types=["c", "q"])
    b = xgb.train({"max_depth": 3, "max_cat_to_onehot": 1, "nthread": 1}, d, 6)
    f = Forest.from_xgboost(b)
    vals = np.array(
        [
            -1,
            -0.5,
            -0.0,
            0,
            0.5,
            1,
            1.5,
            3,
            11,
            12,
            13,
            40,
            2**24,
            2**31,
            1e30,
            np.inf,
            -np.inf,
            np.nan,
        ],
        dtype=np.float32,
    )
    Xt = np.stack(
        [np.repeat(vals, 5), np.tile(np.linspace(0, 1, 5, dtype=np.float32), len(vals))], 1
    )
    _check_xgb(b, f, Xt)


def test_xgboost_base_score_variants():
    X, score = _train_data(seed=8)
    Xt = _edge_matrix({}, 300, seed=3).astype(np.float32)
    for bs in (0.3, 0.77, 0.123456):
        b = xgb.train(
            {"objective": "binary:logistic", "base_score": bs, "max_depth": 2, "nthread": 1},
            xgb.DMatrix(X, (score > 0).astype(float)),
            3,
        )
        _check_xgb(b, Forest.from_xgboost(b), Xt)


def test_xgboost_unsupported_and_corrupt(tmp_path):
    X, score = _train_data(seed=2)
    b = xgb.train({"booster": "gblinear", "nthread": 1}, xgb.DMatrix(X, score), 2)
    with pytest.raises(ValueError, match="gblinear"):
        Forest.from_xgboost(b)
    b = xgb.train(
        {"objective": "reg:quantileerror", "quantile_alpha": 0.5, "nthread": 1},
        xgb.DMatrix(X, score),
        2,
    )
    with pytest.raises(ValueError, match="unsupported XGBoost objective 'reg:quantileerror'"):
        Forest.from_xgboost(b)
    p = tmp_path / "bad.json"
    p.write_text('{"learner": {"objective": {"name": "binary:logistic"}}}')
    with pytest.raises(ValueError, match="not a valid XGBoost model"):
        Forest.from_xgboost(str(p))
    p.write_bytes(b"binf\x00\x01garbage")
    with pytest.raises(ValueError, match="not an XGBoost JSON or UBJSON model"):
        Forest.from_xgboost(str(p))
    with pytest.raises(TypeError, match="model must be"):
        Forest.from_xgboost(3.5)
    with pytest.raises(FileNotFoundError):
        Forest.from_xgboost(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------------- LightGBM

LGB_CASES = {
    "binary": {"objective": "binary"},
    "multiclass": {"objective": "multiclass", "num_class": 3},
    "multiclassova": {"objective": "multiclassova", "num_class": 3},
    "regression_zero_missing": {"objective": "regression", "zero_as_missing": True},
    "regression_no_missing": {"objective": "regression", "use_missing": False},
    "poisson": {"objective": "poisson"},
    "gamma": {"objective": "gamma"},
    "tweedie": {"objective": "tweedie"},
    "rf": {"objective": "binary", "boosting": "rf", "bagging_fraction": 0.6, "bagging_freq": 1},
    "lambdarank": {"objective": "lambdarank"},
    "cross_entropy": {"objective": "cross_entropy"},
}


@pytest.fixture(scope="module")
def lgb_models():
    X, score = _train_data(n=900)
    X[np.random.default_rng(3).random(len(X)) < 0.2, 4] = 0.0
    models = {}
    for name, params in LGB_CASES.items():
        obj = params["objective"]
        if obj.startswith("multi"):
            y = np.digitize(score, [-0.3, 0.7])
        elif obj in ("binary", "cross_entropy"):
            y = (score > 0.3).astype(float)
        elif obj in ("poisson", "gamma", "tweedie"):
            y = np.exp(np.clip(score, -2, 2)) + 0.1
        elif obj == "lambdarank":
            y = np.digitize(score, [0, 1])
        else:
            y = score
        ds = lgb.Dataset(
            X, y, categorical_feature=[2], group=[150] * 6 if obj == "lambdarank" else None
        )
        models[name] = lgb.train(
            {
                **params,
                "verbose": -1,
                "num_leaves": 12,
                "min_data_per_group": 5,
                "cat_smooth": 1,
                "num_threads": 1,
                "min_data_in_leaf": 5,
            },
            ds,
            8,
        )
    return models


@pytest.mark.parametrize("name", list(LGB_CASES))
def test_lightgbm_raw_scores_and_values(lgb_models, name, tmp_path):
    b = lgb_models[name]
    f = Forest.from_lightgbm(b)
    for dtype in (np.float64, np.float32):
        X = _edge_matrix(_lgb_thresholds(b), 700, seed=len(name), dtype=dtype)
        X[::7, 4] = np.array([0.0, -0.0, 1e-36, -1e-36, 1e-30, np.nan, 5.0] * 100, dtype=dtype)[
            : len(X[::7])
        ]
        m = b.predict(X, raw_score=True)
        fm = f.predict(X, output="margin")
        assert fm.dtype == np.float64
        np.testing.assert_allclose(fm, m.reshape(fm.shape), rtol=1e-12, atol=1e-300)
        v = b.predict(X)
        np.testing.assert_allclose(f.predict(X), v.reshape(fm.shape), rtol=1e-12, atol=1e-15)
    p = tmp_path / "model.txt"
    b.save_model(str(p))
    np.testing.assert_array_equal(Forest.from_lightgbm(str(p)).predict(X, output="margin"), fm)


def test_lightgbm_sklearn_wrapper_and_num_iteration():
    X, score = _train_data(seed=6)
    y = (score > 0.3).astype(int)
    clf = lgb.LGBMClassifier(n_estimators=30, num_leaves=8, verbose=-1, n_jobs=1, learning_rate=0.5)
    clf.fit(
        X[:400],
        y[:400],
        eval_X=(X[400:],),
        eval_y=(y[400:],),
        callbacks=[lgb.early_stopping(2, verbose=False)],
    )
    f = Forest.from_lightgbm(clf)
    Xt = _edge_matrix({}, 300, seed=1)
    np.testing.assert_allclose(
        f.predict(Xt, output="margin"), clf.predict(Xt, raw_score=True), rtol=1e-12
    )
    np.testing.assert_array_equal(f.predict(Xt, output="class"), clf.predict(Xt))
    f5 = Forest.from_lightgbm(clf.booster_, num_iteration=5)
    assert f5.num_trees == 5
    np.testing.assert_allclose(
        f5.predict(Xt, output="margin"),
        clf.booster_.predict(Xt, raw_score=True, num_iteration=5),
        rtol=1e-12,
    )


def test_lightgbm_unsupported_and_corrupt(tmp_path):
    X, score = _train_data(seed=2)
    b = lgb.train(
        {"objective": "regression", "linear_tree": True, "verbose": -1, "num_threads": 1},
        lgb.Dataset(np.nan_to_num(X), score),
        2,
    )
    with pytest.raises(ValueError, match="linear trees"):
        Forest.from_lightgbm(b)
    p = tmp_path / "m.txt"
    p.write_text("not a model")
    with pytest.raises(ValueError, match="not a LightGBM text model"):
        Forest.from_lightgbm(str(p))
    b = lgb.train(
        {"objective": "binary", "verbose": -1, "num_threads": 1},
        lgb.Dataset(np.nan_to_num(X), (score > 0).astype(float)),
        2,
    )
    text = b.model_to_string()
    p.write_text(text.replace("objective=binary sigmoid:1", "objective=custom_thing"))
    with pytest.raises(ValueError, match="unsupported LightGBM objective 'custom_thing'"):
        Forest.from_lightgbm(str(p))
    p.write_text(text.replace("left_child=", "left_child=99 ", 1))
    with pytest.raises(ValueError):
        Forest.from_lightgbm(str(p))
    with pytest.raises(TypeError, match="model must be"):
        Forest.from_lightgbm(object())


# ---------------------------------------------------------------------------- scikit-learn


def _sk_cases():
    from sklearn import ensemble, tree

    return [
        (
            "rf_clf_nan",
            ensemble.RandomForestClassifier(8, max_depth=6, random_state=0),
            "bin",
            True,
        ),
        (
            "rf_clf_multi",
            ensemble.RandomForestClassifier(8, max_depth=6, random_state=0),
            "multi",
            False,
        ),
        ("rf_reg_nan", ensemble.RandomForestRegressor(8, max_depth=6, random_state=0), "reg", True),
        (
            "et_reg_2out",
            ensemble.ExtraTreesRegressor(8, max_depth=6, random_state=0),
            "reg2",
            False,
        ),
        ("et_clf", ensemble.ExtraTreesClassifier(8, random_state=0), "bin", False),
        (
            "gb_clf",
            ensemble.GradientBoostingClassifier(n_estimators=10, random_state=0),
            "bin",
            False,
        ),
        (
            "gb_clf_multi",
            ensemble.GradientBoostingClassifier(n_estimators=10, random_state=0),
            "multi",
            False,
        ),
        (
            "gb_reg",
            ensemble.GradientBoostingRegressor(n_estimators=10, random_state=0),
            "reg",
            False,
        ),
        (
            "hgb_clf_cat",
            ensemble.HistGradientBoostingClassifier(max_iter=10, categorical_features=[2]),
            "bin",
            True,
        ),
        (
            "hgb_clf_multi_cat",
            ensemble.HistGradientBoostingClassifier(max_iter=10, categorical_features=[2]),
            "multi",
            True,
        ),
        ("hgb_reg", ensemble.HistGradientBoostingRegressor(max_iter=10), "reg", True),
        (
            "hgb_poisson",
            ensemble.HistGradientBoostingRegressor(max_iter=10, loss="poisson"),
            "pos",
            True,
        ),
        ("tree_reg", tree.DecisionTreeRegressor(max_depth=5), "reg", False),
    ]


@pytest.mark.parametrize("case", _sk_cases(), ids=lambda c: c[0])
def test_sklearn_predictions(case):
    name, est, target, nan = case
    X, score = _train_data(n=500, nan_frac=0.05 if nan else 0.0, seed=11)
    y = {
        "bin": (score > 0.3).astype(int),
        "multi": np.digitize(score, [-0.3, 0.7]),
        "reg": score,
        "reg2": np.stack([score, -2 * score], 1),
        "pos": np.exp(np.clip(score, -2, 2)),
    }[target]
    est.fit(X, y)
    f = Forest.from_sklearn(est)
    trees = getattr(est, "estimators_", [est])
    trees = list(np.ravel(trees)) if not hasattr(est, "_predictors") else []
    Xt = _edge_matrix(_sk_thresholds(trees), 600, seed=3)
    if not nan:
        Xt = np.where(np.isfinite(Xt), Xt, 0.5)
    else:
        Xt = np.where(np.isinf(Xt), 1e30, Xt)  # sklearn rejects inf
    if name.startswith(("gb_", "rf_", "et_", "tree")):
        Xt = np.clip(Xt, -1e30, 1e30)
    if hasattr(est, "predict_proba"):
        p = est.predict_proba(Xt)
        fv = f.predict(Xt)
        np.testing.assert_allclose(fv, p if fv.ndim == 2 else p[:, 1], rtol=1e-6, atol=1e-12)
        np.testing.assert_array_equal(f.predict(Xt, output="class"), est.predict(Xt))
    else:
        np.testing.assert_allclose(
            f.predict(Xt),
            est.predict(Xt).reshape(-1, f.num_outputs).squeeze(),
            rtol=1e-6,
            atol=1e-12,
        )


def test_sklearn_rejects_unsupported():
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import LinearRegression

    X, score = _train_data(n=100, nan_frac=0, seed=1)
    with pytest.raises(TypeError, match="estimator must be"):
        Forest.from_sklearn(LinearRegression().fit(X, score))
    with pytest.raises(ValueError, match="not fitted"):
        Forest.from_sklearn(RandomForestRegressor())


# ---------------------------------------------------------------------------- inputs and API


@pytest.fixture(scope="module")
def small_forest(xgb_models):
    return xgb_models["multi:softprob"], Forest.from_xgboost(xgb_models["multi:softprob"])


def test_input_kinds_give_the_same_answer(small_forest):
    import pandas as pd
    import pyarrow as pa
    import torch

    _b, f = small_forest
    X = _edge_matrix({}, 257, seed=4)
    ref = f.predict(X)
    np.testing.assert_array_equal(f.predict(X.astype(np.float32)), ref)
    np.testing.assert_array_equal(f.predict(torch.from_numpy(X)), ref)
    df = pd.DataFrame(X, columns=[f"c{i}" for i in range(NF)])
    np.testing.assert_array_equal(f.predict(df), ref)
    np.testing.assert_array_equal(f.predict(pa.Table.from_pandas(df)), ref)
    # strided (non-contiguous) views
    big = np.zeros((257, 2 * NF))
    big[:, ::2] = X
    np.testing.assert_array_equal(f.predict(big[:, ::2]), ref)
    np.testing.assert_array_equal(f.predict(np.asfortranarray(X)), ref)
    # integer input is converted
    Xi = np.arange(4 * NF).reshape(4, NF)
    np.testing.assert_array_equal(f.predict(Xi), f.predict(Xi.astype(np.float64)))
    # one row == the same row in a batch; zero rows
    for i in (0, 5, 256):
        np.testing.assert_array_equal(f.predict(X[i : i + 1]), ref[i : i + 1])
    assert f.predict(X[:0]).shape == (0, 3)


def test_out_parameter_and_shapes(small_forest):
    _, f = small_forest
    X = _edge_matrix({}, 50, seed=5).astype(np.float32)
    out = np.empty((50, 3), np.float32)
    res = f.predict(X, output="margin", out=out)
    assert res is out
    np.testing.assert_array_equal(out, f.predict(X, output="margin"))
    with pytest.raises(ValueError, match="out must have shape"):
        f.predict(X, out=np.empty((49, 3), np.float32))
    with pytest.raises(TypeError, match="out must be float32"):
        f.predict(X, out=np.empty((50, 3), np.float64))
    cls = np.empty(50, np.int64)
    assert f.predict(X, output="class", out=cls) is cls


def test_bad_inputs_name_the_argument(small_forest):
    _, f = small_forest
    with pytest.raises(
        ValueError, match=r"X must have 6 features \(columns\), got 2-D float64 \(3, 5\)"
    ):
        f.predict(np.zeros((3, 5)))
    # One row as a 1-D array is answered with one row (the Batcher's rule too).
    np.testing.assert_array_equal(f.predict(np.zeros(6)), f.predict(np.zeros((1, 6)))[0])
    with pytest.raises(
        ValueError, match=r"X must have 6 features \(columns\), got 2-D float64 \(1, 5\)"
    ):
        f.predict(np.zeros(5))
    with pytest.raises(ValueError, match="X must be 2-D"):
        f.predict(np.zeros((1, 1, 6)))
    with pytest.raises(TypeError, match="X must be numeric"):
        f.predict(np.array([["a"] * 6]))
    with pytest.raises(ValueError, match="output must be"):
        f.predict(np.zeros((1, 6)), output="proba")
    with pytest.raises(ValueError, match="device must be"):
        f.predict(np.zeros((1, 6)), device="tpu")
    reg = Forest.from_xgboost(
        xgb.train({"nthread": 1}, xgb.DMatrix(np.zeros((4, 6)), np.arange(4.0)), 1)
    )
    with pytest.raises(ValueError, match="output='class' needs a classification model"):
        reg.predict(np.zeros((1, 6)), output="class")
    with pytest.raises(TypeError, match="Forest is built with"):
        Forest(object())


def test_cuda_device_without_cuda_is_a_clear_error(small_forest):
    _, f = small_forest
    if fastml.cuda_available():
        return  # the gpu-marked test runs device="cuda"
    # CPU-only build: says how to get CUDA; CUDA build without a GPU: the CUDA error, named.
    want = (
        "CUDA error in Forest" if _core.forest_cuda_compiled() else "needs fastml built with CUDA"
    )
    with pytest.raises(RuntimeError, match=want):
        f.predict(np.zeros((2, 6)), device="cuda")
    # auto falls back to the CPU
    np.testing.assert_array_equal(
        f.predict(np.zeros((2, 6)), device="auto"), f.predict(np.zeros((2, 6)))
    )


def test_native_handler(small_forest):
    _, f = small_forest
    h = f._fastml_native_handler()
    assert isinstance(h, _core.NativeHandler)
    assert "multi:softprob" in h.handler_name and "24 trees" in h.handler_name


def test_predict_releases_the_gil_and_is_thread_safe(xgb_models):
    b = xgb_models["binary:logistic"]
    f = Forest.from_xgboost(b)
    X = _edge_matrix({}, 200_000, seed=6).astype(np.float32)
    ref = f.predict(X[:1000])
    ticks = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(1)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        # The Python thread runs while the native predict holds no GIL; on a
        # loaded machine the OS may not schedule it during one call, so up to
        # five calls (a held GIL would give none in any of them).
        for _ in range(5):
            before = len(ticks)
            res = f.predict(X)
            during = len(ticks) - before
            if during > 0:
                break
    finally:
        done.set()
        t.join()
    np.testing.assert_array_equal(res[:1000], ref)
    assert during > 0

    results = {}

    def work(i):
        results[i] = f.predict(X[i * 1000 : (i + 1) * 1000])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    full = f.predict(X[:4000])
    for i in range(4):
        np.testing.assert_array_equal(results[i], full[i * 1000 : (i + 1) * 1000])


def test_threads_do_not_change_results(xgb_models, lgb_models):
    X = _edge_matrix({}, 3000, seed=8)
    f1 = Forest.from_xgboost(xgb_models["multi:softprob"])
    f2 = Forest.from_lightgbm(lgb_models["multiclass"])
    old = fastml.get_num_threads()
    try:
        fastml.set_num_threads(1)
        a1, a2 = f1.predict(X, output="margin"), f2.predict(X, output="margin")
        fastml.set_num_threads(3)
        np.testing.assert_array_equal(f1.predict(X, output="margin"), a1)
        np.testing.assert_array_equal(f2.predict(X, output="margin"), a2)
    finally:
        fastml.set_num_threads(old)


# ---------------------------------------------------------------------------- save / load


def test_save_load_roundtrip(xgb_models, lgb_models, tmp_path):
    from sklearn.ensemble import HistGradientBoostingClassifier

    X, score = _train_data(n=300, seed=1)
    hgb = HistGradientBoostingClassifier(max_iter=5, categorical_features=[2]).fit(X, score > 0.3)
    Xt = _edge_matrix({}, 400, seed=9)
    for f in (
        Forest.from_xgboost(xgb_models["binary:logistic"]),
        Forest.from_lightgbm(lgb_models["multiclass"]),
        Forest.from_sklearn(hgb),
    ):
        p = tmp_path / "f.fmlf"
        f.save(p)
        g = Forest.load(p)
        assert (g.num_trees, g.num_features, g.num_outputs, g.objective) == (
            f.num_trees,
            f.num_features,
            f.num_outputs,
            f.objective,
        )
        for out in ("margin", "value", "class"):
            np.testing.assert_array_equal(g.predict(Xt, output=out), f.predict(Xt, output=out))


def test_load_rejects_corrupt_files(xgb_models, tmp_path):
    f = Forest.from_xgboost(xgb_models["binary:logistic"])
    data = f._core.to_bytes()
    p = tmp_path / "f.fmlf"
    cases = {
        # a foreign 8-byte magic in place of b"FMLFRST1"
        "no 'FMLFRST1' magic at byte 0": b"NOTFMLF!" + data[8:],
        "format version 9 is not supported": data[:8] + b"\x09\x00\x00\x00" + data[12:],
        "truncated or padded": data[: len(data) // 2],
        "does not match its checksum": data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:],
    }
    for msg, blob in cases.items():
        p.write_bytes(blob)
        with pytest.raises(fastml.FormatError, match=re.escape(msg)) as info:
            Forest.load(p)
        assert isinstance(info.value, ValueError) and not isinstance(info.value, OSError)
        assert str(p) in str(info.value)
    with pytest.raises(FileNotFoundError):
        Forest.load(tmp_path / "nope.fmlf")


# ---------------------------------------------------------------------------- native validation


def _tiny_spec(**over):
    spec = {
        "num_features": 2,
        "num_outputs": 1,
        "threshold_f64": False,
        "accum_f64": False,
        "link": 0,
        "divisor": 1.0,
        "divide_margin": True,
        "cat_lo": 0.0,
        "cat_hi": 2.0**31,
        "cat_integral": False,
        "objective": "t",
        "metadata": "{}",
        "tree_node_offsets": np.array([0, 3], np.int64),
        "tree_group": np.array([0], np.int32),
        "node_feature": np.array([1, -1, -1], np.int32),
        "node_threshold": np.array([0.5, 0, 0], np.float64),
        "node_left": np.array([1, -1, -1], np.int32),
        "node_right": np.array([2, -1, -1], np.int32),
        "node_flags": np.array([1 << 31, 0, 0], np.uint32),
        "node_cat": np.array([-1, -1, -1], np.int32),
        "cat_offsets": np.array([0], np.int64),
        "cat_bits": np.zeros(0, np.uint32),
        "leaf_values": np.array([0, -1.0, 2.0], np.float64),
        "base_margin": np.array([0.25], np.float64),
    }
    spec.update(over)
    return spec


def test_native_builder_validates():
    core = _core.ForestCore(_tiny_spec())
    X = np.array(
        [[0, 0.5], [0, np.nextafter(np.float32(0.5), np.float32(1))], [0, np.nan], [0, -np.inf]],
        np.float32,
    )
    np.testing.assert_array_equal(
        core.predict(X, False), np.array([-0.75, 2.25, -0.75, -0.75], np.float32)
    )
    bad = {
        "feature 7": _tiny_spec(node_feature=np.array([7, -1, -1], np.int32)),
        "outside the tree": _tiny_spec(node_left=np.array([5, -1, -1], np.int32)),
        "one child only": _tiny_spec(node_right=np.array([-1, -1, -1], np.int32)),
        "reached twice": _tiny_spec(
            tree_node_offsets=np.array([0, 5], np.int64),
            node_feature=np.array([0, 0, -1, -1, -1], np.int32),
            node_threshold=np.zeros(5),
            node_left=np.array([1, 2, -1, -1, -1], np.int32),
            node_right=np.array([2, 3, -1, -1, -1], np.int32),
            node_flags=np.zeros(5, np.uint32),
            node_cat=np.full(5, -1, np.int32),
            leaf_values=np.zeros(5),
        ),
        "NaN threshold": _tiny_spec(node_threshold=np.array([np.nan, 0, 0])),
        "group 3": _tiny_spec(tree_group=np.array([3], np.int32)),
        "leaf_values must have 3": _tiny_spec(leaf_values=np.zeros(2)),
        "category set 0": _tiny_spec(
            node_flags=np.array([1 << 30, 0, 0], np.uint32),
            node_cat=np.array([0, -1, -1], np.int32),
        ),
        "num_features": _tiny_spec(num_features=0),
        # an offset past the node count (found by ASan: read past the node arrays)
        "nodes past the forest": _tiny_spec(
            tree_node_offsets=np.array([0, 100, 3], np.int64), tree_group=np.array([0, 0], np.int32)
        ),
        "base_margin": _tiny_spec(base_margin=np.zeros(2)),
    }
    for msg, spec in bad.items():
        with pytest.raises(ValueError, match=msg):
            _core.ForestCore(spec)


# ---------------------------------------------------------------------------- CUDA


def _cuda_cases(xgb_models, lgb_models):
    """Every model kind the CPU engine takes: each XGBoost objective (multi-class
    with one tree per class), XGBoost categorical splits, each LightGBM case
    (categorical bitsets, zero-as-missing, multi-class), and scikit-learn
    (vector leaves of forests, float64 thresholds, categorical HistGradientBoosting)."""
    cases = {f"xgb {k}": Forest.from_xgboost(b) for k, b in xgb_models.items()}
    cases |= {f"lgb {k}": Forest.from_lightgbm(b) for k, b in lgb_models.items()}
    rng = np.random.default_rng(7)
    n = 800
    c = rng.integers(0, 12, n)
    Xc = np.stack([c.astype(float), rng.random(n)] + [rng.random(n)] * (NF - 2), 1)
    yc = np.isin(c, [1, 3, 5, 8]) * 2.0 + Xc[:, 1]
    Xc[rng.random(n) < 0.05, 0] = np.nan
    ft = ["c"] + ["q"] * (NF - 1)
    d = xgb.DMatrix(Xc, yc, enable_categorical=True, feature_types=ft)
    cases["xgb categorical"] = Forest.from_xgboost(
        xgb.train({"max_depth": 3, "max_cat_to_onehot": 1, "nthread": 1}, d, 6)
    )
    # More trees than one tile of the kernel (256), one group per class across tiles.
    Xb, sb = _train_data(n=600, seed=5)
    cases["xgb 600 trees"] = Forest.from_xgboost(
        xgb.train({"max_depth": 3, "nthread": 1}, xgb.DMatrix(Xb, sb), 600)
    )
    cases["xgb multi-class 3 x 150 trees"] = Forest.from_xgboost(
        xgb.train(
            {"max_depth": 3, "nthread": 1, "objective": "multi:softprob", "num_class": 3},
            xgb.DMatrix(Xb, np.digitize(sb, [-0.3, 0.7])),
            150,
        )
    )
    X, score = _train_data(n=500, nan_frac=0.05, seed=11)
    Xf = np.where(np.isfinite(X), X, 0.5)
    from sklearn import ensemble

    # 200 classes: more (row, output) sums than the kernel keeps in registers.
    cases["sklearn random forest 200 classes"] = Forest.from_sklearn(
        ensemble.RandomForestClassifier(n_estimators=5, max_depth=8, random_state=0).fit(
            Xf, np.arange(len(Xf)) % 200
        )
    )

    cases["sklearn random forest (vector leaves)"] = Forest.from_sklearn(
        ensemble.RandomForestClassifier(n_estimators=7, max_depth=6, random_state=0).fit(
            Xf, np.digitize(score, [-0.3, 0.7])
        )
    )
    cases["sklearn gradient boosting"] = Forest.from_sklearn(
        ensemble.GradientBoostingRegressor(n_estimators=10, random_state=0).fit(Xf, score)
    )
    cases["sklearn hgb categorical multi-class"] = Forest.from_sklearn(
        ensemble.HistGradientBoostingClassifier(max_iter=10, categorical_features=[2]).fit(
            X, np.digitize(score, [-0.3, 0.7])
        )
    )
    # LightGBM's leaf-wise trees without a depth limit, deep and unbalanced:
    # the binned explicit-children layout (and QuickScorer on the CPU).
    Xl, sl = _train_data(n=3000, nan_frac=0.05, seed=13)
    deep = Forest.from_lightgbm(
        lgb.train(
            {
                "objective": "binary",
                "num_leaves": 31,
                "min_data_in_leaf": 2,
                "verbose": -1,
                "num_threads": 1,
            },
            lgb.Dataset(Xl, (sl > 0).astype(float)),
            20,
        )
    )
    assert deep._core.engine in ("binned", "binned-qs"), deep._core.engine
    cases["lgb leaf-wise deep trees"] = deep
    return cases


@pytest.mark.gpu
def test_cuda_matches_cpu(xgb_models, lgb_models):
    """device="cuda" margins equal the CPU engine's bit for bit for every model
    kind, at row counts that take each block shape of the kernel (1 row per
    block up to 32), from NumPy and from torch CUDA tensors, on the layout each
    forest takes (binned perfect, binned explicit, general) and, for binned
    forests, on the general layout as well."""
    import torch

    X = _edge_matrix({}, 5000, seed=12)
    for name, f in _cuda_cases(xgb_models, lgb_models).items():
        for dt in (np.float32, np.float64):
            Xd = X.astype(dt)
            for rows in (1, 3, 33, 257, 5000):
                part = Xd[:rows]
                cpu_m = f.predict(part, output="margin")
                np.testing.assert_array_equal(
                    f.predict(part, output="margin", device="cuda"), cpu_m, err_msg=name
                )
                np.testing.assert_allclose(
                    f.predict(part, device="cuda"), f.predict(part), rtol=1e-5, err_msg=name
                )
            rows = f.auto_crossover_rows  # measured on this GPU for this forest
            assert 1 <= rows <= 2**62
            big = np.tile(Xd, (max(1, min(rows, 1 << 20) // len(Xd) + 1), 1))
            np.testing.assert_allclose(
                f.predict(big, device="auto"), f.predict(big), rtol=1e-5, err_msg=name
            )
            t = torch.from_numpy(Xd).cuda()
            res = f.predict(t, output="margin", device="auto")
            assert res.is_cuda
            np.testing.assert_array_equal(res.cpu().numpy(), f.predict(Xd, output="margin"))
            one = f.predict(t[0], device="cuda")
            np.testing.assert_allclose(one.cpu().numpy(), f.predict(Xd[0]), rtol=1e-5)
            with pytest.raises(ValueError, match="pass device='cuda'"):
                f.predict(t)  # device="cpu" (the default) with a CUDA tensor
            # The general layout too (binned forests take the binned one by
            # default), at 1-row and 32-row block shapes; and out= in place.
            if f._core.cuda_layout != "general":
                _core.forest_cuda_general(True)
                try:
                    assert f._core.cuda_layout == "general"
                    for rows in (1, 257, 5000):
                        np.testing.assert_array_equal(
                            f.predict(t[:rows], output="margin", device="cuda").cpu().numpy(),
                            f.predict(Xd[:rows], output="margin"),
                            err_msg=f"{name} general layout",
                        )
                finally:
                    _core.forest_cuda_general(False)
            res = torch.empty_like(f.predict(t[:33], output="margin", device="cuda"))
            assert f.predict(t[:33], output="margin", device="cuda", out=res) is res
            np.testing.assert_array_equal(res.cpu().numpy(), f.predict(Xd[:33], output="margin"))


def test_cuda_kernel_emulated_matches_cpu(xgb_models, lgb_models):
    """The CUDA kernel's block code (forest_block.hpp), run on the host: margins
    bit-identical to the CPU engine for every model kind of
    test_cuda_matches_cpu, on each layout it can take (binned forests: the
    binned layout and the general one; others: the general one), at launch
    shapes from 1-row blocks with one tile of trees to 32-row blocks with
    several, float32 and float64 inputs. Values (after the link) to a few ULP."""
    X = _edge_matrix({}, 1000, seed=12)
    layouts = set()
    for name, f in _cuda_cases(xgb_models, lgb_models).items():
        core = f._core
        binned = core.engine.startswith("binned")
        for dt in (np.float32, np.float64):
            Xd = X.astype(dt)
            for rows in (1, 3, 33, 257, 1000):
                part = Xd[:rows]
                ref = core.predict(part, False)
                for general in (False, True) if binned else (False,):
                    for sm_count in (1, 132):
                        got, layout = core.emulate_cuda(part, False, sm_count, general)
                        layouts.add(layout)
                        assert (layout == "general") == (general or not binned), (name, layout)
                        np.testing.assert_array_equal(
                            got, ref, err_msg=f"{name} {layout} {rows} rows sm_count={sm_count}"
                        )
            value, _ = core.emulate_cuda(Xd[:257], True, 132, False)
            np.testing.assert_allclose(value, core.predict(Xd[:257], True), rtol=1e-5, err_msg=name)
    assert layouts == {"perfect", "explicit", "general"}


def test_cuda_layout_switch_reports_and_restores(small_forest):
    core = small_forest[1]._core
    assert core.engine == "binned-perfect"
    before = _core.forest_cuda_general()
    try:
        assert _core.forest_cuda_general(False) is False
        assert core.cuda_layout == "perfect"
        assert _core.forest_cuda_general(True) is True
        assert _core.forest_cuda_general() is True
        assert core.cuda_layout == "general"
    finally:
        _core.forest_cuda_general(before)


def test_cuda_kernel_emulation_rejects_bad_input(small_forest):
    core = small_forest[1]._core
    nf = core.num_features
    with pytest.raises(ValueError, match="sm_count"):
        core.emulate_cuda(np.zeros((2, nf), np.float32), False, 0, False)
    with pytest.raises(ValueError, match="X"):
        core.emulate_cuda(np.zeros((2, nf + 1), np.float32), False, 1, False)
    out, _ = core.emulate_cuda(np.zeros((0, nf), np.float32), False, 1, False)
    assert out.shape[0] == 0


def test_cuda_tensor_path_without_a_gpu(monkeypatch, small_forest):
    """The Python side of device="cuda" with a CUDA tensor, with the tensor
    check and the native launch stubbed (CPU tensors stand in): the launch gets
    X's pointer, shape and dtype, a result of the forest's output dtype and
    shape, and the raw handle of torch's current stream; ``out`` (a tensor on
    X's device, contiguous, of that shape and dtype) is written in place with
    no allocation; a wrong ``out`` is refused naming what is wrong."""
    import torch

    from fastml import _cuda_stream
    from fastml.infer import forest as forest_mod

    _, f = small_forest
    calls = []

    class Core:
        def __init__(self, core):
            self._c = core

        def predict_cuda_ptr(self, *args):
            calls.append(args)

        def __getattr__(self, name):
            return getattr(self._c, name)

    f._core = Core(f._core)
    monkeypatch.setattr(forest_mod, "_is_cuda_tensor", lambda X: isinstance(X, torch.Tensor))
    monkeypatch.setattr(_cuda_stream, "_RAW", lambda index: 1000 + index)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    nf, k = f.num_features, f.num_outputs
    X = torch.zeros((5, nf), dtype=torch.float64)
    res = f.predict(X, output="margin", device="cuda")
    assert res.dtype == torch.float32 and tuple(res.shape) == (5, k)
    x_ptr, rows, cols, dtype, out_ptr, apply_link, stream = calls[-1]
    assert (x_ptr, rows, cols, dtype) == (X.data_ptr(), 5, nf, "float64")
    assert out_ptr == res.data_ptr() and apply_link is False and stream == 1003
    # A non-contiguous X is made contiguous first.
    Xt = torch.zeros((nf, 7), dtype=torch.float32).T
    f.predict(Xt, device="cuda")
    assert calls[-1][3] == "float32" and calls[-1][5] is True and calls[-1][0] != Xt.data_ptr()
    out = torch.empty((5, k), dtype=torch.float32)
    assert f.predict(X, device="cuda", out=out) is out
    assert calls[-1][4] == out.data_ptr()
    for bad, match in (
        (torch.empty((5, k), dtype=torch.float64), "float32 tensor of shape"),
        (torch.empty((4, k), dtype=torch.float32), r"shape \(5, 3\)"),
        (torch.empty((k, 5), dtype=torch.float32).T, "not contiguous"),
    ):
        with pytest.raises(ValueError, match=match):
            f.predict(X, device="cuda", out=bad)
    with pytest.raises(TypeError, match="float32 or float64"):
        f.predict(X.to(torch.int32), device="cuda")
    with pytest.raises(ValueError, match="2-D"):
        f.predict(X[None], device="cuda")
    # A NumPy out with a CUDA tensor: the result copied to the host array.
    monkeypatch.setattr(_cuda_stream, "_RAW", False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d: type("S", (), {"cuda_stream": 9}))
    host = np.empty((5, k), np.float32)
    assert f.predict(X, device="cuda", out=host) is host
    assert calls[-1][6] == 9  # the public stream API where the raw one is missing


def test_auto_crossover_rows_model_and_override(monkeypatch):
    """device="auto": the crossover of two linear timing models, the fallback
    without a GPU, the override, and the decision it drives."""
    from fastml.infer import forest as forest_mod

    cx = forest_mod.crossover_rows
    # CPU 10 us + 1 us/row, GPU 100 us + 0.1 us/row: equal at 100 rows.
    assert cx([(1000, 1010e-6), (2000, 2010e-6)], [(1000, 200e-6), (2000, 300e-6)]) == 100
    # The GPU starts lower and costs less per row: always.
    assert cx([(1, 2.0), (2, 3.0)], [(1, 1.0), (2, 1.5)]) == 1
    # The GPU costs more per row and starts higher: never.
    assert cx([(1, 1.0), (2, 1.5)], [(1, 2.0), (2, 3.0)]) == 2**62
    with pytest.raises(ValueError, match="two distinct"):
        cx([(1, 1.0), (1, 2.0)], [(1, 1.0), (2, 2.0)])

    X, score = _train_data(n=300, seed=4)
    f = Forest.from_xgboost(xgb.train({"max_depth": 3, "nthread": 1}, xgb.DMatrix(X, score), 5))
    if not fastml.cuda_available():
        assert f.auto_crossover_rows == 2**62  # nothing measured without a GPU
    for bad in (0, -5, 1.5, True, "100"):
        with pytest.raises(ValueError, match="auto_crossover_rows must be an int >= 1"):
            f.auto_crossover_rows = bad
    f.auto_crossover_rows = 256
    assert f.auto_crossover_rows == 256
    # The decision, with a GPU pretended usable (nothing runs on it here).
    monkeypatch.setattr(forest_mod._core, "forest_cuda_compiled", lambda: True)
    monkeypatch.setattr(fastml, "cuda_available", lambda: True)
    assert not f._auto_cuda(np.zeros((255, X.shape[1]), np.float32))
    assert f._auto_cuda(np.zeros((256, X.shape[1]), np.float32))


@pytest.mark.gpu
def test_cuda_follows_the_current_stream():
    """A CUDA tensor input runs on torch's current stream, without synchronising:
    the result is ordered after work queued on a side stream and is correct when
    that stream is waited on. (The first call on a device copies the forest
    there, which may synchronise: a serving step warms up before capture.)"""
    import torch

    X, score = _train_data(n=500, seed=3)
    f = Forest.from_xgboost(xgb.train({"max_depth": 4, "nthread": 1}, xgb.DMatrix(X, score), 20))
    side = torch.cuda.Stream()
    Xt = torch.from_numpy(X).cuda()
    with torch.cuda.stream(side):
        # Warm-up on the side stream: the forest's one-time upload, and blocks in
        # torch's caching allocator for this stream (a cudaMalloc may synchronise
        # the device, which would hide whether predict does).
        Xs = torch.empty_like(Xt)
        del_me = f.predict(Xs, output="margin", device="cuda")
        del del_me
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # keeps the stream busy: a sync would be seen
        Xs.copy_(Xt)
        res = f.predict(Xs, output="margin", device="cuda")
        assert not side.query(), "predict synchronised the stream"
    side.synchronize()
    np.testing.assert_array_equal(res.cpu().numpy(), f.predict(X, output="margin"))


@pytest.mark.gpu
def test_cuda_graph_capture_with_out():
    """predict(CUDA tensor, out=tensor) can be captured in a CUDA graph (a
    serving step replayed on new inputs): after a warm-up call (the forest's
    one-time upload), the captured launch allocates and synchronises nothing,
    and each replay writes the margins of the current input into `out`."""
    import torch

    X, score = _train_data(n=700, seed=21)
    f = Forest.from_xgboost(xgb.train({"max_depth": 6, "nthread": 1}, xgb.DMatrix(X, score), 40))
    X = X.astype(np.float32)
    X2 = _edge_matrix({}, 700, seed=22).astype(np.float32)
    static_x = torch.from_numpy(X).cuda()
    out = torch.empty(len(X), dtype=torch.float32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        f.predict(static_x, output="margin", device="cuda", out=out)  # warm-up: upload
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        f.predict(static_x, output="margin", device="cuda", out=out)
    for batch in (X2, X):
        static_x.copy_(torch.from_numpy(batch))
        graph.replay()
        torch.cuda.synchronize()
        np.testing.assert_array_equal(out.cpu().numpy(), f.predict(batch, output="margin"))


def test_frames_are_matched_by_feature_name(tmp_path):
    """A model trained on a named frame: a frame with its columns reordered is
    matched by name (was: silently wrong predictions, issue #20); a frame with
    other names is refused, naming them; arrays stay positional."""
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    pa = pytest.importorskip("pyarrow")
    lgb = pytest.importorskip("lightgbm")
    rng = np.random.default_rng(7)
    df = pd.DataFrame(rng.normal(size=(400, 4)), columns=["amount", "age", "hour", "dist"])
    y = ((df.amount + 2 * df.hour) > 0).astype(float)
    perm = df[["hour", "amount", "dist", "age"]]
    b = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1}, xgb.DMatrix(df, y), 10
    )
    lb = lgb.train({"objective": "binary", "verbose": -1, "num_threads": 1}, lgb.Dataset(df, y), 5)
    for f, want in (
        (Forest.from_xgboost(b), b.predict(xgb.DMatrix(df))),
        (Forest.from_lightgbm(lb), lb.predict(df)),
    ):
        assert f.feature_names == ["amount", "age", "hour", "dist"]
        for frame in (perm, pl.from_pandas(perm), pa.Table.from_pandas(perm, preserve_index=False)):
            np.testing.assert_allclose(f.predict(frame), want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(f.predict(df.to_numpy()), want, rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match=r"missing \['amount'\], unknown \['amt'\]"):
            f.predict(df.rename(columns={"amount": "amt"}))
        with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
            f.predict(df.assign(extra=1.0))
        p = tmp_path / "m.fmlf"
        f.save(p)
        assert Forest.load(p).feature_names == f.feature_names
    # Trained on an array: no names, frames are positional.
    b2 = xgb.train({"objective": "binary:logistic", "nthread": 1}, xgb.DMatrix(df.to_numpy(), y), 3)
    assert Forest.from_xgboost(b2).feature_names is None
    lb2 = lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(df.to_numpy(), y), 3)
    assert Forest.from_lightgbm(lb2).feature_names is None  # LightGBM's Column_i: no names


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_single_class_xgboost_model_is_accepted(label):
    """Trained on one class, base_score is 0 or 1; XGBoost clips it and predicts a
    finite margin, bit for bit the same here (issue #20: was refused)."""
    rng = np.random.default_rng(8)
    X = rng.random((60, 3)).astype(np.float32)
    b = xgb.train(
        {"objective": "binary:logistic", "nthread": 1}, xgb.DMatrix(X, np.full(60, label)), 3
    )
    f = Forest.from_xgboost(b)
    np.testing.assert_array_equal(
        f.predict(X, output="margin"), b.predict(xgb.DMatrix(X), output_margin=True)
    )


def test_scratch_memory_follows_the_work_not_the_model_width():
    """A model over 2M features: predicting one row (and a 20-row batch) must not
    allocate per-thread scratch sized by features x 128 rows (was ~1 GB)."""
    import subprocess
    import sys

    code = r"""
import resource, numpy as np
from fastml import _core
F = 2_000_000
spec = {"num_features": F, "num_outputs": 1, "threshold_f64": False, "accum_f64": False,
        "link": 0, "divisor": 1.0, "divide_margin": True, "cat_lo": 0.0, "cat_hi": 2.0**31,
        "cat_integral": False, "objective": "wide", "metadata": "{}",
        "tree_node_offsets": np.array([0, 3], np.int64), "tree_group": np.array([0], np.int32),
        "node_feature": np.array([F - 1, -1, -1], np.int32),
        "node_threshold": np.array([0.5, 0.0, 0.0]), "node_left": np.array([1, -1, -1], np.int32),
        "node_right": np.array([2, -1, -1], np.int32), "node_flags": np.zeros(3, np.uint32),
        "node_cat": np.full(3, -1, np.int32), "cat_offsets": np.array([0], np.int64),
        "cat_bits": np.zeros(0, np.uint32), "leaf_values": np.array([0.0, 1.0, 2.0]),
        "base_margin": np.zeros(1)}
core = _core.ForestCore(spec)
X = np.zeros((20, F), np.float32); X[:, F - 1] = np.arange(20) % 2
X1 = np.ascontiguousarray(X[1:2].astype(np.float64))  # converted to float32 thresholds: a copy
Xs = X[:, ::1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r1 = core.predict(X1, False)
r20 = core.predict(Xs, False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert r1[0] == 2.0 and list(r20[:2]) == [1.0, 2.0], (r1, r20[:4])
print((after - before) // 1024)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    grown_mib = int(r.stdout.split()[-1])
    # Scratch is at most ~16 MiB (or one row) per thread; it was 2 GB here.
    assert grown_mib < 150, f"max RSS grew by {grown_mib} MiB"


def _xgb_cat_model(rounds: int, depth: int, only_cat: bool = False):
    rng = np.random.default_rng(7)
    n = 800
    c = rng.integers(0, 12, n)
    x = rng.random(n)
    y = np.isin(c, [1, 3, 5, 8]) * 2.0 + x
    X, types = (c[:, None].astype(float), ["c"]) if only_cat else (np.stack([c, x], 1), ["c", "q"])
    d = xgb.DMatrix(X, y, enable_categorical=True, feature_types=types)
    b = xgb.train({"max_depth": depth, "max_cat_to_onehot": 1, "nthread": 1}, d, rounds)
    return json.loads(b.save_raw("json"))


def _add_category(doc, value, every_set: bool = False):
    """Adds `value` to the first category set of every tree that has one (to
    every set with every_set)."""
    for t in doc["learner"]["gradient_booster"]["model"]["trees"]:
        for k in range(
            len(t["categories_sizes"]) if every_set else min(1, len(t["categories_sizes"]))
        ):
            t["categories"].insert(t["categories_segments"][k] + t["categories_sizes"][k], value)
            t["categories_sizes"][k] += 1
            t["categories_segments"] = [s + (i > k) for i, s in enumerate(t["categories_segments"])]
    return json.dumps(doc).encode()


@pytest.mark.parametrize("big", [2**23, 2**24 - 1, 2**24, 2**24 + 2, 2**30])
def test_xgboost_categories_from_2_24_are_invalid_as_in_xgboost(big):
    """XGBoost takes category inputs >= 2^24 as invalid (they go the invalid
    way, even when the model's set lists them): fastml agrees bit for bit
    (it read them as ordinary categories up to 2^31, issue #20)."""
    raw = _add_category(_xgb_cat_model(1, 2), big)
    b = xgb.Booster()
    b.load_model(bytearray(raw))
    X = np.array([[big, 0.5], [big + 1, 0.5], [1, 0.5], [0, 0.5], [2**24, 0.2]], np.float32)
    want = b.predict(
        xgb.DMatrix(X, enable_categorical=True, feature_types=["c", "q"]), output_margin=True
    )
    np.testing.assert_array_equal(Forest.from_xgboost(raw).predict(X, output="margin"), want)


def test_category_bitsets_are_capped():
    """One number in a file asks for a bitset as long as the category: the
    forest's category bitsets are capped at 128 MiB, refused with a clear error
    (a 150-tree model whose sets each list category 2^24 - 1)."""
    from fastml.infer._forest_common import MAX_CATEGORY_WORDS

    doc = _xgb_cat_model(150, 3, only_cat=True)
    trees = doc["learner"]["gradient_booster"]["model"]["trees"]
    assert sum(len(t["categories_sizes"]) for t in trees) * (2**19) > MAX_CATEGORY_WORDS
    with pytest.raises(fastml.FormatError, match="128 MiB"):
        Forest.from_xgboost(_add_category(doc, 2**24 - 1, every_set=True))
    Forest.from_xgboost(_add_category(_xgb_cat_model(150, 3, only_cat=True), 2**20, True))


def _chain_spec(depth: int) -> dict:
    """One tree that is a chain of `depth` splits (each left child a leaf)."""
    n = 2 * depth + 1
    left = np.full(n, -1, np.int32)
    right = np.full(n, -1, np.int32)
    for d in range(depth):
        left[2 * d] = 2 * d + 1
        right[2 * d] = 2 * d + 2
    internal = left >= 0
    return _tiny_spec(
        tree_node_offsets=np.array([0, n], np.int64),
        node_feature=np.where(internal, 0, -1).astype(np.int32),
        node_threshold=np.where(internal, 0.5, 0.0),
        node_left=left,
        node_right=right,
        node_flags=np.zeros(n, np.uint32),
        node_cat=np.full(n, -1, np.int32),
        leaf_values=np.where(internal, 0.0, 1.0),
    )


def test_declared_limits_at_and_past_each(tmp_path):
    """docs/forest.md's limits: at the limit a model builds (and predicts), one
    past it is refused naming the field, before anything is sized from it."""
    # features < 2^27
    last = (1 << 27) - 1
    f = _core.ForestCore(_tiny_spec(num_features=last))
    assert f.num_features == last
    with pytest.raises(ValueError, match="num_features"):
        _core.ForestCore(_tiny_spec(num_features=1 << 27))
    # outputs: 65,536 classes from a model file
    doc = json.loads(
        xgb.train({"nthread": 1}, xgb.DMatrix(np.eye(3), [0, 1, 0]), 1).save_raw("json")
    )
    doc["learner"]["learner_model_param"]["num_class"] = str((1 << 16) + 1)
    with pytest.raises(fastml.FormatError, match=r"num_class|classes"):
        Forest.from_xgboost(json.dumps(doc).encode())
    # tree depth <= 4096
    g = _core.ForestCore(_chain_spec(4096))
    assert g.num_trees == 1
    with pytest.raises(ValueError, match="deeper than 4096"):
        _core.ForestCore(_chain_spec(4097))
    # LightGBM leaves per tree <= 2^24
    lb = lgb.train(
        {"verbose": -1, "num_leaves": 4, "num_threads": 1},
        lgb.Dataset(np.random.default_rng(0).normal(size=(200, 2)), np.arange(200.0)),
        1,
    )
    text = lb.model_to_string()
    p = tmp_path / "m.txt"
    p.write_text(text.replace("num_leaves=4\n", f"num_leaves={(1 << 24) + 1}\n", 1))
    with pytest.raises(fastml.FormatError, match="num_leaves"):
        Forest.from_lightgbm(str(p))
    # category values < 2^31
    from fastml.infer._forest_common import _SpecBuilder

    sb = _SpecBuilder(2, 1)
    sb.add_cat_set([(1 << 29) - 1])  # a 64 MiB set: within the 128 MiB of bitsets
    with pytest.raises(ValueError, match="category values"):
        sb.add_cat_set([1 << 31])
    with pytest.raises(ValueError, match="128 MiB"):
        sb.add_cat_set([(1 << 30) - 1])  # 128 MiB more
