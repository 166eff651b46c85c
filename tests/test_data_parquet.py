"""fastml.data with Parquet sources: streamed by row group, block-shuffled."""

from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _hyp import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import fastml
from fastml import data


def _write(path, start: int, n: int, row_group_size: int, compression: str = "snappy") -> None:
    i = np.arange(start, start + n, dtype=np.int64)
    table = pa.table(
        {
            "i": i,
            "x": (i * 0.5).astype(np.float32),
            "v": pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(i, 3).astype(np.int16)), 3),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size, compression=compression)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pq")
    _write(d / "a.parquet", 0, 2500, 400)
    _write(d / "b.parquet", 2500, 1301, 350)
    return d


def _check_rows(batch):
    i = batch["i"]
    np.testing.assert_array_equal(batch["x"], (i * 0.5).astype(np.float32))
    np.testing.assert_array_equal(batch["v"], np.repeat(i, 3).astype(np.int16).reshape(-1, 3))


def _order(loader) -> np.ndarray:
    out = []
    for b in loader:
        _check_rows(b)
        out.append(b["i"].copy())
    return np.concatenate(out) if out else np.empty(0, np.int64)


def test_schema_glob_and_sequential_order(files):
    ds = data.Dataset.from_parquet(str(files / "*.parquet"))
    assert len(ds) == 3801 and ds.is_streamed
    assert ds.columns == ["i", "x", "v"]
    assert ds.schema["v"] == data.ColumnInfo(np.dtype(np.int16), (3,))
    loader = data.Loader(ds, batch_size=128, shuffle=False)
    assert np.array_equal(_order(loader), np.arange(3801))
    sub = data.Dataset.from_parquet([files / "b.parquet"], columns=["x"])
    b = next(iter(data.Loader(sub, batch_size=10, shuffle=False)))
    assert list(b) == ["x"] and np.array_equal(
        b["x"], (np.arange(2500, 2510) * 0.5).astype(np.float32)
    )


@settings(max_examples=examples(15))
@given(
    batch_size=st.integers(1, 700),
    buffer=st.integers(1, 5000),
    drop_last=st.booleans(),
    seed=st.integers(0, 100),
)
def test_block_shuffle_is_a_deterministic_permutation(files, batch_size, buffer, drop_last, seed):
    ds = data.Dataset.from_parquet([files / "a.parquet", files / "b.parquet"])
    kw = dict(batch_size=batch_size, seed=seed, shuffle_buffer=buffer, drop_last=drop_last)
    loader = data.Loader(ds, prefetch=2, **kw)
    order = _order(loader)
    n_batches = 3801 // batch_size if drop_last else -(-3801 // batch_size)
    assert loader.stats()["batches"] == n_batches == len(loader)
    if drop_last:
        assert len(order) == n_batches * batch_size and len(np.unique(order)) == len(order)
    else:
        assert np.array_equal(np.sort(order), np.arange(3801))
    again = _order(data.Loader(ds, prefetch=7, num_threads=1, **kw))
    assert np.array_equal(order, again)


