"""Device-resident data sets (Dataset.to): batches equal the host loader's bit for bit.

Run here with torch CPU tensors (the same code path as CUDA, on the host);
tests/test_data_gpu.py runs it on a GPU.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fastml import data

torch = pytest.importorskip("torch")

_SOURCES = ["float32", "float64", "float16", "int16", "int64", "uint8", "bool"]
_CASTS = [None, "float32", "float16", "float64", "int8", "int32", "int64", "uint8", "bool"]


def _column(rng, dtype: str, n: int, shape: tuple) -> np.ndarray:
    size = (n, *shape)
    if dtype == "bool":
        return rng.random(size) < 0.5
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size, endpoint=True, dtype=dtype)
    with np.errstate(over="ignore"):  # float16 overflows to inf on purpose
        x = (rng.standard_normal(size) * rng.choice([1.0, 1e3, 1e6], size)).astype(dtype)
    x[rng.random(size) < 0.05] = np.nan
    x[rng.random(size) < 0.01] = np.inf
    x[rng.random(size) < 0.01] = -np.inf
    return x


@st.composite
def _case(draw):
    n = draw(st.integers(1, 300))
    ncols = draw(st.integers(1, 3))
    cols = []
    for _ in range(ncols):
        dtype = draw(st.sampled_from(_SOURCES))
        shape = draw(st.sampled_from([(), (3,), (2, 2)]))
        ts = []
        if draw(st.booleans()):
            ts.append(data.FillNa(draw(st.sampled_from([0.0, -1.5, 1e30]))))
        if draw(st.booleans()):
            k = int(np.prod(shape)) if shape else 1
            per = draw(st.booleans()) and k > 1
            mean = np.linspace(-2, 2, k) if per else 0.25
            std = np.linspace(0.5, 3, k) if per else 1.7
            ts.append(data.Standardize(mean, std))
        if draw(st.booleans()):
            ts.append(data.Clip(-1e4, 3e5))
        cast = draw(st.sampled_from(_CASTS))
        if cast is not None:
            ts.append(data.Cast(cast))
        cols.append((dtype, shape, ts))
    return (
        n,
        cols,
        draw(st.integers(1, 70)),  # batch size
        draw(st.booleans()),  # shuffle
        draw(st.integers(0, 2**32)),  # seed
        draw(st.booleans()),  # drop_last
        draw(st.integers(1, 3)),  # world size
        draw(st.integers(0, 2**16)),  # data seed
    )


def _host_and_device(case):
    n, cols, bs, shuffle, seed, drop_last, world, dseed = case
    rng = np.random.default_rng(dseed)
    arrays = {f"c{k}": _column(rng, d, n, s) for k, (d, s, _) in enumerate(cols)}
    transforms = {f"c{k}": ts for k, (_, _, ts) in enumerate(cols) if ts}
    ds = data.Dataset.from_numpy(arrays)
    kw = dict(batch_size=bs, shuffle=shuffle, seed=seed, drop_last=drop_last, transforms=transforms)
    return ds, ds.to("cpu"), kw, world


@given(_case())
@example((50, [("float64", (), [data.Cast("float16")])], 7, True, 1, False, 1, 0))
@example(
    (
        33,
        [("float32", (3,), [data.Standardize(0.1, 1e-3), data.Cast("int8")])],
        8,
        False,
        0,
        True,
        2,
        3,
    )
)
@example(
    (40, [("int64", (), [data.Cast("float32")]), ("bool", (2, 2), [])], 9, True, 5, False, 3, 4)
)
def test_device_batches_equal_host_batches(case):
    ds, dd, kw, world = _host_and_device(case)
    for rank in range(world):
        host = [b for b in data.Loader(ds, rank=rank, world_size=world, **kw)]
        dev = data.Loader(dd, rank=rank, world_size=world, **kw)
        got = [b for b in dev]
        assert len(host) == len(got) == len(dev)
        for h, g in zip(host, got, strict=True):
            assert list(h) == list(g)
            for k in h:
                t = g[k]
                assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
                a = t.numpy()
                assert a.dtype == h[k].dtype and a.shape == h[k].shape, k
                # Bit for bit (NaN payloads included).
                assert a.tobytes() == h[k].tobytes(), k


def test_device_resume_elastic_and_epochs():
    n = 1003
    ds = data.Dataset.from_numpy({"i": np.arange(n, dtype=np.int64)})
    dd = ds.to("cpu")
    kw = dict(batch_size=16, seed=7)
    # Resume mid-epoch, on the next epoch too: as the host loader.
    for src in (ds, dd):
        a = data.Loader(src, **kw)
        it = iter(a)
        first = [np.asarray(next(it)["i"]) for _ in range(5)]
        state = a.state_dict()
        b = data.Loader(src, **kw)
        b.load_state_dict(state)
        rest = [np.asarray(x["i"]) for x in b]
        nxt = [np.asarray(x["i"]) for x in b]  # epoch 1
        if src is ds:
            want = (first, rest, nxt)
        else:
            for u, v in zip(want, (first, rest, nxt), strict=True):
                assert all(np.array_equal(p, q) for p, q in zip(u, v, strict=True))
    # Elastic: two device ranks read some, three device ranks read the rest.
    olds = [data.Loader(dd, rank=r, world_size=2, **kw) for r in range(2)]
    seen = []
    for ld in olds:
        it = iter(ld)
        seen += [int(v) for _ in range(4) for v in next(it)["i"]]
    states = [ld.state_dict() for ld in olds]
    news = [data.Loader(dd, rank=r, world_size=3, **kw) for r in range(3)]
    for ld in news:
        ld.load_state_dict(states)
    assert len({len(ld) for ld in news}) == 1
    for ld in news:
        seen += [int(v) for b in ld for v in b["i"]]
    assert sorted(set(seen)) == list(range(n)) and len(seen) - n < 3


def test_device_dataset_errors(tmp_path):
    ds = data.Dataset.from_numpy({"u": np.arange(10, dtype=np.uint32)})
    with pytest.raises(TypeError, match="column 'u' has dtype uint32"):
        ds.to("cpu")
    ok = data.Dataset.from_numpy({"x": np.arange(10, dtype=np.float32)}).to("cpu")
    assert ok.device == "cpu" and "on cpu" in repr(ok) and not ok.is_streamed
    with pytest.raises(TypeError, match="Cast of column 'x' has dtype uint16"):
        data.Loader(ok, transforms={"x": [data.Cast("uint16")]})
    pq.write_table(pa.table({"x": np.arange(10, dtype=np.float32)}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="random-access"):
        data.Dataset.from_parquet(tmp_path / "d.parquet").to("cpu")
    # A device-resident data set moves again (device to device).
    again = ok.to("cpu")
    assert torch.equal(again._tensors["x"], ok._tensors["x"])


def test_float16_cast_has_no_double_rounding():
    """float64 values just past a float16 halfway point: rounding through
    float32 would land on the halfway point and round to even; the device path
    rounds to odd in float32 first, as the host gather does, and agrees with
    NumPy's direct astype(float16). Integer saturation and NaN -> 0 too."""
    mid = 1.0 + 2.0**-11
    x = np.array(
        [mid + 2.0**-40, mid - 2.0**-40, -(mid + 2.0**-40), 65519.99, 65520.0, 1e300, np.nan],
        dtype=np.float64,
    )
    ds = data.Dataset.from_numpy({"x": x})
    with np.errstate(over="ignore"):
        half = x.astype(np.float16)
    for cast, want in (("float16", half), ("int8", None), ("uint8", None)):
        tf = {"x": [data.Cast(cast)]}
        host = next(iter(data.Loader(ds, batch_size=7, shuffle=False, transforms=tf)))["x"]
        dev = next(iter(data.Loader(ds.to("cpu"), batch_size=7, shuffle=False, transforms=tf)))
        assert dev["x"].numpy().tobytes() == host.tobytes(), cast
        if want is not None:
            assert host.tobytes() == want.tobytes()
    sat = next(
        iter(
            data.Loader(
                ds.to("cpu"), batch_size=7, shuffle=False, transforms={"x": [data.Cast("int8")]}
            )
        )
    )["x"]
    assert sat.tolist() == [1, 1, -1, 127, 127, 127, 0]
