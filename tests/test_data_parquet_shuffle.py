"""The Parquet block shuffle across several row groups (issue #19, point 6).

A window of row groups is shuffled in two steps: each group's own order is
applied as it is decoded (so the window's buffers hold every group in shuffled
order), then the window's permutation only decides which group each position
draws from, and the position takes that group's next row. Small windows, and
rows pyarrow decodes, apply the group orders logically instead. All three must
give the same batches, every batch must mix the window's groups as a uniform
shuffle would, and the default window holds about eight row groups.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _parquet_paths import DECODE_PATHS, force_decode_path
from hypothesis import given
from hypothesis import strategies as st

from fastml import _core, data
from fastml.data import _loader as loader_mod
from fastml.data._sources import ColumnInfo


def _write(path, sizes: list[int], label=None) -> int:
    n = sum(sizes)
    cols = {"i": np.arange(n, dtype=np.int64), "x": np.arange(n, dtype=np.float32) * 0.5}
    if label is not None:
        cols["label"] = label
    table = pa.table(cols)
    writer = pq.ParquetWriter(path, table.schema)
    start = 0
    for s in sizes:  # one row group per entry
        writer.write_table(table.slice(start, s), row_group_size=max(s, 1))
        start += s
    writer.close()
    return n


def _ids(loader) -> list[np.ndarray]:
    return [b["i"].copy() for b in loader]


@given(
    sizes=st.lists(st.integers(1, 600), min_size=1, max_size=9),
    batch=st.integers(1, 300),
    buffer=st.integers(1, 2500),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 3),
    world=st.integers(1, 3),
    drop_last=st.booleans(),
)
def test_stored_logical_and_pyarrow_orders_give_the_same_batches(
    tmp_path_factory, sizes, batch, buffer, seed, epoch, world, drop_last
):
    path = tmp_path_factory.mktemp("pq") / "d.parquet"
    n = _write(path, sizes)
    ds = data.Dataset.from_parquet(path)
    kw = dict(batch_size=batch, seed=seed, shuffle_buffer=buffer, drop_last=drop_last)
    runs: dict[str, list[list[np.ndarray]]] = {}
    with pytest.MonkeyPatch.context() as mp:
        for mode in DECODE_PATHS:  # pyarrow last: its patch stays for the context
            force_decode_path(mp, mode)
            per_rank = []
            for r in range(world):
                ld = data.Loader(ds, rank=r, world_size=world, **kw)
                ld.set_epoch(epoch)
                per_rank.append(_ids(ld))
                ld.close()
            runs[mode] = per_rank
    for mode in ("logical", "pyarrow"):
        for a, b in zip(runs["stored"], runs[mode], strict=True):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y, err_msg=mode)
    got = np.concatenate(
        [np.concatenate(r) if r else np.zeros(0, np.int64) for r in runs["stored"]]
    )
    if drop_last:
        assert len(np.unique(got)) == len(got) and len(got) >= n - world * max(batch, 1)
    else:  # every row, padding repeats at most world - 1
        assert set(got.tolist()) == set(range(n))


def test_resume_mid_window_gives_the_rest_of_the_epoch(tmp_path, monkeypatch):
    """A window stored in shuffled order, resumed after some of its batches."""
    path = tmp_path / "d.parquet"
    _write(path, [700, 300, 900, 500, 640])
    force_decode_path(monkeypatch, "stored")
    ds = data.Dataset.from_parquet(path)
    kw = dict(batch_size=64, seed=9, shuffle_buffer=1500)
    full = _ids(data.Loader(ds, **kw))
    for cut in (1, 7, 20, len(full) - 1):
        ld = data.Loader(ds, **kw)
        it = iter(ld)
        head = [next(it)["i"].copy() for _ in range(cut)]
        state = ld.state_dict()
        ld.close()
        again = data.Loader(ds, **kw)
        again.load_state_dict(state)
        rest = _ids(again)
        assert len(head) + len(rest) == len(full)
        for a, b in zip(head + rest, full, strict=True):
            np.testing.assert_array_equal(a, b)


def test_batches_mix_the_window_like_a_uniform_shuffle(tmp_path):
    """A file sorted by a 2-class label, 32 row groups of 2,048 rows, windows of
    8 groups: each batch's class count matches a uniform draw from its window
    (the squared standardised deviations average about 1), no batch is a
    single class unless its window is, and batches draw from most of the
    window's groups."""
    groups, rows, bsz = 32, 2048, 256
    n = groups * rows
    label = (np.arange(n) >= n // 2).astype(np.int64)
    path = tmp_path / "sorted.parquet"
    _write(path, [rows] * groups, label=label)
    ds = data.Dataset.from_parquet(path)
    for mode in ("stored", "logical"):
        with pytest.MonkeyPatch.context() as mp:
            force_decode_path(mp, mode)
            ld = data.Loader(ds, batch_size=bsz, seed=4, shuffle_buffer=8 * rows)
            windows = loader_mod.parquet_epoch_layout([rows] * groups, True, 4, 0, 8 * rows)
            z2, spread = [], []
            for k, b in enumerate(ld):
                win = windows[(k * bsz) // (8 * rows)]
                p = np.mean([g >= groups // 2 for g in win])  # class-1 share of the window
                ones = int(b["label"].sum())
                if 0 < p < 1:
                    # hypergeometric variance: b draws without replacement from 8 * rows
                    var = bsz * p * (1 - p) * (8 * rows - bsz) / (8 * rows - 1)
                    z2.append((ones - bsz * p) ** 2 / var)
                    assert 0 < ones < bsz
                spread.append(len(np.unique(b["i"] // rows)))
            ld.close()
            assert len(z2) > 50
            assert 0.7 < np.mean(z2) < 1.4, np.mean(z2)
            assert np.median(spread) == 8


def test_default_window_holds_about_eight_row_groups(tmp_path):
    class Groups:
        is_streamed = True

        def __init__(self, sizes, row_bytes=96):
            self._row_groups = [type("G", (), {"rows": s})() for s in sizes]
            self._sources = {"x": ColumnInfo(np.dtype(np.uint8), (row_bytes,))}

    f = loader_mod.default_shuffle_buffer
    assert f(Groups([65536] * 31), 1024) == 8 * 65536
    assert f(Groups([1000] * 50), 1024) == 65536  # small groups: the floor
    assert f(Groups([1000] * 50), 65536) == 8 * 65536  # the floor follows the batch
    # Wide rows: the window stays within 256 MiB of decoded rows.
    assert f(Groups([1_000_000] * 20, 4096), 1024) == (256 << 20) // 4096
    assert f(Groups([10, 10, 5000, 5000, 5000], 8), 16) == 65536

    class InMemory:
        is_streamed = False

    assert f(InMemory(), 1024) == 65536
    # A real data set: transforms (here a Cast to a wider type) do not move it.
    path = tmp_path / "d.parquet"
    _write(path, [70000, 70000, 70000])
    ds = data.Dataset.from_parquet(path)
    plain = data.Loader(ds, batch_size=100)
    cast = data.Loader(ds, batch_size=100, transforms={"x": [data.Cast("float64")]})
    assert plain._shuffle_buffer == cast._shuffle_buffer == 8 * 70000


def test_a_state_of_the_old_parquet_order_is_refused(tmp_path):
    path = tmp_path / "d.parquet"
    _write(path, [100, 100])
    ld = data.Loader(data.Dataset.from_parquet(path), batch_size=10)
    state = ld.state_dict()
    assert state["parquet_order"] == 2
    old = {k: v for k, v in state.items() if k != "parquet_order"}
    with pytest.raises(ValueError, match="Parquet epoch order differs"):
        ld.load_state_dict(old)
    ld.load_state_dict(state)
    mem = data.Loader(data.Dataset.from_numpy({"i": np.arange(5)}), batch_size=2)
    assert mem.state_dict()["parquet_order"] is None


@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=300),
    seed=st.integers(0, 2**32),
    with_within=st.booleans(),
)
def test_window_order_is_a_permutation_taking_each_group_in_order(sizes, seed, with_within):
    starts = np.cumsum([0, *sizes], dtype=np.int64)
    m = int(starts[-1])
    rng = np.random.default_rng(seed)
    within = [rng.permutation(s).astype(np.int64) for s in sizes] if with_within else None
    out = np.empty(m, np.int64)
    _core.data_window_order(out, starts, seed, 0, 2, within)
    assert np.array_equal(np.sort(out), np.arange(m))
    group = np.searchsorted(starts, out, side="right") - 1
    for g, s in enumerate(sizes):  # each group's rows in its own order
        taken = out[group == g] - starts[g]
        want = within[g] if within is not None else np.arange(s)
        assert np.array_equal(taken, want)
    again = np.empty(m, np.int64)
    _core.data_window_order(again, starts, seed, 0, 2, within)
    assert np.array_equal(out, again)  # deterministic


def test_window_order_groups_are_uniformly_arranged():
    # The group at a fixed position, over many streams: in proportion to the
    # groups' sizes (chi-square, 3 degrees of freedom; p ~ 1e-6 at 30).
    sizes = [10, 20, 30, 40]
    starts = np.cumsum([0, *sizes], dtype=np.int64)
    counts = np.zeros((3, 4))
    out = np.empty(100, np.int64)
    for s in range(4000):
        _core.data_window_order(out, starts, 7, 0, s)
        for k, p in enumerate((0, 50, 99)):
            counts[k, np.searchsorted(starts, out[p], side="right") - 1] += 1
    expect = 4000 * np.array(sizes) / 100
    for row in counts:
        assert ((row - expect) ** 2 / expect).sum() < 30


def test_window_order_rejects_bad_arguments():
    out = np.empty(5, np.int64)
    with pytest.raises(ValueError, match="ascending"):
        _core.data_window_order(out, np.array([0, 3, 2, 5]), 0, 0, 0)
    with pytest.raises(ValueError, match="out"):
        _core.data_window_order(np.empty(4, np.int64), np.array([0, 5]), 0, 0, 0)
    with pytest.raises(ValueError, match="within"):
        _core.data_window_order(out, np.array([0, 2, 5]), 0, 0, 0, [np.arange(2)])
    with pytest.raises(ValueError, match="outside"):
        _core.data_window_order(out, np.array([0, 2, 5]), 0, 0, 0, [np.array([0, 2]), np.arange(3)])
    with pytest.raises(ValueError, match="at least 2"):
        _core.data_window_order(out, np.array([0]), 0, 0, 0)
