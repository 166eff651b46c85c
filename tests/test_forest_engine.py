"""The Forest CPU engine's traversal paths against a NumPy reference walk.

The engine picks a path per forest (``ForestCore.engine``):

- ``binned-perfect``: thresholds quantised to per-feature bins, trees padded to
  complete trees; AVX2 walks the top levels across 16 rows (``forest_simd``);
- ``binned``: the same bins on an explicit-children layout (deep, unbalanced trees);
- ``float``: float compares on a doubled NaN -> -inf/+inf copy (too many
  distinct thresholds on a feature for 16-bit bins);
- ``general``: per-node NaN tests (e.g. a +inf threshold on the float path).

Every path must give the reference's margins bit for bit: thresholds and
inputs are compared in the forest's threshold type (float32 or float64), NaN
takes the node's default direction, and leaves are added in tree order in the
accumulation type. Inputs are drawn at every threshold and one ULP either
side, plus NaN, +-inf, -0.0 and random values.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastml import _core

DEFAULT_LEFT = 1 << 31


@contextmanager
def _simd(enabled: bool):
    before = _core.forest_simd()
    _core.forest_simd(enabled)
    try:
        yield
    finally:
        _core.forest_simd(before)


def _random_tree(rng, max_depth: int, chain: bool, pool: np.ndarray, nf: int, p_stop: float = 0.2):
    """One tree as local arrays (feature, threshold, left, right, flags)."""
    feature, thr, left, right, flags = [], [], [], [], []

    def add(depth: int) -> int:
        i = len(feature)
        feature.append(-1)
        thr.append(0.0)
        left.append(-1)
        right.append(-1)
        flags.append(0)
        # A chain tree grows one side deep (the explicit-children layout);
        # otherwise leaves appear at random depths (padding on the perfect layout).
        stop = depth >= max_depth or (not chain and depth > 0 and rng.random() < p_stop)
        if stop:
            return i
        feature[i] = int(rng.integers(0, nf))
        thr[i] = float(pool[rng.integers(0, len(pool))])
        flags[i] = DEFAULT_LEFT if rng.random() < 0.5 else 0
        if chain and rng.random() < 0.5:
            r = add(max_depth)  # a leaf on one side
            lft = add(depth + 1)
            left[i], right[i] = lft, r
        else:
            lft = add(depth + 1)
            r = add(depth + 1)
            left[i], right[i] = lft, r
        return i

    add(0)
    return feature, thr, left, right, flags


def _spec(trees, nf: int, k: int, groups, thr_f64: bool, acc_f64: bool, rng):
    offsets = [0]
    cols = {n: [] for n in ("feature", "thr", "left", "right", "flags")}
    values = []
    for (feature, thr, left, right, flags), g in zip(trees, groups, strict=True):
        n = len(feature)
        offsets.append(offsets[-1] + n)
        cols["feature"] += feature
        cols["thr"] += thr
        cols["left"] += left
        cols["right"] += right
        cols["flags"] += flags
        width = 1 if g >= 0 else k
        values += list(rng.normal(size=n * width))
    n = offsets[-1]
    return {
        "num_features": nf,
        "num_outputs": k,
        "threshold_f64": thr_f64,
        "accum_f64": acc_f64,
        "link": 0,
        "divisor": 1.0,
        "divide_margin": True,
        "cat_lo": 0.0,
        "cat_hi": 2.0**31,
        "cat_integral": False,
        "objective": "test",
        "metadata": "{}",
        "tree_node_offsets": np.array(offsets, np.int64),
        "tree_group": np.array(groups, np.int32),
        "node_feature": np.array(cols["feature"], np.int32),
        "node_threshold": np.array(cols["thr"], np.float64),
        "node_left": np.array(cols["left"], np.int32),
        "node_right": np.array(cols["right"], np.int32),
        "node_flags": np.array(cols["flags"], np.uint32),
        "node_cat": np.full(n, -1, np.int32),
        "cat_offsets": np.array([0], np.int64),
        "cat_bits": np.zeros(0, np.uint32),
        "leaf_values": np.array(values, np.float64),
        "base_margin": rng.normal(size=k),
    }


def _reference(spec, X: np.ndarray) -> np.ndarray:
    """Margins by walking every tree with NumPy, in the spec's arithmetic."""
    tdt = np.float64 if spec["threshold_f64"] else np.float32
    adt = np.float64 if spec["accum_f64"] else np.float32
    Xc = X.astype(tdt)  # inputs are rounded to the threshold type first
    rows = len(X)
    k = spec["num_outputs"]
    out = np.tile(spec["base_margin"].astype(adt), (rows, 1))
    offs = spec["tree_node_offsets"]
    values = spec["leaf_values"].astype(adt)
    vpos = 0
    ar = np.arange(rows)
    for t in range(len(offs) - 1):
        a, b = offs[t], offs[t + 1]
        feat = spec["node_feature"][a:b]
        thr = spec["node_threshold"][a:b].astype(tdt)
        left = spec["node_left"][a:b]
        right = spec["node_right"][a:b]
        dleft = (spec["node_flags"][a:b] & DEFAULT_LEFT) != 0
        cur = np.zeros(rows, np.int64)
        while True:
            inner = left[cur] >= 0
            if not inner.any():
                break
            x = Xc[ar, np.maximum(feat[cur], 0)]
            with np.errstate(invalid="ignore"):
                go_left = np.where(np.isnan(x), dleft[cur], x <= thr[cur])
            cur = np.where(inner, np.where(go_left, left[cur], right[cur]), cur)
        g = spec["tree_group"][t]
        n = b - a
        if g >= 0:
            out[:, g] = (out[:, g] + values[vpos + cur]).astype(adt)
            vpos += n
        else:
            out = (out + values[vpos + cur[:, None] * k + np.arange(k)]).astype(adt)
            vpos += n * k
    return out[:, 0] if k == 1 else out


