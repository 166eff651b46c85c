"""fastml.drift.Profile: ingest against NumPy, merge, serialisation, input forms."""

from __future__ import annotations

import itertools
import pickle
import threading

import numpy as np
import pytest
from _drift_helpers import progress_during
from hypothesis import example, given
from hypothesis import strategies as st

import fastml
from fastml import _core, drift

# ------------------------------------------------------------------ helpers


def _numeric_reference(values: np.ndarray, edges: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    inner, _ = np.histogram(finite, bins=edges) if edges[0] < edges[-1] else (None, None)
    if inner is None:  # degenerate [v, v] edges: one closed bin
        inner = np.array([np.sum(finite == edges[0])])
    under = np.sum(finite < edges[0])
    over = np.sum(finite > edges[-1])
    return {
        "count": finite.size,
        "missing": int(np.isnan(values).sum()),
        "nonfinite": int(np.isinf(values).sum()),
        "hist": np.r_[under, inner, over].astype(np.float64),
        "mean": finite.mean() if finite.size else 0.0,
        "m2": ((finite - finite.mean()) ** 2).sum() if finite.size else 0.0,
    }


@st.composite
def columns(draw):
    n = draw(st.integers(1, 3000))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "ties", "heavy", "const"]))
    if kind == "normal":
        x = rng.normal(draw(st.floats(-1e3, 1e3)), draw(st.floats(1e-3, 1e3)), size=n)
    elif kind == "ties":
        x = rng.integers(-3, 4, size=n).astype(np.float64)
    elif kind == "heavy":
        x = rng.standard_cauchy(size=n)
    else:
        x = np.full(n, 2.5)
    specials = draw(st.sampled_from(["none", "nan", "inf", "both"]))
    if specials != "none":
        idx = rng.choice(n, size=max(1, n // 10), replace=True)
        if specials in ("nan", "both"):
            x[idx[: len(idx) // 2 + 1]] = np.nan
        if specials in ("inf", "both"):
            x[idx[len(idx) // 2 + 1 :]] = rng.choice(
                [np.inf, -np.inf], size=len(idx) - len(idx) // 2 - 1
            )
    return x


# ------------------------------------------------------------------ numeric ingest


@given(
    columns(),
    columns(),
    st.sampled_from(["float32", "float64", "int32", "float16"]),
    st.integers(1, 40),
)
# Found by the explore profile: a value beyond float16's range becomes inf in
# the cast (intended input, not an error of the test).
@example(np.array([2.0]), np.array([18.5, -0.05, 1.0e5]), "float16", 1)
def test_numeric_ingest_matches_numpy(ref_values, batch, dtype, bins):
    ref = drift.Profile.from_data({"x": ref_values}, bins=bins)
    edges = ref.summary("x")["edges"]
    if np.dtype(dtype).kind == "i":
        batch = np.nan_to_num(batch, nan=0, posinf=0, neginf=0).clip(-1e9, 1e9)
    with np.errstate(over="ignore"):  # float16: out-of-range values become +-inf
        b = batch.astype(dtype)
    cur = ref.empty()
    cur.update({"x": b})
    got = cur.summary("x")
    want = _numeric_reference(b.astype(np.float64), edges)
    assert got["count"] == want["count"]
    assert got["missing"] == want["missing"]
    assert got["nonfinite"] == want["nonfinite"]
    np.testing.assert_array_equal(got["hist"], want["hist"])
    if want["count"]:
        finite = b.astype(np.float64)[np.isfinite(b.astype(np.float64))]
        assert got["min"] == finite.min() and got["max"] == finite.max()
        scale = max(1.0, abs(want["mean"]))
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-9, abs=1e-12 * scale)
        assert got["m2"] == pytest.approx(want["m2"], rel=1e-8, abs=1e-9 * scale**2)


@pytest.mark.parametrize("bins", [3, 20, 32765, 40000])
def test_float32_ingest_matches_numpy_histogram_at_any_bin_count(bins):
    """The vector ingest's cell table and its dirty-cell search, from 3 bins to
    40,000 (grid cells then capped at 2**16, so most cells hold an edge): the
    counts are numpy.histogram's. (An int16 copy of the table for small bin
    counts was tried: 515 -> 415 M values/s, dropped.)"""
    rng = np.random.default_rng(bins)
    ref = rng.normal(size=200_000).astype(np.float32)
    cur = (rng.normal(0.3, 1.3, size=300_003)).astype(np.float32)
    cur[::97] = np.nan
    prof = drift.Profile.from_data({"x": ref}, bins=bins, mode="histogram").empty()
    prof.update({"x": cur})
    s = prof.summary("x")
    fin = cur[np.isfinite(cur)].astype(np.float64)
    inner, _ = np.histogram(fin, bins=s["edges"])
    np.testing.assert_array_equal(s["hist"][1:-1], inner)
    assert s["hist"][0] == (fin < s["edges"][0]).sum()
    assert s["hist"][-1] == (fin > s["edges"][-1]).sum()


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_float32_compare_counts_at_edges_signed_zeros_and_specials(layout):
    """The comparison path (at most 32 edges: float32 thresholds on integer
    keys) on the values where it could go wrong: each edge, its float32
    neighbours, an edge that float32 cannot hold (1/3), -0.0 and +0.0 against
    an edge at 0, subnormals, +-FLT_MAX, +-inf and NaN of either sign, in
    groups of eight and in the tail. Counts must be numpy.histogram's."""
    f32 = np.float32
    big = float(np.finfo(f32).max)
    want_edges = np.array([-big, -2.5, -1e-40, 0.0, 1 / 3, 1.0, big])
    ref = drift.Profile.from_data({"x": want_edges}, bins=6, mode="histogram")
    edges = ref.summary("x")["edges"]
    np.testing.assert_array_equal(edges, want_edges)  # quantiles of 7 points: the points
    vals = [0.0, -0.0, 1e-45, -1e-45, np.inf, -np.inf, np.nan, -np.nan, big, -big]
    vals += [np.copysign(np.nan, -1.0)]
    with np.errstate(over="ignore"):  # FLT_MAX's neighbour up is inf (intended)
        for e in want_edges:
            c = f32(e)
            vals += [c, np.nextafter(c, f32(np.inf)), np.nextafter(c, f32(-np.inf))]
    rng = np.random.default_rng(0)
    batch = np.array(vals * 40, dtype=f32)[rng.permutation(len(vals) * 40)]
    batch = np.r_[batch, np.array(vals[:5], dtype=f32)]  # a tail of five
    if layout == "strided":
        m = np.zeros((batch.size, 9), dtype=f32)
        m[:, 3] = batch
        col = m[:, 3]
    else:
        col = batch
    cur = ref.empty()
    cur.update({"x": col})
    got = cur.summary("x")
    want = _numeric_reference(batch.astype(np.float64), edges)
    np.testing.assert_array_equal(got["hist"], want["hist"])
    assert got["missing"] == want["missing"] and got["nonfinite"] == want["nonfinite"]


def test_reference_edges_are_equal_mass_and_hist_matches_numpy_histogram():
    rng = np.random.default_rng(0)
    x = rng.exponential(size=100_000).astype(np.float32)
    prof = drift.Profile.from_data({"x": x}, bins=25)
    s = prof.summary("x")
    np.testing.assert_array_equal(
        s["edges"], np.unique(np.quantile(x.astype(np.float64), np.linspace(0, 1, 26)))
    )
    inner, _ = np.histogram(x.astype(np.float64), bins=s["edges"])
    np.testing.assert_array_equal(s["hist"][1:-1], inner)
    assert s["hist"][0] == s["hist"][-1] == 0
    assert np.all(np.abs(inner - 4000) <= 2)  # equal mass


def test_strided_and_fortran_input_and_all_dtypes():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4000, 6))
    ref = drift.Profile.from_data(base)
    for arr in (
        np.asfortranarray(base),
        base[::2],
        base.astype(np.float32),
        (base * 100).astype(np.int16),
    ):
        a = ref.empty()
        a.update(arr)
        b = ref.empty()
        b.update({f"f{j}": np.ascontiguousarray(arr[:, j]) for j in range(6)})
        for j in range(6):
            sa, sb = a.summary(f"f{j}"), b.summary(f"f{j}")
            np.testing.assert_array_equal(sa["hist"], sb["hist"])
            assert sa["mean"] == sb["mean"] and sa["m2"] == sb["m2"]


@given(
    rows=st.integers(1, 9000),
    width=st.integers(1, 21),
    start=st.integers(0, 4),
    step=st.sampled_from([1, 2]),
    mode=st.sampled_from(["exact", "histogram", "sketch"]),
    seed=st.integers(0, 2**16),
)
@example(rows=8200, width=16, start=0, step=1, mode="exact", seed=0)  # two tiles, a short block
@example(rows=7, width=9, start=1, step=1, mode="histogram", seed=1)  # one tile, rows < 8
def test_columns_of_a_row_major_float32_matrix_equal_contiguous_columns(
    rows, width, start, step, mode, seed
):
    """Eight float32 columns side by side in one matrix are transposed block by
    block before ingest (the others are read strided): the profile must equal,
    bit for bit, the profile of contiguous copies of the same columns, with
    non-finite values, odd row counts, column subsets and column orders."""
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(rows, width + start + 8)).astype(np.float32)
    M[rng.random(M.shape) < 0.03] = np.nan
    M[rng.random(M.shape) < 0.01] = np.inf
    M = M[::step]
    cols = list(range(start, start + width))
    rng.shuffle(cols)  # the frame's column order need not follow the matrix
    names = [f"c{j}" for j in cols]
    frame = {name: M[:, j] for name, j in zip(names, cols, strict=True)}
    copies = {name: np.ascontiguousarray(v) for name, v in frame.items()}
    ref = drift.Profile.from_data(
        {k: np.nan_to_num(v, nan=0.0, posinf=0.0) for k, v in copies.items()}, mode=mode
    )
    a, b = ref.empty(), ref.empty()
    a.update(frame)
    b.update(copies)
    assert a.to_bytes() == b.to_bytes()


# ------------------------------------------------------------------ input forms


def _frames():
    rng = np.random.default_rng(2)
    n = 500
    num = rng.normal(size=n)
    num[::17] = np.nan
    cat = rng.choice(["a", "b", "c"], size=n).astype(object)
    cat[::23] = None
    return num, cat, rng.integers(0, 5, size=n)


def test_input_forms_agree():
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    pa = pytest.importorskip("pyarrow")
    num, cat, codes = _frames()
    as_dict = {"num": num, "cat": cat, "code": codes}
    forms = {
        "dict": as_dict,
        "pandas": pd.DataFrame(as_dict),
        "pandas_categorical": pd.DataFrame({"num": num, "cat": pd.Categorical(cat), "code": codes}),
        "polars": pl.DataFrame({"num": num, "cat": list(cat), "code": codes}, strict=False),
        "arrow": pa.table({"num": num, "cat": pa.array(list(cat)), "code": codes}),
        "arrow_dict": pa.table(
            {"num": num, "cat": pa.array(list(cat)).dictionary_encode(), "code": codes}
        ),
        "record_batch": pa.RecordBatch.from_pydict(
            {"num": num, "cat": pa.array(list(cat)), "code": codes}
        ),
    }
    results = {}
    for name, frame in forms.items():
        p = drift.Profile.from_data(frame, categorical=["code"])
        assert p.kinds == {"num": "numeric", "cat": "categorical", "code": "categorical"}, name
        results[name] = (p.summary("num"), p.summary("cat"), p.summary("code"))
    base = results["dict"]
    for name, (sn, sc, sk) in results.items():
        np.testing.assert_array_equal(sn["hist"], base[0]["hist"], err_msg=name)
        assert sn["missing"] == base[0]["missing"] == int(np.isnan(num).sum()), name
        assert sc["counts"] == base[1]["counts"], name
        assert sc["missing"] == base[1]["missing"] == sum(v is None for v in cat), name
        assert sk["counts"] == base[2]["counts"], name


def test_bare_array_names_and_bad_inputs():
    ref = drift.Profile.from_data(np.zeros((10, 3)) + np.arange(3))
    assert ref.features == ["f0", "f1", "f2"]
    with pytest.raises(ValueError, match="missing \\['f2'\\]"):
        ref.empty().update(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="unknown \\['zz'\\]"):
        ref.empty().update({"f0": [1.0], "f1": [1.0], "f2": [1.0], "zz": [1.0]})
    with pytest.raises(TypeError, match="column 'f1' is numeric in the reference"):
        ref.empty().update({"f0": [1.0], "f1": ["a"], "f2": [1.0]})
    with pytest.raises(ValueError, match="must be a 2-D"):
        drift.Profile.from_data(np.zeros(5))
    with pytest.raises(ValueError, match="columns differ in length"):
        ref.empty().update({"f0": [1.0], "f1": [1.0, 2.0], "f2": [1.0]})
    with pytest.raises(TypeError, match="must be a 2-D numpy array, a dict"):
        drift.Profile.from_data([[1, 2]])
    with pytest.raises(ValueError, match="mode must be"):
        drift.Profile.from_data(np.zeros((3, 1)), mode="fast")
    with pytest.raises(ValueError, match="categorical names unknown"):
        drift.Profile.from_data(np.zeros((3, 1)), categorical=["nope"])
    # An empty batch is a documented no-op.
    p = ref.empty()
    p.update(np.zeros((0, 3)))
    assert p.rows == 0 and p.summary("f0")["count"] == 0


# ------------------------------------------------------------------ categorical


def test_categorical_cap_heavy_hitters_and_other():
    ref = drift.Profile.from_data({"c": np.array(["a", "b"])}, category_cap=3)
    p = ref.empty()
    p.update({"c": np.array(["a"] * 5 + ["b"] * 4 + ["c"] * 3)})
    p.update({"c": np.array(["d"] * 2 + ["e"] * 10)})
    s = p.summary("c")
    # 'd' (2) cannot displace the lightest (c: 3) and goes to other; 'e' (10) evicts 'c'.
    assert s["counts"] == {"a": 5.0, "b": 4.0, "e": 10.0}
    assert s["other"] == 5.0 and s["total"] == 24.0


# ------------------------------------------------------------------ merge


@given(
    columns(),
    st.lists(st.integers(0, 3000), min_size=1, max_size=4),
    st.sampled_from(["exact", "sketch"]),
)
def test_merge_of_shards_equals_whole(values, cuts, mode):
    ref = drift.Profile.from_data(
        {"x": values, "c": (np.nan_to_num(values) > 0).astype(str)}, mode=mode
    )
    bounds = [0, *sorted(min(c, values.size) for c in cuts), values.size]
    shards = []
    for lo, hi in itertools.pairwise(bounds):
        p = ref.empty()
        p.update({"x": values[lo:hi], "c": (np.nan_to_num(values[lo:hi]) > 0).astype(str)})
        shards.append(p)
    whole = ref.empty()
    whole.update({"x": values, "c": (np.nan_to_num(values) > 0).astype(str)})
    for order in (shards, shards[::-1]):
        merged = drift.Profile.merge(order)
        a, b = merged.summary("x"), whole.summary("x")
        for key in ("count", "missing", "nonfinite", "min", "max"):
            assert a[key] == b[key]
        np.testing.assert_array_equal(a["hist"], b["hist"])
        scale = max(1.0, abs(b["mean"]))
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-12, abs=1e-12 * scale)
        assert a["m2"] == pytest.approx(b["m2"], rel=1e-12, abs=1e-10 * scale**2)
        assert merged.summary("c") == whole.summary("c")
        assert merged.rows == whole.rows
        va, _ = merged.values("x")
        vb, _ = whole.values("x")
        if mode == "exact":
            np.testing.assert_array_equal(va, vb)


