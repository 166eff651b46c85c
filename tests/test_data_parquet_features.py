"""Several Parquet columns loaded as one 2-D feature column (issue #19, point 6).

``Dataset.from_parquet(path, features={"x": ["f0", ..., "f19"]})`` gives a
column ``"x"`` of rows of 20 values; the gather writes each batch's rows from
the 20 decoded columns directly. Batches must equal the same loader's batches
with the columns loaded one by one and stacked, on every decode path (rows
stored in shuffled order, group orders applied logically, pyarrow), with
transforms applied per element.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _parquet_paths import DECODE_PATHS, force_decode_path
from hypothesis import given
from hypothesis import strategies as st

from fastml import data

DTYPES = ["int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64"]


def _file(path, n: int, k: int, dtype: str, group_rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    cols = {f"f{j}": (rng.random(n) * 100).astype(dtype) for j in range(k)}
    if dtype.startswith("float"):
        cols["f0"][rng.random(n) < 0.1] = np.nan
    cols["id"] = np.arange(n, dtype=np.int64)
    pq.write_table(pa.table(cols), path, row_group_size=group_rows)


@given(
    n=st.integers(1, 3000),
    k=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    group_rows=st.integers(50, 1500),
    buffer=st.integers(1, 4000),
    batch=st.integers(1, 400),
    shuffle=st.booleans(),
    transform=st.sampled_from(["none", "standardize", "cast", "fill"]),
    mode=st.sampled_from(DECODE_PATHS),
)
def test_feature_columns_equal_the_stacked_columns(
    tmp_path_factory, n, k, dtype, group_rows, buffer, batch, shuffle, transform, mode
):
    path = tmp_path_factory.mktemp("f") / "d.parquet"
    _file(path, n, k, dtype, group_rows)
    srcs = [f"f{j}" for j in range(k)]
    kw = dict(batch_size=batch, shuffle=shuffle, shuffle_buffer=buffer, seed=7)
    tf_x, tf_cols = [], {}
    if transform == "standardize":
        mean, std = np.arange(k) * 3.0, np.arange(1, k + 1) * 0.5
        tf_x = [data.Standardize(mean, std)]
        tf_cols = {c: [data.Standardize(mean[j], std[j])] for j, c in enumerate(srcs)}
    elif transform == "cast":
        tf_x = [data.Cast("float32")]
        tf_cols = {c: [data.Cast("float32")] for c in srcs}
    elif transform == "fill":
        tf_x = [data.FillNa(-1.0)]
        tf_cols = {c: [data.FillNa(-1.0)] for c in srcs}
    with pytest.MonkeyPatch.context() as mp:
        force_decode_path(mp, mode)
        ds = data.Dataset.from_parquet(path, features={"x": srcs})
        assert ds.columns == ["id", "x"]
        assert ds.schema["x"].shape == (k,)
        got = list(data.Loader(ds, transforms={"x": tf_x} if tf_x else None, **kw))
    ref = list(data.Loader(data.Dataset.from_parquet(path), transforms=tf_cols or None, **kw))
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g["id"], r["id"])
        want = np.stack([r[c] for c in srcs], axis=1)
        assert g["x"].shape == want.shape and g["x"].dtype == want.dtype
        assert g["x"].tobytes() == want.tobytes()


def test_features_with_columns_and_state(tmp_path):
    path = tmp_path / "d.parquet"
    _file(path, 900, 4, "float32", 200)
    ds = data.Dataset.from_parquet(path, columns=["id", "f3"], features={"a": ["f0", "f1"]})
    assert ds.columns == ["id", "f3", "a"]
    ld = data.Loader(ds, batch_size=100, seed=1)
    it = iter(ld)
    first = [next(it)["a"].copy() for _ in range(3)]
    state = ld.state_dict()
    assert state["columns"]["a"] == "<f4[2]"
    again = data.Loader(ds, batch_size=100, seed=1)
    again.load_state_dict(state)
    rest = [b["a"] for b in again]
    full = [b["a"] for b in data.Loader(ds, batch_size=100, seed=1)]
    for a, b in zip(first + rest, full, strict=True):
        np.testing.assert_array_equal(a, b)


def test_feature_errors(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.table(
        {
            "a": np.zeros(4, np.float32),
            "b": np.zeros(4, np.float32),
            "c": np.zeros(4, np.float64),
            "v": pa.array([[1.0, 2.0]] * 4, type=pa.list_(pa.float32(), 2)),
        }
    )
    pq.write_table(table, path)
    from_pq = data.Dataset.from_parquet
    with pytest.raises(KeyError, match="column 'z' is not in"):
        from_pq(path, features={"x": ["a", "z"]})
    with pytest.raises(ValueError, match="one dtype"):
        from_pq(path, features={"x": ["a", "c"]})
    with pytest.raises(ValueError, match="scalar columns"):
        from_pq(path, features={"x": ["a", "v"]})
    with pytest.raises(ValueError, match="used by features"):
        from_pq(path, features={"x": ["a"], "y": ["a", "b"]})
    with pytest.raises(ValueError, match="twice"):
        from_pq(path, features={"x": ["a", "a"]})
    with pytest.raises(ValueError, match="named like a column"):
        from_pq(path, features={"b": ["a"]})
    with pytest.raises(ValueError, match="listed in columns and used by features"):
        from_pq(path, columns=["a", "c"], features={"x": ["a", "b"]})
    with pytest.raises(ValueError, match="at least one column"):
        from_pq(path, features={"x": []})
    with pytest.raises(TypeError, match="list of column names"):
        from_pq(path, features={"x": "ab"})
    with pytest.raises(TypeError, match="dict of column lists"):
        from_pq(path, features=["a", "b"])
    # Files of a data set must agree on every column a feature uses.
    other = tmp_path / "e.parquet"
    pq.write_table(table.set_column(1, "b", pa.array(np.zeros(4, np.float64))), other)
    with pytest.raises(ValueError, match="column 'b'"):
        from_pq([path, other], features={"x": ["a", "b"]})
