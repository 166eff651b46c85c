"""Fuzzing fastml.infer.Forest's parsers and loader: corrupt inputs raise one
clean error, fastml.FormatError (a ValueError) naming the source, never crash,
hang or leave a half-built Forest."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from _hyp import examples
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fastml
from fastml import _core
from fastml.infer import Forest, _ubjson

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")

FormatError = fastml.FormatError
_X = np.random.default_rng(0).normal(size=(64, 4))


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    X[:, 3] = rng.integers(0, 6, 300)
    y = (X[:, 0] + np.isin(X[:, 3], [1, 4]) > 0.5).astype(float)
    b = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1}, xgb.DMatrix(X, y), 3
    )
    lb = lgb.train(
        {
            "objective": "binary",
            "num_leaves": 6,
            "verbose": -1,
            "num_threads": 1,
            "min_data_per_group": 5,
        },
        lgb.Dataset(X, y, categorical_feature=[3]),
        3,
    )
    f = Forest.from_xgboost(b)
    return {
        "json": bytes(b.save_raw("json")),
        "ubj": bytes(b.save_raw("ubj")),
        "lgb": lb.model_to_string(),
        "forest": f._core.to_bytes(),
    }


def _predict_ok(f: Forest) -> None:
    # A forest that loaded must predict without crashing (values may be anything).
    if f.num_features == 4:
        f.predict(_X, output="margin")


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    if cut is not None:
        b = b[: cut % (len(b) + 1)]
    return bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), max_size=8)
CUT = st.none() | st.integers(0, 1 << 30)
FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_fuzz_forest_load_bytes(models, edits, cut):
    data = _mutate(models["forest"], edits, cut)
    try:
        f = Forest.from_bytes(data)
    except FormatError:
        return
    _predict_ok(f)


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_fuzz_forest_payload_past_the_checksum(models, edits, cut):
    """Mutate the payload and fix the checksum, so the validator itself is exercised."""
    raw = bytearray(_mutate(models["forest"][32:], edits, cut))
    h = 1469598103934665603
    for byte in raw:
        h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    header = bytearray(models["forest"][:32])
    header[16:24] = len(raw).to_bytes(8, "little")
    header[24:32] = h.to_bytes(8, "little")
    try:
        f = Forest.from_bytes(bytes(header + raw))
    except FormatError:
        return
    repr(f)
    _predict_ok(f)


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes_everywhere(data):
    with pytest.raises(FormatError):
        Forest.from_bytes(data)
    try:
        _ubjson.loads(data)
    except ValueError:
        pass
    try:
        Forest.from_xgboost(data)
    except FormatError:
        pass


@FUZZ
@given(edits=EDITS, cut=CUT, which=st.sampled_from(["json", "ubj"]))
def test_fuzz_xgboost_model_bytes(models, edits, cut, which):
    data = _mutate(models[which], edits, cut)
    try:
        f = Forest.from_xgboost(data)
    except FormatError:
        return
    _predict_ok(f)


def _json_mutations():
    scalars = st.one_of(
        st.integers(-5, 5),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.none(),
        st.just([]),
    )
    return st.lists(st.tuples(st.integers(0, 10_000), scalars), min_size=1, max_size=6)


@FUZZ
@given(muts=_json_mutations())
def test_fuzz_xgboost_json_structure(models, muts):
    """Replace values inside the parsed model (indices, sizes, categories) with junk."""
    doc = json.loads(models["json"])
    tree = doc["learner"]["gradient_booster"]["model"]["trees"][0]
    keys = sorted(k for k, v in tree.items() if isinstance(v, list) and v)
    for pos, val in muts:
        arr = tree[keys[pos % len(keys)]]
        arr[pos % len(arr)] = val
    try:
        f = Forest.from_xgboost(json.dumps(doc).encode())
    except FormatError:
        return
    _predict_ok(f)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 1 << 30), st.sampled_from(list(b"0123456789-= \n.x"))), max_size=8
    ),
    cut=CUT,
)
def test_fuzz_lightgbm_text(models, tmp_path_factory, edits, cut):
    text = _mutate(models["lgb"].encode(), edits, cut)
    p = tmp_path_factory.mktemp("lgb") / "m.txt"
    p.write_bytes(text)
    try:
        f = Forest.from_lightgbm(str(p))
    except FormatError:
        return
    _predict_ok(f)


@FUZZ
@given(
    n=st.integers(1, 9),
    left=st.lists(st.integers(-3, 10), min_size=9, max_size=9),
    right=st.lists(st.integers(-3, 10), min_size=9, max_size=9),
    feature=st.lists(st.integers(-2, 6), min_size=9, max_size=9),
    flags=st.lists(
        st.sampled_from([0, 1 << 31, 1 << 30, 1 << 29, (1 << 30) | (1 << 28)]),
        min_size=9,
        max_size=9,
    ),
    cat=st.lists(st.integers(-2, 2), min_size=9, max_size=9),
)
def test_fuzz_native_builder(n, left, right, feature, flags, cat):
    spec = {
        "num_features": 4,
        "num_outputs": 1,
        "threshold_f64": False,
        "accum_f64": False,
        "link": 1,
        "divisor": 1.0,
        "divide_margin": True,
        "cat_lo": 0.0,
        "cat_hi": 2.0**31,
        "cat_integral": False,
        "objective": "fuzz",
        "metadata": "{}",
        "tree_node_offsets": np.array([0, n], np.int64),
        "tree_group": np.array([0], np.int32),
        "node_feature": np.array(feature[:n], np.int32),
        "node_threshold": np.linspace(-1, 1, n),
        "node_left": np.array(left[:n], np.int32),
        "node_right": np.array(right[:n], np.int32),
        "node_flags": np.array(flags[:n], np.uint32),
        "node_cat": np.array(cat[:n], np.int32),
        "cat_offsets": np.array([0, 1], np.int64),
        "cat_bits": np.array([0b1010], np.uint32),
        "leaf_values": np.arange(n, dtype=np.float64),
        "base_margin": np.zeros(1),
    }
    try:
        core = _core.ForestCore(spec)
    except ValueError:
        return
    res = core.predict(np.array([[0.5, np.nan, 3.0, -1.0], [1.0, 2.0, np.inf, 5.0]]), False)
    assert res.shape == (2,)
    assert np.all(np.isin(res, np.arange(n)))  # every walk ends on a leaf of this tree


# ---------------------------------------------------------------- differential: fastml vs XGBoost


_XD = np.random.default_rng(1).normal(size=(200, 4)).astype(np.float32)
_XD[np.random.default_rng(2).random(_XD.shape) < 0.15] = np.nan
# Fields XGBoost itself survives editing (edited child indices or out-of-range
# features can crash XGBoost's own loader or predictor, so they are fuzzed
# against fastml alone, in the tests above).
_FIELDS = {
    "default_left": st.sampled_from([0, 1, 2, 255, -1]),
    "split_type": st.sampled_from([0, 1, 2]),
    "split_indices": st.integers(0, 3),
    "split_conditions": st.sampled_from([0.0, -1e308, 1e308, 1e-45, 0.5, -0.5, float("inf")]),
}


@pytest.fixture(scope="module")
def xgb_numeric_json():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 4)).astype(np.float32)
    X[rng.random(X.shape) < 0.15] = np.nan
    y = (np.nan_to_num(X[:, 0]) + np.nan_to_num(X[:, 1]) > 0).astype(float)
    b = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1}, xgb.DMatrix(X, y), 4
    )
    return json.loads(b.save_raw("json"))


def _xgb_margins(doc) -> np.ndarray | None:
    b = xgb.Booster()
    try:
        b.load_model(bytearray(json.dumps(doc).encode()))
        return b.predict(xgb.DMatrix(_XD), output_margin=True)
    except xgb.core.XGBoostError:
        return None


@settings(
    max_examples=examples(40),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, 3), st.sampled_from(sorted(_FIELDS)), st.integers(0, 14), st.data()
        ),
        min_size=1,
        max_size=3,
    )
)
@example(edits=[(0, "default_left", 0, 255)])
@example(edits=[(0, "split_type", 0, 2)])
def test_fastml_agrees_with_xgboost_or_refuses(xgb_numeric_json, edits):
    """Edited fields of a real model: where XGBoost accepts the file, fastml
    predicts XGBoost's margins bit for bit, or refuses it naming the problem
    (issue #20: default_left=255 was read differently)."""
    doc = json.loads(json.dumps(xgb_numeric_json))
    trees = doc["learner"]["gradient_booster"]["model"]["trees"]
    for tree, field, pos, value in edits:
        arr = trees[tree % len(trees)][field]
        v = value.draw(_FIELDS[field]) if hasattr(value, "draw") else value
        arr[pos % len(arr)] = v
    want = _xgb_margins(doc)
    try:
        got = Forest.from_xgboost(json.dumps(doc).encode()).predict(_XD, output="margin")
    except FormatError:
        return
    if want is not None:
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def lgb_numeric_text():
    """LightGBM models over numeric features with NaN, with NaN-as-missing and
    with zero-as-missing (the missing types fastml reads)."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(500, 4))
    X[rng.random(X.shape) < 0.15] = np.nan
    X[rng.random(X.shape) < 0.1] = 0.0
    y = (np.nan_to_num(X[:, 0]) + np.nan_to_num(X[:, 1]) > 0).astype(float)

    class Texts(dict):  # a short repr in hypothesis's failure reports
        def __repr__(self) -> str:
            return "<two LightGBM model texts>"

    out = Texts()
    for zero in (False, True):
        b = lgb.train(
            {
                "objective": "binary",
                "num_leaves": 7,
                "verbose": -1,
                "num_threads": 1,
                "zero_as_missing": zero,
                "min_data_in_leaf": 5,
            },
            lgb.Dataset(X, y),
            4,
        )
        out[zero] = b.model_to_string()
    return out


_LGB_FIELDS = {
    # LightGBM reads decision_type as int8: bit 0 categorical (not drawn: a
    # categorical bit on a numeric node makes LightGBM index its category
    # tables out of bounds), bit 1 default left, bits 2-3 the missing type
    # (3 is not a type LightGBM names: it reads it as "none").
    "decision_type": st.sampled_from([0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 30, 130, 254]),
    "threshold": st.sampled_from([0.0, -0.0, 1e-36, -1e-36, 1e-300, 5e-324, 1e308, -1e308, 0.5])
    | st.floats(-3, 3),
    "leaf_value": st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324]) | st.floats(-5, 5),
    "split_feature": st.integers(0, 3),
}


def _lgb_set(text: str, tree: int, field: str, pos: int, value: float | int) -> str:
    blocks = text.split("\nTree=")
    t = 1 + tree % (len(blocks) - 1)
    lines = blocks[t].split("\n")
    for i, line in enumerate(lines):
        if line.startswith(field + "="):
            vals = line[len(field) + 1 :].split(" ")
            vals[pos % len(vals)] = repr(value) if isinstance(value, float) else str(value)
            lines[i] = field + "=" + " ".join(vals)
    blocks[t] = "\n".join(lines)
    # The header's tree_sizes are byte counts LightGBM seeks by (an edit that
    # changes a tree's length would make it read across trees): drop them, and
    # LightGBM parses the trees in order.
    head = "\n".join(ln for ln in blocks[0].split("\n") if not ln.startswith("tree_sizes="))
    return "\nTree=".join([head, *blocks[1:]])


@settings(
    max_examples=examples(40),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    zero=st.booleans(),
    edits=st.lists(
        st.tuples(
            st.integers(0, 3), st.sampled_from(sorted(_LGB_FIELDS)), st.integers(0, 13), st.data()
        ),
        min_size=1,
        max_size=3,
    ),
)
@example(zero=False, edits=[(0, "decision_type", 0, 12)])
@example(zero=True, edits=[(1, "decision_type", 1, 12)])
def test_fastml_agrees_with_lightgbm_or_refuses(lgb_numeric_text, tmp_path_factory, zero, edits):
    """Edited fields of a real LightGBM model: where LightGBM accepts the text,
    fastml predicts its raw scores (to 1e-12) or refuses naming the problem
    (issue #20: decision_type=12 was read differently)."""
    text = lgb_numeric_text[zero]
    for tree, field, pos, value in edits:
        v = value.draw(_LGB_FIELDS[field]) if hasattr(value, "draw") else value
        text = _lgb_set(text, tree, field, pos, v)
    try:
        want = lgb.Booster(model_str=text).predict(_XD.astype(np.float64), raw_score=True)
    except lgb.basic.LightGBMError:
        want = None
    try:
        path = tmp_path_factory.mktemp("lgb") / "model.txt"
        path.write_text(text)
        got = Forest.from_lightgbm(str(path)).predict(_XD.astype(np.float64), output="margin")
    except FormatError:
        return
    if want is not None:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def sk_models():
    """scikit-learn estimators whose fitted tree arrays the test edits in place:
    a regression tree and a forest trained with NaN (missing_go_to_left), a
    gradient-boosting classifier."""
    from sklearn import ensemble, tree

    rng = np.random.default_rng(6)
    X = rng.normal(size=(300, 4))
    X[rng.random(X.shape) < 0.1] = np.nan
    y = np.nan_to_num(X[:, 0]) + np.nan_to_num(X[:, 1]) ** 2
    Xf = np.nan_to_num(X)
    return {
        "tree": (tree.DecisionTreeRegressor(max_depth=4, random_state=0).fit(X, y), X),
        "forest": (
            ensemble.RandomForestRegressor(n_estimators=3, max_depth=3, random_state=0).fit(X, y),
            X,
        ),
        "boosting": (
            ensemble.GradientBoostingClassifier(n_estimators=3, max_depth=2, random_state=0).fit(
                Xf, y > 1
            ),
            Xf,
        ),
    }


_SK_FIELDS = {
    "threshold": st.sampled_from([0.0, -0.0, 1e308, -1e308, np.inf, -np.inf, 5e-324, 1e-36])
    | st.floats(-3, 3),
    "value": st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324]) | st.floats(-5, 5),
    "feature": st.integers(0, 3),
    "missing_go_to_left": st.sampled_from([0, 1, 2, 255]),
}