def test_merge_is_associative_and_rejects_foreign_profiles():
    rng = np.random.default_rng(4)
    ref = drift.Profile.from_data(rng.normal(size=(1000, 2)))
    parts = []
    for _ in range(3):
        p = ref.empty()
        p.update(rng.normal(size=(700, 2)))
        parts.append(p)
    left = drift.Profile.merge([drift.Profile.merge(parts[:2]), parts[2]])
    right = drift.Profile.merge([parts[0], drift.Profile.merge(parts[1:])])
    for f in ref.features:
        np.testing.assert_array_equal(left.summary(f)["hist"], right.summary(f)["hist"])
        assert left.summary(f)["mean"] == pytest.approx(right.summary(f)["mean"], rel=1e-12)
    # Histogram profiles keep no values: built apart, they cannot be re-binned,
    # and the error names the first edge that differs.
    h1 = drift.Profile.from_data(rng.normal(size=(1000, 2)), mode="histogram")
    h2 = drift.Profile.from_data(rng.normal(size=(1000, 2)), mode="histogram")
    with pytest.raises(ValueError, match=r"different histogram edges: edge 0 is -?\d.* in one and"):
        drift.Profile.merge([h1, h2])
    with pytest.raises(ValueError, match="different modes"):
        drift.Profile.merge([ref, h1])
    with pytest.raises(ValueError, match="same features"):
        drift.Profile.merge([ref, drift.Profile.from_data({"a": np.ones(3)})])
    with pytest.raises(ValueError, match="at least one"):
        drift.Profile.merge([])


