"""Elastic resume: states saved mid-epoch at world size N, resumed at world size M.

The rest of the epoch must be read exactly once across the new ranks (the one
documented exception: when the last round has fewer positions than ranks and
drop_last=False, a rank without one repeats one), with equal batch counts on
every rank; in-memory, mapped and Parquet sources; a second hop; thread
counts; the next epoch a normal one. The pure layout functions are checked on
hypothesis-drawn configurations; real torch.distributed processes (gloo) run
2 -> 3 and 3 -> 2 in tests/test_data_elastic_dist.py.
"""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fastml
from fastml import data
from fastml.data import _elastic

# ------------------------------------------------------------------ the layout functions


def _normal_positions(layout, n, world, rank, b, drop_last):
    """A normal epoch's delivered positions for one rank (padding included, as p % n)."""
    per_rank = _elastic.rows_per_rank(n, world, drop_last)
    delivered = min(_elastic.batches_per_rank(n, world, b, drop_last) * b, per_rank)
    j = np.arange(delivered)
    pos = rank + world * j if layout == _elastic.STRIDED else rank * per_rank + j
    return pos


@st.composite
def _configs(draw):
    n = draw(st.integers(1, 400))
    b = draw(st.integers(1, 17))
    drop_last = draw(st.booleans())
    layout = draw(st.sampled_from([_elastic.STRIDED, _elastic.CONTIGUOUS]))
    worlds = draw(st.lists(st.integers(1, 7), min_size=2, max_size=4))
    return n, b, drop_last, layout, worlds, draw(st.randoms(use_true_random=False))