def test_block_shuffle_quality(files):
    ds = data.Dataset.from_parquet(files / "a.parquet")  # 7 row groups of 400, one of 100
    e0 = _order(data.Loader(ds, batch_size=2500, seed=1, shuffle_buffer=800))
    e1 = _order(data.Loader(ds, batch_size=2500, seed=2, shuffle_buffer=800))
    assert not np.array_equal(e0, e1)
    # Windows of two row groups: the first 800 rows come from exactly two groups,
    # in random order within them.
    groups = set((e0[:800] // 400).tolist())
    assert len(groups) == 2
    assert not np.array_equal(np.sort(e0[:800]), e0[:800])


def test_resume_does_not_reread_consumed_windows(files):
    ds = data.Dataset.from_parquet(files / "a.parquet")
    kw = dict(batch_size=100, seed=5, shuffle_buffer=400)
    full = _order(data.Loader(ds, **kw))
    loader = data.Loader(ds, **kw)
    it = iter(loader)
    first = [next(it)["i"].copy() for _ in range(13)]
    state = loader.state_dict()
    loader.close()
    resumed = data.Loader(ds, **kw)
    resumed.load_state_dict(state)
    rest = _order(resumed)
    assert np.array_equal(np.concatenate([*first, rest]), full)
    # 13 batches of 100 = 3 full windows of 400 plus 100 rows: 3 windows skipped.
    assert resumed.stats()["row_groups_read"] == 7 - 3


@pytest.mark.parametrize(("world", "drop_last"), [(2, False), (3, False), (3, True), (4, False)])
def test_parquet_sharding(files, world, drop_last):
    ds = data.Dataset.from_parquet([files / "a.parquet", files / "b.parquet"])
    kw = dict(batch_size=97, seed=3, drop_last=drop_last, shuffle_buffer=900)
    orders, reads = [], []
    for r in range(world):
        loader = data.Loader(ds, rank=r, world_size=world, **kw)
        o = _order(loader)
        assert loader.stats()["batches"] == len(loader)
        orders.append(o)
        reads.append(loader.stats()["row_groups_read"])
    assert len({len(o) for o in orders}) == 1
    allrows = np.concatenate(orders)
    if drop_last:
        assert len(np.unique(allrows)) == len(allrows)
    else:
        assert set(allrows.tolist()) == set(range(3801))
        assert len(allrows) - 3801 == (-3801) % world
    # Rank r holds the r-th contiguous share of the single-process epoch order
    # (positions past the end wrap around: padding).
    whole = _order(data.Loader(ds, batch_size=97, seed=3, shuffle_buffer=900))
    per_rank = 3801 // world if drop_last else -(-3801 // world)
    padded = np.concatenate([whole, whole])
    for r, o in enumerate(orders):
        assert np.array_equal(o, padded[r * per_rank : r * per_rank + len(o)])
    # Each rank decodes only the windows its share touches (11 row groups, at
    # most 3 per window): far fewer than every rank reading all of them.
    assert sum(reads) <= 11 + 3 * world


@pytest.mark.parametrize(("rank", "consumed"), [(0, 5), (1, 0), (2, 9)])
def test_parquet_resume_on_a_rank(files, rank, consumed):
    ds = data.Dataset.from_parquet([files / "a.parquet", files / "b.parquet"])
    kw = dict(batch_size=61, seed=8, rank=rank, world_size=3, shuffle_buffer=700)
    full = _order(data.Loader(ds, **kw))
    loader = data.Loader(ds, **kw)
    it = iter(loader)
    first = [next(it)["i"].copy() for _ in range(consumed)]
    state = loader.state_dict()
    loader.close()
    resumed = data.Loader(ds, **kw)
    resumed.load_state_dict(state)
    rest = _order(resumed)
    assert np.array_equal(np.concatenate([*first, rest]), full)


def test_parquet_transforms(files):
    ds = data.Dataset.from_parquet(files / "b.parquet", columns=["i", "x"])
    loader = data.Loader(
        ds,
        batch_size=200,
        transforms={"x": [data.Standardize(1000.0, 10.0), data.Clip(-5, 5), data.Cast("float16")]},
    )
    for b in loader:
        ref = np.clip((b["i"] * 0.5 - 1000.0) / 10.0, -5, 5).astype(np.float16)
        np.testing.assert_array_equal(b["x"], ref)


def test_bad_parquet_files(tmp_path, files):
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet"):
        data.Dataset.from_parquet(tmp_path / "missing.parquet")
    with pytest.raises(FileNotFoundError, match="no Parquet files match"):
        data.Dataset.from_parquet(str(tmp_path / "*.nothing"))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(fastml.FormatError, match=r"junk\.parquet"):
        data.Dataset.from_parquet(junk)
    trunc = tmp_path / "trunc.parquet"
    trunc.write_bytes((files / "a.parquet").read_bytes()[:-50])
    with pytest.raises(fastml.FormatError, match=r"trunc\.parquet"):
        data.Dataset.from_parquet(trunc)
    strings = tmp_path / "s.parquet"
    pq.write_table(pa.table({"x": [1, 2], "s": ["a", "b"]}), strings)
    with pytest.raises(TypeError, match="column 's'"):
        data.Dataset.from_parquet(strings)
    assert len(data.Dataset.from_parquet(strings, columns=["x"])) == 2
    with pytest.raises(KeyError, match="nope"):
        data.Dataset.from_parquet(strings, columns=["nope"])
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"i": np.arange(3, dtype=np.int32)}), other)
    with pytest.raises(ValueError, match="column 'i'"):
        data.Dataset.from_parquet([files / "a.parquet", other], columns=["i"])


def test_corrupt_row_group_raises_in_the_consumer_thread(tmp_path):
    path = tmp_path / "corrupt.parquet"
    _write(path, 0, 4000, 1000, compression="zstd")
    md = pq.ParquetFile(path).metadata
    col = md.row_group(2).column(1)
    start = col.data_page_offset
    raw = bytearray(path.read_bytes())
    for k in range(start + 20, start + col.total_compressed_size - 4):
        raw[k] ^= 0x5A  # scramble the compressed page, keep the footer
    path.write_bytes(bytes(raw))
    ds = data.Dataset.from_parquet(path)  # the metadata is intact
    loader = data.Loader(ds, batch_size=500, shuffle=False, shuffle_buffer=1000)
    got = 0
    with pytest.raises(fastml.FormatError, match=r"corrupt\.parquet.*row group 2"):
        for _ in loader:
            got += 1
    assert got == 4  # the two good row groups before it
    assert threading.active_count() == 1 or all(
        t.name != "fastml-data-parquet" for t in threading.enumerate()
    )


def test_closing_mid_epoch_joins_the_reader(files):
    ds = data.Dataset.from_parquet([files / "a.parquet", files / "b.parquet"])
    before = threading.active_count()
    loader = data.Loader(ds, batch_size=10, prefetch=2)
    it = iter(loader)
    next(it)
    assert threading.active_count() >= before + 1  # the reader (and its read-ahead)
    loader.close()
    assert threading.active_count() == before
    # The files stay mapped across epochs while the loader lives; close() unmaps them.
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as fh:
            assert str(files / "a.parquet") not in fh.read()
    loader2 = data.Loader(ds, batch_size=10, prefetch=2)
    for k, _ in enumerate(loader2):
        if k == 5:
            break
    assert threading.active_count() == before


def test_a_newer_parquet_iteration_supersedes_an_older_one(files):
    ds = data.Dataset.from_parquet(files / "a.parquet")
    full = [b["i"].copy() for b in data.Loader(ds, batch_size=100, seed=1)]
    loader = data.Loader(ds, batch_size=100, seed=1)
    it1 = iter(loader)
    assert np.array_equal(next(it1)["i"], full[0])
    it2 = iter(loader)
    assert np.array_equal(next(it2)["i"], full[1])
    assert next(it1, None) is None  # finished, never blocks
    del it1
    rest = [b["i"] for b in it2]
    assert len(rest) == len(full) - 2
    for a, b in zip(rest, full[2:], strict=True):
        assert np.array_equal(a, b)