def test_merge_keeps_a_references_edges_and_rebins_own_edges():
    """Shards of one reference keep its edges even where the union's quantiles
    differ; profiles whose identical edges come from their own data are re-binned
    to the union's; the distinction survives to_bytes and copy."""
    ties = np.repeat([0.0, 1.0, 2.0, 3.0, 4.0], [32, 34, 38, 22, 48])
    ref = drift.Profile.from_data({"k": ties}, bins=20)
    a, b = ref.empty(), ref.empty()
    a.update({"k": np.repeat([0.0, 1.0, 2.0, 3.0, 4.0], [50, 1, 1, 1, 1])})
    b.update({"k": np.repeat([0.0, 4.0], [3, 40])})
    shards = drift.Profile.merge([a, b])
    np.testing.assert_array_equal(shards.summary("k")["edges"], ref.summary("k")["edges"])
    assert not shards._native.edges_own
    rng = np.random.default_rng(0)
    parts = [_mixed_table(rng, n, s) for n, s in ((118, 0.5), (56, 0.5))]
    own = [drift.Profile.from_data(p, bins=20) for p in parts]
    np.testing.assert_array_equal(own[0].summary("k")["edges"], own[1].summary("k")["edges"])
    for transport in (lambda p: p, lambda p: drift.Profile.from_bytes(p.to_bytes()), copy_of):
        merged = drift.Profile.merge([transport(p) for p in own])
        union = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        whole = drift.Profile.from_data(union, bins=20)
        np.testing.assert_array_equal(merged.summary("k")["edges"], whole.summary("k")["edges"])
        np.testing.assert_array_equal(merged.summary("k")["hist"], whole.summary("k")["hist"])
        assert merged._native.edges_own
    # The reference merged with its own shards keeps the reference's edges.
    mixed = drift.Profile.merge([ref, a])
    np.testing.assert_array_equal(mixed.summary("k")["edges"], ref.summary("k")["edges"])


