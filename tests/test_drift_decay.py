"""Exponentially decayed windows (``Window(half_life=H)``): every part of the
window decays, including the exact values and the quantile sketch that the
KS and Wasserstein tests read."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import scipy.stats
from _hyp import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from fastml import drift


def _weighted_ks(a, wa, b, wb):
    """Two-sample KS statistic of weighted samples (reference)."""
    grid = np.union1d(a, b)
    ia = np.argsort(a, kind="stable")
    ib = np.argsort(b, kind="stable")
    ca = np.concatenate([[0.0], np.cumsum(wa[ia])]) / wa.sum()
    cb = np.concatenate([[0.0], np.cumsum(wb[ib])]) / wb.sum()
    fa = ca[np.searchsorted(a[ia], grid, side="right")]
    fb = cb[np.searchsorted(b[ib], grid, side="right")]
    return float(np.max(np.abs(fa - fb)))


def _feed(mon, batches):
    for b in batches:
        mon.update({"x": b})


def _expected_weights(batches, half_life):
    """Each row's weight after all batches: 0.5 ** (rows that came after its batch / H)."""
    sizes = [len(b) for b in batches]
    after = np.cumsum(sizes[::-1])[::-1] - sizes  # rows after each batch
    return np.concatenate(
        [np.full(n, 0.5 ** (a / half_life)) for n, a in zip(sizes, after, strict=True)]
    )


@settings(max_examples=examples(25))
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=8),
    half_life=st.floats(16.0, 500.0),  # < 32 half-lives: nothing dropped
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_decayed_window_matches_weighted_references(sizes, half_life, seed):
    rng = np.random.default_rng(seed)
    ref_x = rng.normal(size=300).round(1)  # ties on purpose
    batches = [rng.normal(0.3 * i, 1.0, n).round(1) for i, n in enumerate(sizes)]
    ref = drift.Profile.from_data({"x": ref_x})
    mon = drift.Monitor(ref, window=drift.Window(half_life=half_life))
    _feed(mon, batches)
    cur = np.concatenate(batches)
    w = _expected_weights(batches, half_life)
    m = mon.report().features["x"].metrics
    expect_w = scipy.stats.wasserstein_distance(ref_x, cur, None, w)
    assert m["wasserstein"] == pytest.approx(expect_w, rel=1e-9, abs=1e-12)
    expect_ks = _weighted_ks(ref_x, np.ones_like(ref_x), cur, w)
    assert m["ks_statistic"] == pytest.approx(expect_ks, rel=1e-9, abs=1e-12)
    s = mon.current.summary("x")
    assert s["count"] == pytest.approx(w.sum(), rel=1e-9)
    assert s["effective_count"] == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-9)
    items, weights = mon.current.values("x")
    if len(batches) == 1:  # nothing decayed yet: unit weights, reported as empty
        assert weights.size == 0
        weights = np.ones_like(items)
    order = np.argsort(cur, kind="stable")
    np.testing.assert_array_equal(items, cur[order])
    # ties may come in another order: compare the weight per distinct value
    for v in np.unique(cur):
        assert weights[items == v].sum() == pytest.approx(w[cur == v].sum(), rel=1e-9)


def test_decayed_window_forgets_the_old_distribution():
    rng = np.random.default_rng(1)
    ref = drift.Profile.from_data({"x": rng.normal(size=5000)})
    decayed = drift.Monitor(ref, window=drift.Window(half_life=500))
    growing = drift.Monitor(ref)
    for mon in (decayed, growing):
        mon.update({"x": rng.normal(3.0, 1.0, 20_000)})  # drifted
        for _ in range(20):
            mon.update({"x": rng.normal(size=500)})  # back to normal: 20 half-lives
    d = decayed.report().features["x"]
    g = growing.report().features["x"]
    assert g.status == "drift"
    assert d.status == "ok", d.metrics
    assert d.metrics["wasserstein_norm"] < 0.1 < 0.5 < g.metrics["wasserstein_norm"]


def test_decayed_exact_values_stay_bounded():
    half_life = 100
    mon = drift.Monitor(
        drift.Profile.from_data({"x": np.arange(50.0)}), window=drift.Window(half_life=half_life)
    )
    for i in range(400):
        mon.update({"x": np.full(50, float(i))})
    s = mon.current.summary("x")
    # values lighter than 2^-32 are dropped (checked every 4 half-lives)
    assert s["n_values"] <= (32 + 4) * half_life + 50
    assert s["n_values"] >= 32 * half_life
    assert s["count"] == pytest.approx(50 / (1 - 0.5 ** (50 / half_life)), rel=1e-6)