def _edge_inputs(spec, rows: int, rng, dtype) -> np.ndarray:
    """Values at every threshold and one ULP either side, NaN, +-inf, -0.0."""
    tdt = np.float64 if spec["threshold_f64"] else np.float32
    nf = spec["num_features"]
    inner = spec["node_left"] >= 0
    cand = {}
    for f in range(nf):
        t = spec["node_threshold"][inner & (spec["node_feature"] == f)].astype(tdt)
        t = t[np.isfinite(t)]
        cand[f] = np.concatenate(
            [
                t,
                np.nextafter(t, tdt(-np.inf)),
                np.nextafter(t, tdt(np.inf)),
                np.array([np.nan, np.inf, -np.inf, -0.0, 0.0], tdt),
                rng.normal(size=4).astype(tdt),
            ]
        )
    X = np.empty((rows, nf), np.float64)
    for f in range(nf):
        X[:, f] = rng.choice(cand[f], size=rows)
    return X.astype(dtype)


POOL = np.array([-np.inf, -1.5, -0.0, 0.0, 1e-30, 0.25, 0.5, 0.5, 1.0, 3.0, np.inf])


def _leaves(tree) -> int:
    return sum(f == -1 for f in tree[0])


def _check_all_paths(spec, X: np.ndarray) -> None:
    core = _core.ForestCore(spec)
    ref = _reference(spec, X)
    for simd in (True, False):
        with _simd(simd):
            np.testing.assert_array_equal(core.predict(X, False), ref)
    # Rows one at a time take the single-row walk.
    for i in range(0, len(X), max(1, len(X) // 9)):
        np.testing.assert_array_equal(core.predict(X[i : i + 1], False), ref[i : i + 1])
    _check_cuda_kernel(core, X, ref)


def _check_cuda_kernel(core, X: np.ndarray, ref: np.ndarray) -> None:
    """The CUDA kernel's blocks, run on the host (forest_block.hpp): its binned
    layout (perfect or explicit, as the CPU engine's) and its general layout,
    with the launch shapes of a 1-SM device (32 rows per block, several tiles
    of trees) and of a 132-SM one (1-row blocks for small batches)."""
    binned = {"binned-perfect": "perfect", "binned-qs": "explicit", "binned": "explicit"}
    for general in (False, True):
        for sm_count in (1, 132):
            out, layout = core.emulate_cuda(X, False, sm_count, general)
            assert layout == ("general" if general else binned.get(core.engine, "general"))
            np.testing.assert_array_equal(out, ref, err_msg=f"{layout} sm_count={sm_count}")


@given(
    seed=st.integers(0, 2**32 - 1),
    thr_f64=st.booleans(),
    acc_f64=st.booleans(),
    k=st.sampled_from([1, 3]),
    x_f64=st.booleans(),
    rows=st.sampled_from([1, 5, 16, 17, 40, 255, 256, 257, 530]),
)
def test_binned_paths_match_reference(seed, thr_f64, acc_f64, k, x_f64, rows):
    rng = np.random.default_rng(seed)
    nf = int(rng.integers(1, 6))
    pool = np.concatenate([POOL, rng.normal(size=6)])
    if not thr_f64:
        pool = pool.astype(np.float32).astype(np.float64)
    ntrees = int(rng.integers(1, 24))
    chain = bool(rng.random() < 0.3)
    max_depth = int(rng.integers(17, 24)) if chain else int(rng.integers(0, 9))
    trees = [_random_tree(rng, max_depth, chain, pool, nf) for _ in range(ntrees)]
    groups = [int(rng.integers(-1, k)) for _ in range(ntrees)]
    spec = _spec(trees, nf, k, groups, thr_f64, acc_f64, rng)
    core = _core.ForestCore(spec)
    if chain and core.max_depth > 16:  # the explicit layout; QuickScorer when trees are small
        expect = "binned-qs" if max(_leaves(t) for t in trees) <= 32 else "binned"
    else:
        expect = "binned-perfect"
    assert core.engine == expect
    X = _edge_inputs(spec, rows, rng, np.float64 if x_f64 else np.float32)
    _check_all_paths(spec, X)


@pytest.mark.parametrize("thr_f64", [False, True])
@pytest.mark.parametrize("x_f64", [False, True])
def test_compare_binning_at_every_cut_count(thr_f64, x_f64):
    """Features with 2..400 distinct thresholds: up to 256 cuts are binned by
    vector compares (16 fences, then a group of 16), more by the search; both
    must put every input (each cut, one ULP either side, NaN, +-inf, +-0,
    subnormals) in the same bin, with and without SIMD."""
    rng = np.random.default_rng(11 + 2 * thr_f64 + x_f64)
    counts = [2, 15, 16, 17, 31, 32, 33, 100, 255, 256, 257, 400]
    trees, groups = [], []
    for f, count in enumerate(counts):
        thr = np.unique(rng.normal(size=count) * 10.0 ** rng.integers(-3, 4, size=count))
        thr[:2] = [-0.0, 1e-40] if count > 2 else thr[:2]
        if not thr_f64:
            thr = thr.astype(np.float32).astype(np.float64)
        for t in np.unique(thr):
            flag = DEFAULT_LEFT if rng.random() < 0.5 else 0
            trees.append(
                ([f, -1, -1], [float(t), 0.0, 0.0], [1, -1, -1], [2, -1, -1], [flag, 0, 0])
            )
            groups.append(0)
    nf = len(counts)
    spec = _spec(trees, nf, 1, groups, thr_f64, True, rng)
    core = _core.ForestCore(spec)
    assert core.engine == "binned-perfect"
    X = _edge_inputs(spec, 3000, rng, np.float64 if x_f64 else np.float32)
    X[::97] = np.float32(1e-42) if not x_f64 else 5e-320  # subnormals
    _check_all_paths(spec, X)


def _small_deep_tree(rng, leaves: int, pool: np.ndarray, nf: int):
    """A tree with exactly `leaves` leaves grown leaf-wise (LightGBM style):
    each split takes a random current leaf, so depths vary from 1 to ~leaves."""
    feature, thr, left, right, flags = [-1], [0.0], [-1], [-1], [0]
    open_leaves = [0]
    while len(open_leaves) < leaves:
        i = open_leaves.pop(int(rng.integers(0, len(open_leaves))))
        feature[i] = int(rng.integers(0, nf))
        thr[i] = float(pool[rng.integers(0, len(pool))])
        flags[i] = DEFAULT_LEFT if rng.random() < 0.5 else 0
        for side in (left, right):
            side[i] = len(feature)
            open_leaves.append(len(feature))
            feature.append(-1)
            thr.append(0.0)
            left.append(-1)
            right.append(-1)
            flags.append(0)
    return feature, thr, left, right, flags


@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.sampled_from([1, 3]),
    x_f64=st.booleans(),
    rows=st.sampled_from([2, 7, 8, 9, 16, 63, 256, 257, 700]),
)
def test_quickscorer_path_matches_reference(seed, k, x_f64, rows):
    """Forests of leaf-wise trees with at most 32 leaves (LightGBM's defaults
    grow 31) off the perfect layout take QuickScorer (eight rows share a scan
    of each column's nodes, sorted by threshold); a tree of 33 leaves sends
    the forest back to the walk. Both against the reference, SIMD on and off,
    with several outputs and vector leaves, missing values either way."""
    rng = np.random.default_rng(seed)
    nf = int(rng.integers(1, 7))
    pool = np.concatenate([POOL, rng.normal(size=8)]).astype(np.float32).astype(np.float64)
    ntrees = int(rng.integers(1, 40))
    trees = [_small_deep_tree(rng, int(rng.integers(1, 33)), pool, nf) for _ in range(ntrees)]
    # One deep chain (at most 32 leaves) keeps the forest off the perfect layout.
    trees.append(_small_deep_tree(rng, 2, pool, nf))
    chain = _random_tree(rng, 20, True, pool, nf)
    if _leaves(chain) <= 32:
        trees.append(chain)
    big = rng.random() < 0.25
    if big:
        trees.append(_small_deep_tree(rng, 33, pool, nf))
    groups = [int(rng.integers(-1, k)) for _ in range(len(trees))]
    spec = _spec(trees, nf, k, groups, False, bool(rng.random() < 0.5), rng)
    core = _core.ForestCore(spec)
    if core.engine != "binned-perfect":
        assert core.engine == ("binned" if big else "binned-qs")
    _check_all_paths(spec, _edge_inputs(spec, rows, rng, np.float64 if x_f64 else np.float32))


def test_each_path_is_taken_and_exact():
    rng = np.random.default_rng(7)
    pool32 = POOL.astype(np.float32).astype(np.float64)
    # Balanced, shallow: the perfect layout.
    trees = [_random_tree(rng, 6, False, pool32, 3) for _ in range(40)]
    spec = _spec(trees, 3, 1, [0] * 40, False, False, rng)
    assert _core.ForestCore(spec).engine == "binned-perfect"
    _check_all_paths(spec, _edge_inputs(spec, 700, rng, np.float32))

    # Deeper perfect trees (9..16 levels): the single-row layout's blocks of
    # four levels, with a partial last block, and several of them.
    for depth in (9, 11, 13, 16):
        trees = [_random_tree(rng, depth, False, pool32, 3, p_stop=0.01) for _ in range(3)]
        trees.append(_random_tree(rng, 3, False, pool32, 3))  # mixed depths in a lane group
        spec = _spec(trees, 3, 2, [0, 1, -1, 0], False, True, rng)
        core = _core.ForestCore(spec)
        assert core.engine == "binned-perfect"
        assert core.max_depth == depth
        _check_all_paths(spec, _edge_inputs(spec, 90, rng, np.float32))
    trees = [_random_tree(rng, 8, False, pool32, 3, p_stop=0.0) for _ in range(37)]
    spec = _spec(trees, 3, 1, [0] * 37, False, False, rng)  # equal depths: the common row walk
    _check_all_paths(spec, _edge_inputs(spec, 64, rng, np.float32))

    # One side 30 deep: padding to a complete tree would not pay.
    trees = [_random_tree(rng, 30, True, pool32, 3) for _ in range(5)]
    spec = _spec(trees, 3, 1, [0] * 5, True, True, rng)
    small = max(_leaves(t) for t in trees) <= 32
    assert _core.ForestCore(spec).engine == ("binned-qs" if small else "binned")
    _check_all_paths(spec, _edge_inputs(spec, 300, rng, np.float64))
    # The explicit layout's AVX2 top levels: trees shallower than the four
    # top levels (0 to 3 deep), leaves above the fourth level, bushy trees
    # deeper than it, next to a chain that keeps the forest off the perfect
    # layout; row counts around multiples of 16.
    trees = [_random_tree(rng, 30, True, pool32, 3)]
    trees += [_random_tree(rng, d, False, pool32, 3, p_stop=0.0) for d in (0, 1, 2, 3)]
    trees += [_random_tree(rng, d, False, pool32, 3, p_stop=0.3) for d in (4, 6, 9, 12)]
    spec = _spec(trees, 3, 2, [0, 1, -1, 0, 1, 0, -1, 1, 0], False, True, rng)
    small = max(_leaves(t) for t in trees) <= 32
    assert _core.ForestCore(spec).engine == ("binned-qs" if small else "binned")
    for rows in (15, 16, 17, 48, 300):
        _check_all_paths(spec, _edge_inputs(spec, rows, rng, np.float32))

    # A complete tree of depth 16 with 65535 distinct thresholds on one
    # feature: more than the 16-bit bins hold, so the float path.
    depth = 16
    n_inner = (1 << depth) - 1
    n = 2 * n_inner + 1
    idx = np.arange(n)
    inner = idx < n_inner
    thr = np.zeros(n)
    thr[:n_inner] = rng.permutation(n_inner) * 0.5 - 1000.0
    spec = _spec([], 2, 1, [], False, False, rng)
    spec.update(
        tree_node_offsets=np.array([0, n], np.int64),
        tree_group=np.array([0], np.int32),
        node_feature=np.where(inner, 0, -1).astype(np.int32),
        node_threshold=thr,
        node_left=np.where(inner, 2 * idx + 1, -1).astype(np.int32),
        node_right=np.where(inner, 2 * idx + 2, -1).astype(np.int32),
        node_flags=np.where(idx % 3 == 0, DEFAULT_LEFT, 0).astype(np.uint32),
        node_cat=np.full(n, -1, np.int32),
        leaf_values=rng.normal(size=n),
    )
    assert _core.ForestCore(spec).engine == "float"
    X = _edge_inputs(spec, 400, rng, np.float32)
    _check_all_paths(spec, X)

    # The same with a +inf threshold: the float path cannot map NaN to +inf,
    # so the general walk.
    spec["node_threshold"] = spec["node_threshold"].copy()
    spec["node_threshold"][5] = np.inf
    assert _core.ForestCore(spec).engine == "general"
    _check_all_paths(spec, X)


def test_simd_switch_reports_and_restores():
    before = _core.forest_simd()
    try:
        assert _core.forest_simd(False) is False
        assert _core.forest_simd() is False
        on = _core.forest_simd(True)
        # On only where the CPU has AVX2 (x86-64).
        import fastml

        assert on == ("avx2" in fastml.build_info()["simd"])
    finally:
        _core.forest_simd(before)


def test_strided_and_converted_inputs_on_the_binned_path():
    rng = np.random.default_rng(3)
    pool = np.concatenate([POOL, rng.normal(size=6)])
    trees = [_random_tree(rng, 7, False, pool, 4) for _ in range(12)]
    spec = _spec(trees, 4, 1, [0] * 12, True, True, rng)
    core = _core.ForestCore(spec)
    assert core.engine == "binned-perfect"
    big = _edge_inputs(spec, 600, rng, np.float64)
    wide = np.zeros((600, 9))
    wide[:, ::2][:, :4] = big  # every other column: a non-unit column stride
    view = wide[::1, 0:8:2]
    np.testing.assert_array_equal(core.predict(view, False), _reference(spec, big))
    rev = big[::-1]  # negative row stride
    np.testing.assert_array_equal(core.predict(rev, False), _reference(spec, rev.copy()))
    f32 = big.astype(np.float32)  # float32 inputs compared in float64
    np.testing.assert_array_equal(core.predict(f32, False), _reference(spec, f32))


@pytest.mark.parametrize("rows", [1, 300])
def test_output_parameter_unchanged_by_engine(rows):
    rng = np.random.default_rng(11)
    trees = [_random_tree(rng, 5, False, POOL, 2) for _ in range(6)]
    spec = _spec(trees, 2, 3, [0, 1, 2, -1, 0, 1], False, True, rng)
    core = _core.ForestCore(spec)
    X = _edge_inputs(spec, rows, rng, np.float32)
    out = np.empty((rows, 3), np.float64)
    res = core.predict(X, False, out)
    assert res is out or np.shares_memory(res, out)
    np.testing.assert_array_equal(out, _reference(spec, X))