def copy_of(p):
    return p.copy()


def _mixed_table(rng, n, shift):
    x = rng.normal(shift, 1.0 + shift, size=n)
    x[rng.random(n) < 0.05] = np.nan
    x[rng.random(n) < 0.01] = np.inf
    return {
        "x": x,
        "k": rng.integers(0, 4 + int(shift * 3), size=n).astype(np.float64),  # ties, few values
        "c": np.array(["a", "b", "c", "new"])[rng.integers(0, 3 + int(shift > 0.5), size=n)],
    }


@given(
    sizes=st.lists(st.integers(1, 400), min_size=2, max_size=4),
    shifts=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
    bins=st.sampled_from([1, 5, 20]),
)
# Found by the explore profile: both parts' edges of a small-integer column were
# [0, 1, 2, 3, 4] and merge kept them, where the union's are [0, 1, 2, 2.8, 3, 4].
@example(sizes=[118, 56], shifts=[0.5, 0.5, 0.0, 0.0], seed=0, bins=20)
def test_independent_exact_profiles_merge_to_the_union(sizes, shifts, seed, bins):
    """Profiles built apart (each with its own edges) merge to the profile of the union."""
    rng = np.random.default_rng(seed)
    parts = [_mixed_table(rng, n, shifts[i]) for i, n in enumerate(sizes)]
    union = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    merged = drift.Profile.merge(drift.Profile.from_data(p, bins=bins) for p in parts)
    whole = drift.Profile.from_data(union, bins=bins)
    assert merged.rows == whole.rows
    for f in ("x", "k"):
        a, b = merged.summary(f), whole.summary(f)
        np.testing.assert_array_equal(a["edges"], b["edges"])
        np.testing.assert_array_equal(a["hist"], b["hist"])
        for key in ("count", "missing", "nonfinite", "min", "max"):
            assert a[key] == b[key], key
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-9, abs=1e-12)
        assert a["m2"] == pytest.approx(b["m2"], rel=1e-9, abs=1e-9)
        np.testing.assert_array_equal(merged.values(f)[0], whole.values(f)[0])
    assert merged.summary("c")["counts"] == whole.summary("c")["counts"]


def test_independent_sketch_profiles_merge_within_the_rank_error():
    rng = np.random.default_rng(11)
    parts = [_mixed_table(rng, 20_000, s) for s in (0.0, 0.4, 1.0)]
    union = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    merged = drift.Profile.merge(drift.Profile.from_data(p, mode="sketch") for p in parts)
    whole = drift.Profile.from_data(union, mode="sketch")
    a, b = merged.summary("x"), whole.summary("x")
    assert a["count"] == b["count"] and a["missing"] == b["missing"]
    # Each bin's share of the merged histogram is within twice the sketch's rank
    # error of the union's share over the same edges (its CDF at both edges).
    exact = drift.Profile.from_data(union)  # exact values: the true shares over a's edges
    exact_x = np.sort(union["x"][np.isfinite(union["x"])])
    edges = np.asarray(a["edges"])
    cdf = np.searchsorted(exact_x, edges, side="left") / exact_x.size
    true_share = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    share = np.asarray(a["hist"]) / a["count"]
    assert np.abs(share - true_share).max() <= 2 * a["sketch_rank_error"] + 1e-12
    assert exact.mode == "exact"


