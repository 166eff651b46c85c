"""The batch layout of device="cuda" staging, tested without a GPU.

With ``device="cuda"`` every batch is gathered into one page-locked buffer
that holds all of its columns, copied to the device in one transfer, and
handed out as views of one device buffer (``_SpanViews``). Here the plan is put
into the same one-buffer layout on the heap (``use_one_buffer``, what the
stager does with pinned memory), and the span a batch occupies is copied into a
CPU ``uint8`` tensor, standing in for the device buffer: the views built from
it must equal the batch the CPU loader hands out, for any mix of dtypes and
row shapes, full and partial batches, in-memory and Parquet sources.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastml import _core, data
from fastml.data._loader import _SpanViews

torch = pytest.importorskip("torch")

DTYPES = ["bool", "uint8", "int16", "float16", "int32", "float32", "int64", "float64"]


def _span_bytes(arrays: list[np.ndarray]) -> tuple[torch.Tensor, int, list[int]]:
    """The bytes of the span holding ``arrays``, as a uint8 tensor (the device
    buffer's stand-in), with the arrays' own byte count and their offsets."""
    start, nbytes, payload, offsets = _core.data_batch_span(arrays)
    raw = (ctypes.c_uint8 * nbytes).from_address(start)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8), payload, offsets


def _one_buffer_loader(ds: data.Dataset, **kw) -> data.Loader:
    ld = data.Loader(ds, **kw)
    ld._plan.use_one_buffer()
    return ld


def _check_views(batch: dict[str, np.ndarray], full: bool = False) -> None:
    arrays = list(batch.values())
    buf, payload, offsets = _span_bytes(arrays)
    assert payload == sum(a.nbytes for a in arrays)
    if full:  # one buffer: padding only up to each column's 64-byte start
        assert len(buf) < payload + 64 * len(arrays)
    views = _SpanViews(torch, batch, offsets)(buf)
    assert list(views) == list(batch)
    for k, v in batch.items():
        t = views[k]
        assert t.dtype == getattr(torch, v.dtype.name), k
        assert tuple(t.shape) == v.shape, k
        assert t.numpy().tobytes() == v.tobytes(), k


@given(
    cols=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.sampled_from([(), (1,), (3,), (2, 5)])),
        min_size=1,
        max_size=7,
    ),
    n=st.integers(1, 300),
    batch_size=st.integers(1, 97),
    seed=st.integers(0, 2**16),
)
def test_one_buffer_batches_and_their_views_match_the_cpu_loader(cols, n, batch_size, seed):
    rng = np.random.default_rng(seed)
    arrays = {
        f"c{j}": (rng.random((n, *shape)) * 100).astype(dt) for j, (dt, shape) in enumerate(cols)
    }
    ds = data.Dataset.from_numpy(arrays)
    ref = list(data.Loader(ds, batch_size=batch_size, seed=seed))
    ld = _one_buffer_loader(ds, batch_size=batch_size, seed=seed)
    got = list(ld)
    assert len(got) == len(ref)
    for b, r in zip(got, ref, strict=True):
        for k in r:
            assert b[k].dtype == r[k].dtype and b[k].shape == r[k].shape
            assert b[k].tobytes() == r[k].tobytes()
        _check_views(b, full=len(b["c0"]) == batch_size)
    ld.close()


def test_one_buffer_layout_is_compact_and_grouped_by_dtype():
    n, bs = 1000, 128
    ds = data.Dataset.from_numpy(
        {
            "a": np.zeros(n, np.float32),
            "y": np.arange(n, dtype=np.int64),
            "b": np.ones((n, 3), np.float32),
            "m": np.zeros(n, np.bool_),
            "c": np.full(n, 2, np.float32),
        }
    )
    ld = _one_buffer_loader(ds, batch_size=bs, shuffle=False)
    batches = list(ld)
    for b in batches:
        _start, nbytes, payload, offsets = _core.data_batch_span(list(b.values()))
        off = dict(zip(b, offsets, strict=True))
        # widest dtype first, then one group per dtype in column order, 64-byte starts
        assert off["y"] == 0
        assert off["y"] < off["a"] < off["b"] < off["c"] < off["m"]
        assert all(o % 64 == 0 for o in offsets)
        rows = len(b["y"])
        if rows == bs:  # a full batch: padding only to the 64-byte column starts
            assert payload <= nbytes < payload + 64 * len(b)
    # The last batch (1000 = 7 * 128 + 104 rows) sits in a full batch's buffer.
    assert len(batches[-1]["y"]) == 104
    _check_views(batches[-1])
    ld.close()


def test_one_buffer_batches_kept_alive_never_change():
    """A batch the consumer keeps is never overwritten by later batches: all of
    its columns share one pooled buffer, recycled only once every one of them
    (and every view of one) is gone."""
    n = 4096
    ds = data.Dataset.from_numpy(
        {"i": np.arange(n, dtype=np.int64), "x": np.arange(n, dtype=np.float32) * 0.5}
    )
    ld = _one_buffer_loader(ds, batch_size=64, seed=1, prefetch=2)
    kept, copies = [], []
    for epoch in range(2):
        for j, b in enumerate(ld):
            if j % 7 == 0:
                kept.append(b["x"])  # one column only: the buffer stays referenced
                copies.append(b["x"].copy())
        assert epoch == 0 or len(kept) > 0
    for k, c in zip(kept, copies, strict=True):
        assert np.array_equal(k, c)
    s = ld.stats()
    assert s["buffers_reused"] > 0
    ld.close()


def test_one_buffer_parquet_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    n = 3001
    pq.write_table(
        pa.table(
            {
                "i": np.arange(n),
                "v": np.arange(n, dtype=np.float64),
                "f": np.arange(n, dtype=np.float32),
            }
        ),
        tmp_path / "d.parquet",
        row_group_size=500,
    )
    ds = data.Dataset.from_parquet(tmp_path / "d.parquet")
    kw = dict(batch_size=256, seed=5, transforms={"v": [data.Cast("float16")]})
    ref = list(data.Loader(ds, **kw))
    ld = _one_buffer_loader(ds, **kw)
    got = list(ld)
    assert len(got) == len(ref)
    for b, r in zip(got, ref, strict=True):
        for k in r:
            assert b[k].tobytes() == r[k].tobytes()
        _check_views(b)
    ld.close()


def test_span_views_reject_overlapping_columns():
    a = np.arange(8, dtype=np.float32)
    with pytest.raises(ValueError, match="overlap"):
        _SpanViews(torch, {"a": a, "b": a}, [0, 16])