@given(_configs())
@example((10, 3, False, _elastic.STRIDED, [2, 3], __import__("random").Random(0)))
@example((5, 1, False, _elastic.CONTIGUOUS, [1, 7], __import__("random").Random(1)))  # R < M
@example((64, 4, True, _elastic.STRIDED, [4, 3, 5], __import__("random").Random(2)))
def test_remainder_is_read_once_with_equal_batch_counts(cfg):
    n, b, drop_last, layout, worlds, rnd = cfg
    # The normal epoch at worlds[0]: what each rank consumed, and what it would deliver.
    w0 = worlds[0]
    nb0 = _elastic.batches_per_rank(n, w0, b, drop_last)
    consumed = [rnd.randint(0, nb0) for _ in range(w0)]
    epoch = set()
    seen = collections.Counter()
    for r in range(w0):
        pos = _normal_positions(layout, n, w0, r, b, drop_last)
        epoch.update(int(p) for p in pos if p < n)
        for p in pos[: consumed[r] * b]:
            if p < n:
                seen[int(p)] += 1
    stages = [(w0, consumed)]
    repeats = 0
    for k, world in enumerate(worlds[1:]):
        last = k == len(worlds) - 2
        shares = [
            _elastic.epoch_share(layout, n, stages, world, r, b, drop_last) for r in range(world)
        ]
        counts = {-(-len(c) // b) for c, _ in shares}
        assert len(counts) == 1, f"unequal batch counts {counts}"
        assert all(len(c) - own <= 1 for c, own in shares)  # at most one repeat per rank
        if drop_last:
            assert all(len(c) % b == 0 and len(c) == own for c, own in shares)  # full batches
        nbk = counts.pop()
        took = [len(c) if last else rnd.randint(0, nbk) * b for c, _ in shares]
        for (c, own), t in zip(shares, took, strict=True):
            for p in c[: min(t, own)]:
                seen[int(p)] += 1
            repeats += max(0, min(t, len(c)) - own)  # the documented repeat, read
        if not last:
            stages.append((world, [t // b for t in took]))
    assert all(v == 1 for v in seen.values()), "a position was read twice"
    assert set(seen) <= epoch
    if not drop_last:
        assert set(seen) == epoch, "a position was skipped"
        assert repeats < sum(worlds[1:])
    else:
        assert repeats == 0


def test_position_ranges():
    assert _elastic.position_ranges(np.array([], np.int64)) == []
    assert _elastic.position_ranges(np.array([3, 4, 5, 9, 10, 2])) == [(3, 6), (9, 11), (2, 3)]


# ------------------------------------------------------------------ the Loader


def _sources(tmp_path, n):
    ids = np.arange(n, dtype=np.int64)
    x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    out = {"memory": data.Dataset.from_numpy({"i": ids, "x": x})}
    np.save(tmp_path / "i.npy", ids)
    np.save(tmp_path / "x.npy", x)
    out["mapped"] = data.Dataset.from_npy({"i": tmp_path / "i.npy", "x": tmp_path / "x.npy"})
    table = pa.table({"i": ids, "x": pa.FixedSizeListArray.from_arrays(x.reshape(-1), 3)})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=37)
    out["parquet"] = data.Dataset.from_parquet(tmp_path / "d.parquet")
    return out


def _ids(batch):
    return [int(v) for v in np.asarray(batch["i"])]


def _loaders(ds, world, **kw):
    return [data.Loader(ds, rank=r, world_size=world, **kw) for r in range(world)]


@pytest.mark.parametrize("source", ["memory", "mapped", "parquet"])
@pytest.mark.parametrize(
    "old,new,drop_last", [(2, 3, False), (3, 2, False), (4, 3, True), (2, 5, False)]
)
def test_loader_elastic_resume(tmp_path, source, old, new, drop_last):
    n = 1003
    ds = _sources(tmp_path, n)[source]
    kw = dict(batch_size=16, seed=7, drop_last=drop_last, shuffle_buffer=200)
    # The normal epoch 0 at `old` ranks; rank r stops after a different number
    # of batches (states saved at one point need not be at one batch).
    olds = _loaders(ds, old, **kw)
    seen = collections.Counter()
    for r, ld in enumerate(olds):
        it = iter(ld)
        for _ in range(3 + r):
            seen.update(_ids(next(it)))
    states = [ld.state_dict() for ld in olds]
    for ld in olds:
        ld.close()
    fastml.set_num_threads(1)  # a different thread count changes nothing
    try:
        news = _loaders(ds, new, **kw)
        for ld in news:
            ld.load_state_dict(list(reversed(states)))  # any order
        lens = {len(ld) for ld in news}
        assert len(lens) == 1, f"unequal batch counts {lens}"
        rest = [[b for b in ld] for ld in news]
        assert {len(r) for r in rest} == lens
    finally:
        fastml.set_num_threads(2)
    for batches in rest:
        for bt in batches:
            seen.update(_ids(bt))
    # The epoch's real rows: a normal epoch at `old` ranks, padding removed.
    full = collections.Counter()
    for ld in _loaders(ds, old, **kw):
        for bt in ld:
            full.update(_ids(bt))
    expected = set(full)
    assert set(seen) == expected
    extra = sum(v - 1 for v in seen.values())
    assert extra < new  # the documented corner: at most one repeat per rank
    # The next epoch is a normal epoch at `new` ranks.
    nxt = [[_ids(b) for b in ld] for ld in news]
    ref = [[_ids(b) for b in ld] for ld in _loaders(ds, new, **kw) if ld.set_epoch(1) is None]
    assert nxt == ref


@pytest.mark.parametrize("source", ["memory", "parquet"])
def test_loader_elastic_resume_twice_and_same_world(tmp_path, source):
    n = 777
    ds = _sources(tmp_path, n)[source]
    kw = dict(batch_size=8, seed=3, shuffle_buffer=100)
    seen = collections.Counter()
    olds = _loaders(ds, 3, **kw)
    for ld in olds:
        it = iter(ld)
        for _ in range(5):
            seen.update(_ids(next(it)))
    states = [ld.state_dict() for ld in olds]
    # Same world size through the list: exactly the rank's own resume.
    for r in range(3):
        a, b = _loaders(ds, 3, **kw)[r], _loaders(ds, 3, **kw)[r]
        a.load_state_dict(states)
        b.load_state_dict(states[r])
        assert [_ids(x) for x in a] == [_ids(x) for x in b]
    # 3 -> 2, read some, save, 2 -> 4, read the rest.
    mids = _loaders(ds, 2, **kw)
    for ld in mids:
        ld.load_state_dict(states)
        it = iter(ld)
        for _ in range(4):
            seen.update(_ids(next(it)))
    states2 = [ld.state_dict() for ld in mids]
    assert states2[0]["stages"] == [[3, [5, 5, 5]]]
    # Written as version 3: a fastml without stages refuses it rather than
    # resuming the wrong rows; a normal epoch's state stays version 2.
    assert {st["version"] for st in states2} == {3} and states[0]["version"] == 2
    with pytest.raises(ValueError, match="stages are version 3"):
        _loaders(ds, 4, **kw)[0].load_state_dict([{**st, "version": 2} for st in states2])
    lasts = _loaders(ds, 4, **kw)
    for ld in lasts:
        ld.load_state_dict(states2)
    assert len({len(ld) for ld in lasts}) == 1
    for ld in lasts:
        for bt in ld:
            seen.update(_ids(bt))
    assert set(seen) == set(range(n))
    assert sum(v - 1 for v in seen.values()) < 4


def test_load_states_errors():
    ds = data.Dataset.from_numpy({"i": np.arange(100, dtype=np.int64)})
    lds = _loaders(ds, 2, batch_size=10)
    states = [ld.state_dict() for ld in lds]
    new = data.Loader(ds, batch_size=10, rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"lack ranks \[1\]"):
        new.load_state_dict(states[:1])
    with pytest.raises(ValueError, match="repeated"):
        new.load_state_dict([states[0], states[0]])
    with pytest.raises(ValueError, match="empty"):
        new.load_state_dict([])
    with pytest.raises(ValueError, match="epoch"):
        new.load_state_dict([states[0], {**states[1], "epoch": 1}])
    with pytest.raises(ValueError, match="batch_size"):
        new.load_state_dict([states[0], {**states[1], "batch_size": 5}])
    with pytest.raises(ValueError, match="batches_consumed=9"):
        new.load_state_dict([states[0], {**states[1], "batches_consumed": 9}])
    with pytest.raises(ValueError, match="stages"):
        new.load_state_dict([{**s, "stages": [[2, [1]]]} for s in states])
    # A single dict still needs the same rank and world size.
    with pytest.raises(ValueError, match="world_size"):
        new.load_state_dict(states[0])