def _profile_part(mode, part):
    return drift.Profile.from_data(part, mode=mode).to_bytes()


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_dask_partitions_profiled_independently_merge_to_the_whole(mode):
    """Each Dask partition profiled where it lives, with no shared reference."""
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(12)
    data = rng.normal(size=(40_000, 3))
    data[:, 1] = np.round(data[:, 1])  # ties
    partitions = np.array_split(data, 5)
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            # Ephemeral ports: a fixed one (the dashboard's 8787) collides with any
            # other Dask cluster on the machine (seen: a second test session).
            scheduler_port=0,
            dashboard_address=":0",
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        futures = [client.submit(_profile_part, mode, p, pure=False) for p in partitions]
        merged = drift.Profile.merge(drift.Profile.from_bytes(b) for b in client.gather(futures))
    whole = drift.Profile.from_data(data, mode=mode)
    local = drift.Profile.from_partitions(partitions, mode=mode)
    for f in whole.features:
        a, b, c = merged.summary(f), whole.summary(f), local.summary(f)
        assert a["count"] == b["count"] == c["count"]
        np.testing.assert_array_equal(a["hist"], c["hist"])
        if mode == "exact":
            np.testing.assert_array_equal(a["edges"], b["edges"])
            np.testing.assert_array_equal(a["hist"], b["hist"])
            np.testing.assert_array_equal(merged.values(f)[0], whole.values(f)[0])
            assert a["mean"] == pytest.approx(b["mean"], rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------ sketch


def test_sketch_memory_and_rank_error_bound():
    rng = np.random.default_rng(5)
    x = rng.normal(size=400_000)
    p = drift.Profile.from_data({"x": x}, mode="sketch")
    s = p.summary("x")
    assert drift.sketch_bytes() <= 16 * 1024
    assert s["sketch_bytes"] <= drift.sketch_bytes()
    items, weights = p.values("x")
    assert weights.sum() == x.size
    # Empirical rank error at many quantiles stays within the reported bound.
    xs = np.sort(x)
    cdf_sketch = np.cumsum(weights) / weights.sum()
    true_rank = np.searchsorted(xs, items, side="right") / x.size
    assert np.max(np.abs(cdf_sketch - true_rank)) <= s["sketch_rank_error"]


def test_sketch_ks_bound_covers_the_exact_statistic():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=50_000), rng.normal(0.05, size=60_000)
    mon = drift.Monitor(drift.Profile.from_data({"x": a}, mode="sketch"), tests="ks")
    mon.update({"x": b})
    r = mon.report().features["x"]
    exact = drift.ks_2samp(a, b).statistic
    assert abs(r.statistic - exact) <= r.bound
    assert r.status in ("drift", "inconclusive")


# ------------------------------------------------------------------ serialisation


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_bytes_round_trip_exactly(mode):
    rng = np.random.default_rng(7)
    data = {"x": rng.normal(size=3000), "c": rng.choice(["u", "v", "w"], size=3000)}
    data["x"][::50] = np.nan
    p = drift.Profile.from_data(data, mode=mode)
    b = p.to_bytes()
    q = drift.Profile.from_bytes(b)
    assert q.to_bytes() == b
    assert q.features == p.features and q.kinds == p.kinds and q.mode == mode
    assert pickle.loads(pickle.dumps(p)).to_bytes() == b


def _serialised() -> bytes:
    rng = np.random.default_rng(8)
    return drift.Profile.from_data(
        {"x": rng.normal(size=300), "c": rng.choice(["u", "v"], size=300)}, mode="sketch"
    ).to_bytes()


_BLOB = _serialised()


@given(
    st.one_of(
        st.integers(0, len(_BLOB) - 1).map(lambda n: ("truncate", n, 0)),
        st.tuples(st.just("flip"), st.integers(0, len(_BLOB) - 1), st.integers(1, 255)),
        st.tuples(st.just("append"), st.integers(1, 64), st.just(0)),
    )
)
def test_from_bytes_rejects_corruption(change):
    kind, at, value = change
    data = bytearray(_BLOB)
    if kind == "truncate":
        data = data[:at]
    elif kind == "flip":
        data[at] ^= value
    else:
        data += bytes(at)
    with pytest.raises(ValueError, match="fastml drift profile"):
        drift.Profile.from_bytes(bytes(data))


@given(st.binary(max_size=200))
def test_from_bytes_rejects_foreign_bytes(data):
    with pytest.raises(ValueError, match="fastml drift profile"):
        drift.Profile.from_bytes(data)


def test_from_bytes_rejects_consistent_but_invalid_payloads():
    # A valid header and checksum around a broken payload must still fail cleanly.
    import struct
    import zlib

    payload = bytes([1]) + struct.pack("<Id", 400, 10.0) + struct.pack("<I", 1_000_000)
    header = b"FMLDRIFT" + struct.pack("<HHIQ", 1, 0, zlib.crc32(payload), len(payload))
    with pytest.raises(ValueError, match="fastml drift profile"):
        drift.Profile.from_bytes(header + payload)
    with pytest.raises(ValueError, match="version 9"):
        drift.Profile.from_bytes(b"FMLDRIFT" + struct.pack("<HHIQ", 9, 0, 0, 0))
    with pytest.raises(TypeError, match="data must be bytes"):
        drift.Profile.from_bytes("FMLDRIFT")


# ------------------------------------------------------------------ threads