@settings(
    max_examples=examples(40),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    which=st.sampled_from(["tree", "forest", "boosting"]),
    edits=st.lists(
        st.tuples(
            st.integers(0, 2), st.sampled_from(sorted(_SK_FIELDS)), st.integers(0, 30), st.data()
        ),
        min_size=1,
        max_size=3,
    ),
)
@example(which="tree", edits=[(0, "missing_go_to_left", 0, 2)])
def test_fastml_agrees_with_sklearn_or_refuses(sk_models, which, edits):
    """Edited fields of fitted scikit-learn trees (thresholds including ±inf and
    ±1e308, leaf values, split features, missing-value directions): fastml
    predicts what scikit-learn predicts on the edited estimator, or refuses
    (child indices are not edited: scikit-learn would read out of bounds)."""
    import copy

    est, X = sk_models[which]
    est = copy.deepcopy(est)
    trees = [est] if hasattr(est, "tree_") else list(np.ravel(est.estimators_))
    for t, field, pos, value in edits:
        tr = trees[t % len(trees)].tree_
        arr = getattr(tr, field)
        internal = np.flatnonzero(tr.children_left >= 0)
        leaves = np.flatnonzero(tr.children_left < 0)
        where = leaves if field == "value" else internal
        if where.size == 0:
            continue
        v = value.draw(_SK_FIELDS[field]) if hasattr(value, "draw") else value
        arr[where[pos % where.size]] = v
    margin = which == "boosting"
    with warnings.catch_warnings():  # scikit-learn's own sums may overflow to inf
        warnings.simplefilter("ignore", RuntimeWarning)
        want = est.decision_function(X) if margin else est.predict(X)
    try:
        f = Forest.from_sklearn(est)
    except FormatError:
        return
    got = f.predict(X, output="margin" if margin else "value")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