def test_a_batch_of_many_half_lives_empties_the_window():
    mon = drift.Monitor(
        drift.Profile.from_data({"x": np.arange(50.0)}), window=drift.Window(half_life=1e-3)
    )
    mon.update({"x": np.arange(10.0)})
    mon.update({"x": np.full(5, 7.0)})  # 0.5 ** 5000 == 0.0: the old rows are gone
    s = mon.current.summary("x")
    assert s["count"] == 5 and s["n_values"] == 5
    items, weights = mon.current.values("x")
    np.testing.assert_array_equal(items, np.full(5, 7.0))
    assert weights.size == 0  # only fresh rows: unit weights


@pytest.mark.parametrize("seed", range(4))
def test_sketch_decayed_window_is_within_its_bound(seed):
    rng = np.random.default_rng(seed)
    ref_x = rng.normal(size=4000)
    batches = [rng.normal(0.2 * (i % 5), 1.0, 700) for i in range(40)]
    half_life = 3000.0
    exact = drift.Monitor(
        drift.Profile.from_data({"x": ref_x}, mode="exact"),
        window=drift.Window(half_life=half_life),
    )
    sketch = drift.Monitor(
        drift.Profile.from_data({"x": ref_x}, mode="sketch"),
        window=drift.Window(half_life=half_life),
    )
    _feed(exact, batches)
    _feed(sketch, batches)
    e = exact.report().features["x"].metrics
    s = sketch.report().features["x"].metrics
    assert 0 < s["ks_bound"] < 0.12  # grows with the number of batches per half-life
    assert abs(s["ks_statistic"] - e["ks_statistic"]) <= s["ks_bound"]
    summary = sketch.current.summary("x")
    assert summary["sketch_bytes"] <= 16 * 1024
    # thinning keeps the sketch's total weight near the decayed count
    assert summary["sketch_n"] == pytest.approx(summary["count"], rel=0.1)


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_decayed_profiles_round_trip_and_merge(mode):
    rng = np.random.default_rng(3)
    ref = drift.Profile.from_data({"x": rng.normal(size=1000)}, mode=mode)
    mon = drift.Monitor(ref, window=drift.Window(half_life=200))
    _feed(mon, [rng.normal(size=150) for _ in range(6)])
    cur = mon.current
    back = drift.Profile.from_bytes(cur.to_bytes())
    assert back.to_bytes() == cur.to_bytes()
    ra = _report_with(ref, cur)
    rb = _report_with(ref, back)
    assert ra == rb
    for k in ("count", "effective_count", "n_values"):
        assert back.summary("x")[k] == cur.summary("x")[k]
    np.testing.assert_array_equal(back.values("x")[1], cur.values("x")[1])
    # merging a decayed window with an undecayed profile: weights carry over
    plain = ref.empty()
    plain.update({"x": np.array([100.0, 101.0])})
    merged = drift.Profile.merge([cur, plain])
    items, weights = merged.values("x")
    if mode == "exact":
        assert weights[items >= 100].tolist() == [1.0, 1.0]
        assert weights[items < 100].sum() == pytest.approx(cur.summary("x")["count"])
    assert merged.summary("x")["count"] == pytest.approx(cur.summary("x")["count"] + 2)


def _report_with(ref, cur):
    from fastml.drift._report import build_report

    rep = build_report(ref, cur, {"x": "ks"}, {"x": 0.05}, 0.5)
    return rep.features["x"].to_dict()


def _v1_bytes(values):
    """A version-1 profile (before decay state existed): one exact numeric feature."""
    payload = struct.pack("<BIdI", 1, 400, float(len(values)), 1)
    name = b"x"
    payload += struct.pack("<I", len(name)) + name + struct.pack("<B", 0)
    v = np.sort(np.asarray(values, dtype=np.float64))
    mean, m2 = float(v.mean()), float(((v - v.mean()) ** 2).sum())
    payload += struct.pack("<7d", len(v), 0, 0, mean, m2, v.min(), v.max())
    edges = np.array([v.min(), v.max()])
    payload += struct.pack("<I", 2) + edges.tobytes()
    hist = np.array([0.0, len(v), 0.0])
    payload += hist.tobytes() + struct.pack("<BQB", 1, len(v), 1) + v.tobytes()
    import zlib

    header = b"FMLDRIFT" + struct.pack("<HHIQ", 1, 0, zlib.crc32(payload), len(payload))
    return header + payload


def test_version_1_bytes_still_load():
    p = drift.Profile.from_bytes(_v1_bytes([1.0, 2.0, 2.0, 5.0]))
    s = p.summary("x")
    assert s["count"] == 4 and s["effective_count"] == 4 and s["n_values"] == 4
    bad = bytearray(_v1_bytes([1.0]))
    bad[8] = 5
    with pytest.raises(ValueError, match="format version 5; this fastml reads versions 1 to 4"):
        drift.Profile.from_bytes(bytes(bad))