def test_ingest_releases_the_gil_and_threads_agree():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2_000_000, 4)).astype(np.float32)
    ref = drift.Profile.from_data(x[:10000], mode="sketch")
    p = ref.empty()
    assert progress_during(lambda: p.update(x)) > 1000
    # Two threads updating one profile serialise on its lock: counts add up.
    q = ref.empty()
    threads = [threading.Thread(target=q.update, args=(x[:500_000],)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert q.summary("f0")["count"] == 1_000_000


# ------------------------------------------------------------------ distributed


def _profile_shard(ref_bytes: bytes, shard: np.ndarray) -> bytes:
    from fastml import drift as d

    p = d.Profile.from_bytes(ref_bytes).empty()
    p.update(shard)
    return p.to_bytes()


@pytest.mark.slow
def test_dask_local_cluster_merge_equals_one_process():
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(10)
    data = rng.normal(size=(40_000, 3))
    ref = drift.Profile.from_data(data[:5000])
    shards = np.array_split(data, 4)
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            # Ephemeral ports: a fixed one (the dashboard's 8787) collides with any
            # other Dask cluster on the machine (seen: a second test session).
            scheduler_port=0,
            dashboard_address=":0",
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        futures = [client.submit(_profile_shard, ref.to_bytes(), s, pure=False) for s in shards]
        parts = [drift.Profile.from_bytes(b) for b in client.gather(futures)]
    merged = drift.Profile.merge(parts)
    whole = ref.empty()
    whole.update(data)
    for f in whole.features:
        a, b = merged.summary(f), whole.summary(f)
        np.testing.assert_array_equal(a["hist"], b["hist"])
        assert a["count"] == b["count"] and a["min"] == b["min"] and a["max"] == b["max"]
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-12, abs=1e-15)
        assert a["m2"] == pytest.approx(b["m2"], rel=1e-12)
        np.testing.assert_array_equal(merged.values(f)[0], whole.values(f)[0])


# ------------------------------------------------------------------ GPU ingest


@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300),
    st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=50, unique=True),
)
def test_shared_histogram_slot_matches_numpy(values, edges):
    # The FASTML_HD bin search the CUDA kernel runs, exercised on the CPU.
    e = np.sort(np.asarray(edges))
    v = np.asarray(values)
    want = np.where(
        v < e[0],
        0,
        np.where(v > e[-1], e.size, np.minimum(np.searchsorted(e, v, side="right"), e.size - 1)),
    )
    np.testing.assert_array_equal(_core._drift_bin_slots(v, e), want)


def test_cuda_ingest_without_cuda_says_why():
    if fastml.cuda_available():
        return  # the gpu-marked tests run the kernel
    # CPU-only build: says it was built without CUDA; CUDA build without a GPU: the CUDA error, named.
    want = "drift CUDA ingest" if fastml.build_info()["cuda"] else "built without CUDA"
    with pytest.raises(RuntimeError, match=want):
        _core._drift_ingest_cuda(0, 0, 1, 1, 0, 4, 0, 0, 1, 0.0, 0)
    with pytest.raises(RuntimeError, match=want):
        _core._drift_ingest_cuda_multi([(0, 0, 1, 0, 4, 0, 0, 0.0)], 1, 0, 0, 0, 0, 0, 1, 0)


def test_multi_column_cuda_ingest_checks_its_arguments():
    col = (0, 0, 1, 0, 4, 0, 0, 0.0)
    with pytest.raises(ValueError, match="cols"):
        _core._drift_ingest_cuda_multi([], 1, 0, 0, 0, 0, 0, 1, 0)
    with pytest.raises(ValueError, match="cols"):
        _core._drift_ingest_cuda_multi([col] * 33, 1, 0, 0, 0, 0, 0, 1, 0)
    with pytest.raises(ValueError, match="dtype"):
        _core._drift_ingest_cuda_multi([(0, 2, 1, 0, 4, 0, 0, 0.0)], 1, 0, 0, 0, 0, 0, 1, 0)
    with pytest.raises(ValueError, match="stride"):
        _core._drift_ingest_cuda_multi([(0, 0, 0, 0, 4, 0, 0, 0.0)], 1, 0, 0, 0, 0, 0, 1, 0)
    with pytest.raises(ValueError, match="n"):
        _core._drift_ingest_cuda_multi([col], -1, 0, 0, 0, 0, 0, 1, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "sketch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_ingest_matches_cpu(mode, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    x = rng.normal(3.0, 2.0, size=1_000_003).astype(dtype)
    x[::97] = np.nan
    x[::1013] = np.inf
    ref = drift.Profile.from_data({"x": x[:50_000]}, mode=mode, bins=64)
    cpu = ref.empty()
    cpu.update({"x": x})
    gpu = ref.empty()
    gpu.update({"x": torch.as_tensor(x, device="cuda")})
    a, b = gpu.summary("x"), cpu.summary("x")
    np.testing.assert_array_equal(a["hist"], b["hist"])
    for key in ("count", "missing", "nonfinite", "min", "max"):
        assert a[key] == b[key]
    assert a["mean"] == pytest.approx(b["mean"], rel=1e-12)
    assert a["m2"] == pytest.approx(b["m2"], rel=1e-10)
    if mode == "exact":
        np.testing.assert_array_equal(gpu.values("x")[0], cpu.values("x")[0])


@pytest.mark.gpu
@pytest.mark.parametrize("bins", [1, 64, 1000, 4094])
@pytest.mark.parametrize("n", [1, 5, 1023, 262_147])
def test_cuda_ingest_shapes_bins_and_strides(bins, n):
    """Bin counts on each side of the kernel's shared-memory layouts (per-warp
    histograms and edges in shared memory, one histogram, edges in global
    memory), lengths that leave the unrolled loop's tail, a strided column and
    values on the edges."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(bins + n)
    ref = drift.Profile.from_data({"x": rng.normal(size=20_000)}, mode="histogram", bins=bins)
    edges = np.asarray(ref.summary("x")["edges"])
    x = rng.normal(size=(n, 3))
    x[::5, 1] = edges[rng.integers(0, len(edges), len(x[::5]))]
    x[::11, 1] = np.nan
    x[::13, 1] = -np.inf
    xt = torch.as_tensor(x, device="cuda")[:, 1]  # stride 3
    for col, colt in ((x[:, 1], xt), (x[:, 1].astype(np.float32), xt.float())):
        cpu, gpu = ref.empty(), ref.empty()
        cpu.update({"x": col})
        gpu.update({"x": colt})
        a, b = gpu.summary("x"), cpu.summary("x")
        np.testing.assert_array_equal(a["hist"], b["hist"])
        for key in ("count", "missing", "nonfinite", "min", "max"):
            assert a[key] == b[key], key
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-12, abs=1e-300)


@pytest.mark.gpu
@pytest.mark.parametrize("bins", [16, 4094])
def test_cuda_ingest_many_columns_in_one_launch(bins):
    """40 columns (two launches of up to 32), float32 / float64 / strided /
    integer-valued (fewer edges) side by side, three updates summed on the
    device: bit-identical counts and the CPU path's moments."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(bins)
    n = 100_003
    names = [f"c{i}" for i in range(40)]
    ref_data = {
        k: (
            rng.integers(0, 5, 30_000).astype(np.float64)
            if i % 7 == 0
            else rng.normal(i, 1 + i % 3, 30_000)
        )
        for i, k in enumerate(names)
    }
    ref = drift.Profile.from_data(ref_data, mode="histogram", bins=bins)
    cpu, gpu = ref.empty(), ref.empty()
    for _ in range(3):
        host, dev = {}, {}
        for i, k in enumerate(names):
            if i % 7 == 0:
                v = rng.integers(-1, 7, n).astype(np.float64)
            else:
                v = rng.normal(i, 1 + i % 3, n)
            v[rng.integers(0, n, 50)] = np.nan
            if i % 4 == 1:  # float32 column
                host[k] = v.astype(np.float32)
                dev[k] = torch.as_tensor(host[k], device="cuda")
            elif i % 4 == 2:  # a strided view (stride 2)
                host[k] = v
                dev[k] = torch.as_tensor(np.stack([v, v], 1), device="cuda")[:, 1]
            else:
                host[k], dev[k] = v, torch.as_tensor(v, device="cuda")
        cpu.update(host)
        gpu.update(dev)
    for k in names:
        a, b = gpu.summary(k), cpu.summary(k)
        np.testing.assert_array_equal(a["hist"], b["hist"])
        for key in ("count", "missing", "nonfinite", "min", "max"):
            assert a[key] == b[key], (k, key)
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-12, abs=1e-300)
        assert a["m2"] == pytest.approx(b["m2"], rel=1e-10)


