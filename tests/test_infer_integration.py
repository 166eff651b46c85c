"""Forest as a native handler of Batcher: the batch runs in C++ without the GIL."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from fastml import infer

xgb = pytest.importorskip("xgboost")


@pytest.fixture(scope="module")
def forest_and_booster():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 6)).astype(np.float32)
    X[rng.random(X.shape) < 0.05] = np.nan
    y = (np.nan_to_num(X[:, 0]) + 0.5 * np.nan_to_num(X[:, 1]) > 0).astype(np.float32)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 4, "nthread": 1}, xgb.DMatrix(X, label=y), 20
    )
    return infer.Forest.from_xgboost(booster), booster, X


def test_batcher_uses_forest_natively(forest_and_booster):
    forest, booster, X = forest_and_booster
    with infer.Batcher(forest, max_batch_size=64, max_delay_us=200) as b:
        assert b.native
        futs = [b.submit(X[i : i + 1]) for i in range(300)]
        got = np.concatenate([np.asarray(f.result(timeout=30)).reshape(-1) for f in futs])
        stats = b.stats()
    expected = np.asarray(forest.predict(X[:300])).reshape(-1)
    np.testing.assert_array_equal(got, expected)
    ref = booster.inplace_predict(X[:300])
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert stats["batches"] < 300  # requests were grouped


def test_batcher_forest_from_many_threads(forest_and_booster):
    forest, _, X = forest_and_booster
    expected = np.asarray(forest.predict(X)).reshape(-1)
    with infer.Batcher(forest, max_batch_size=128, max_delay_us=100) as b:

        def client(lo: int, hi: int) -> np.ndarray:
            return np.concatenate(
                [np.asarray(b.predict(X[i : i + 1])).reshape(-1) for i in range(lo, hi)]
            )

        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            parts = list(ex.map(lambda k: client(k * 100, (k + 1) * 100), range(8)))
    np.testing.assert_array_equal(np.concatenate(parts), expected[:800])


def test_batcher_forest_rejects_wrong_width(forest_and_booster):
    forest, _, _ = forest_and_booster
    with (
        infer.Batcher(forest) as b,
        pytest.raises(ValueError, match=r"x must be \(6,\) or \(rows, 6\)"),
    ):
        b.submit(np.zeros((1, 5), dtype=np.float32))