@pytest.mark.parametrize("stride", [1, 3])
def test_float32_vector_path_edges_nonfinite_and_tails(stride):
    # float32 columns take an AVX2 path (8 values per step) where the CPU has
    # it: values exactly on and next to edges (cells holding an edge),
    # non-finite values inside 8-value groups, and lengths that leave tails.
    rng = np.random.default_rng(7)
    ref = drift.Profile.from_data({"x": rng.normal(size=5000).astype(np.float32)}, bins=17)
    edges = np.asarray(ref.summary("x")["edges"])
    e32 = edges.astype(np.float32)
    near = np.concatenate([e32, np.nextafter(e32, np.float32(-np.inf)), np.nextafter(e32, np.inf)])
    for n in (0, 5, 8, 13, 64, 1027, 20_003):
        x = rng.normal(0.1, 1.3, size=n).astype(np.float32)
        if n:
            x[rng.integers(0, n, size=max(1, n // 10))] = rng.choice(near, size=max(1, n // 10))
            x[rng.integers(0, n, size=max(1, n // 50))] = np.nan
            x[rng.integers(0, n, size=max(1, n // 70))] = np.inf
            x[rng.integers(0, n, size=max(1, n // 90))] = -np.inf
            x[rng.integers(0, n, size=max(1, n // 40))] = np.float32(1e30)
        buf = np.empty(n * stride, np.float32)
        buf[::stride] = x
        col = buf[::stride]
        cur = ref.empty()
        cur.update({"x": col})
        got = cur.summary("x")
        want = _numeric_reference(x.astype(np.float64), edges)
        assert got["count"] == want["count"]
        assert got["missing"] == want["missing"]
        assert got["nonfinite"] == want["nonfinite"]
        np.testing.assert_array_equal(got["hist"], want["hist"])
        if want["count"]:
            finite = x.astype(np.float64)[np.isfinite(x)]
            assert got["min"] == finite.min() and got["max"] == finite.max()
            assert got["mean"] == pytest.approx(want["mean"], rel=1e-9, abs=1e-12)


def test_float32_vector_path_at_lo_and_hi_over_many_scales():
    # The vector path clamps the grid cell instead of comparing with lo/hi:
    # values on, just inside and just outside the outer edges, at offsets and
    # widths from 1e-3 to 1e6, must still land in underflow / first / last /
    # overflow exactly as numpy.histogram (plus the outer counts) puts them.
    rng = np.random.default_rng(11)
    for _ in range(150):
        lo = float(rng.normal() * 10.0 ** rng.integers(-3, 7))
        width = float(10 ** rng.uniform(-3, 3))
        edges = np.unique(np.concatenate([[lo, lo + width], lo + width * rng.random(12)]))
        e32 = edges.astype(np.float32)
        near = np.concatenate(
            [e32, np.nextafter(e32, np.float32(np.inf)), np.nextafter(e32, np.float32(-np.inf))]
        )
        x = np.concatenate(
            [rng.choice(near, 300), rng.uniform(lo - 0.2 * width, lo + 1.2 * width, 300)]
        ).astype(np.float32)
        native = _core._DriftProfile.create(["x"], [0], [edges], "none", 400, 1000)
        prof = drift.Profile(native)
        prof.update({"x": x})
        want = _numeric_reference(x.astype(np.float64), edges)
        np.testing.assert_array_equal(prof.summary("x")["hist"], want["hist"])


def _fake_launch_multi(launches: list[int]):
    """A NumPy stand-in for _gpu._launch_multi with the kernel's contract (CPU
    torch tensors: the state's buffers are updated in place)."""

    def fake_launch_multi(state, items, n, blocks):
        assert 1 <= len(items) <= _core._drift_max_multi_columns
        acc = state.acc.numpy()  # CPU tensors: views, updated in place
        hist = state.hist.numpy()
        edges_all = state.edges.numpy()
        for r, t in items:
            assert int(t.shape[0]) == n
            v = t.numpy().astype(np.float64)
            nbins, pivot = state.nbins[r], state.pivots[r]
            e = edges_all[state.edge_off[r] : state.edge_off[r] + nbins + 1]
            fin = v[np.isfinite(v)]
            slot = np.searchsorted(e, fin, side="right")  # [e_i, e_i+1): slot i + 1
            slot[fin == e[-1]] = nbins  # the last bin is closed
            slot = np.where(fin > e[-1], nbins + 1, slot)
            off = state.hist_off[r]
            hist[off : off + nbins + 2] += np.bincount(slot, minlength=nbins + 2)
            d = fin - pivot
            acc[r, :5] += [fin.size, np.isnan(v).sum(), np.isinf(v).sum(), d.sum(), (d * d).sum()]
            if fin.size:
                acc[r, 5] = min(acc[r, 5], fin.min())
                acc[r, 6] = max(acc[r, 6], fin.max())
        launches.append(len(items))

    return fake_launch_multi


def test_gpu_ingest_defers_and_folds_on_read(monkeypatch):
    """Histogram-mode GPU ingests stay on the device, summed over updates, and
    are folded into the profile by the first read (summary, report, bytes,
    copy, merge): no wait per update, and one launch for all columns of a
    batch (up to _drift_max_multi_columns per launch). The kernel is replaced
    here by a NumPy stand-in with its contract (each column's counters added
    to its slice of one int64 buffer, its moments of (x - pivot) into its
    accumulator row) and CPU torch tensors pose as CUDA ones; the real kernel
    is compared with the CPU path in the gpu-marked tests above."""
    torch = pytest.importorskip("torch")
    from fastml.drift import _gpu

    launches: list[int] = []
    fake_launch_multi = _fake_launch_multi(launches)

    def fake_launch(t, edges, nbins, hist, partials, blocks, pivot):  # exact mode: per column
        v = t.numpy().astype(np.float64)
        e = edges.numpy()
        fin = v[np.isfinite(v)]
        slot = np.searchsorted(e, fin, side="right")
        slot[fin == e[-1]] = nbins
        slot = np.where(fin > e[-1], nbins + 1, slot)
        hist.copy_(torch.from_numpy(np.bincount(slot, minlength=nbins + 2).astype(np.int64)))
        part = np.zeros((blocks, 7))
        part[:, 5], part[:, 6] = np.inf, -np.inf
        d = fin - pivot
        part[0] = [
            fin.size,
            np.isnan(v).sum(),
            np.isinf(v).sum(),
            d.sum(),
            (d * d).sum(),
            fin.min() if fin.size else np.inf,
            fin.max() if fin.size else -np.inf,
        ]
        partials.copy_(torch.from_numpy(part.reshape(-1)))

    monkeypatch.setattr(_gpu, "_launch_multi", fake_launch_multi)
    monkeypatch.setattr(_gpu, "_launch", fake_launch)
    monkeypatch.setattr(_gpu, "is_cuda_tensor", lambda obj: isinstance(obj, torch.Tensor))
    rng = np.random.default_rng(3)
    ref = {"a": rng.normal(size=2000), "b": rng.normal(2, 3, size=2000)}
    batches = []
    for k in range(3):
        a = rng.normal(0.2 * k, 1.0, size=777)
        a[::50] = np.nan
        a[3] = np.inf
        batches.append({"a": a, "b": rng.normal(2, 3, size=777)})
    for mode in ("histogram", "exact"):
        host = drift.Profile.from_data(ref, mode=mode)
        dev = host.empty()
        host = host.empty()
        for b in batches:
            host.update(b)
            dev.update({k: torch.from_numpy(v) for k, v in b.items()})
        if mode == "histogram":
            (state,) = dev._pending.values()  # one device: nothing folded yet
            assert state.touched == {0, 1}
        else:
            assert not dev._pending  # exact mode copies values each update
        for name in ("a", "b"):
            hs, ds = host.summary(name), dev.summary(name)
            np.testing.assert_array_equal(hs["hist"], ds["hist"])
            for key in ("count", "missing", "nonfinite", "min", "max"):
                assert hs[key] == ds[key], (mode, name, key)
            np.testing.assert_allclose(ds["mean"], hs["mean"], rtol=1e-12)
            np.testing.assert_allclose(ds["m2"], hs["m2"], rtol=1e-10)
        assert not dev._pending  # the summary folded everything
        # Bytes and copies see folded state too.
        dev.update({k: torch.from_numpy(v) for k, v in batches[0].items()})
        host.update(batches[0])
        assert (
            drift.Profile.from_bytes(dev.to_bytes()).summary("a")["count"]
            == (host.summary("a")["count"])
        )
    assert launches == [2] * 4  # histogram mode: one launch per batch, both columns


def test_gpu_ingest_launches_once_per_32_columns(monkeypatch):
    """A 40-column batch (histogram mode) is two launches (32 + 8 columns),
    each column into its own slices; the folded profile equals the host's."""
    torch = pytest.importorskip("torch")
    from fastml.drift import _gpu

    launches: list[int] = []
    monkeypatch.setattr(_gpu, "_launch_multi", _fake_launch_multi(launches))
    monkeypatch.setattr(_gpu, "is_cuda_tensor", lambda obj: isinstance(obj, torch.Tensor))
    rng = np.random.default_rng(5)
    names = [f"f{i}" for i in range(40)]
    ref = drift.Profile.from_data(
        {k: rng.normal(i, 1, 500) for i, k in enumerate(names)}, mode="histogram", bins=8
    )
    host, dev = ref.empty(), ref.empty()
    for _ in range(2):
        batch = {k: rng.normal(i, 1.5, 300) for i, k in enumerate(names)}
        host.update(batch)
        dev.update({k: torch.from_numpy(v) for k, v in batch.items()})
    assert launches == [32, 8, 32, 8]
    for k in names:
        hs, ds = host.summary(k), dev.summary(k)
        np.testing.assert_array_equal(hs["hist"], ds["hist"])
        assert (hs["count"], hs["min"], hs["max"]) == (ds["count"], ds["min"], ds["max"])
        np.testing.assert_allclose(ds["mean"], hs["mean"], rtol=1e-12)
