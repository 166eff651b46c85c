"""ADWIN, Page-Hinkley and DDM detect at the same indices as River's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastml import drift

river_drift = pytest.importorskip("river.drift")
river_binary = pytest.importorskip("river.drift.binary")


def _river_indices(det, values):
    out = []
    for i, v in enumerate(values):
        det.update(v)
        if det.drift_detected:
            out.append(i)
    return out


@st.composite
def streams(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 1500))
        kind = draw(st.sampled_from(["normal", "binary", "ints"]))
        if kind == "normal":
            parts.append(rng.normal(draw(st.floats(-5, 5)), draw(st.floats(0.01, 3)), size=n))
        elif kind == "binary":
            parts.append((rng.random(n) < draw(st.floats(0, 1))).astype(np.float64))
        else:
            parts.append(rng.integers(0, 8, size=n).astype(np.float64))
    return np.concatenate(parts)


@given(
    streams(), st.sampled_from([0.002, 0.01, 0.1]), st.sampled_from([1, 8, 32]), st.integers(1, 3)
)
def test_adwin_matches_river(values, delta, clock, chunks):
    ours = drift.ADWIN(delta=delta, clock=clock)
    got = []
    offset = 0
    for part in np.array_split(values, chunks):  # whole arrays per call, any split
        got.extend((ours.update(part) + offset).tolist())
        offset += part.size
    assert got == _river_indices(river_drift.ADWIN(delta=delta, clock=clock), values.tolist())


def test_adwin_long_stream_matches_river():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(m, 1, 20000) for m in (0, 0.5, -0.5, 2, 2)])
    ours = drift.ADWIN().update(values).tolist()
    assert ours == _river_indices(river_drift.ADWIN(), values.tolist())
    assert len(ours) >= 3


@given(streams(), st.sampled_from(["both", "up", "down"]), st.sampled_from([5.0, 20.0, 50.0]))
def test_page_hinkley_matches_river(values, mode, threshold):
    ours = drift.PageHinkley(threshold=threshold, mode=mode).update(values).tolist()
    theirs = _river_indices(
        river_drift.PageHinkley(threshold=threshold, mode=mode), values.tolist()
    )
    assert ours == theirs


@given(st.integers(0, 2**32 - 1), st.floats(0.0, 0.5), st.floats(0.0, 1.0), st.integers(10, 3000))
def test_ddm_matches_river(seed, p0, p1, n):
    rng = np.random.default_rng(seed)
    values = np.r_[rng.random(n) < p0, rng.random(n) < p1].astype(np.float64)
    ours = drift.DDM()
    got = ours.update(values).tolist()
    det = river_binary.DDM()
    theirs, warns = [], []
    for i, v in enumerate(values.tolist()):
        det.update(bool(v))
        if det.drift_detected:
            theirs.append(i)
        if det.warning_detected:
            warns.append(i)
    assert got == theirs
    assert ours.warnings.tolist() == warns


def test_detector_inputs_are_validated():
    with pytest.raises(ValueError, match="delta must be in"):
        drift.ADWIN(delta=0)
    with pytest.raises(ValueError, match="values must be 1-D"):
        drift.ADWIN().update(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        drift.PageHinkley().update([1.0, np.nan])
    with pytest.raises(ValueError, match="mode must be"):
        drift.PageHinkley(mode="sideways")
    with pytest.raises(ValueError, match="0/1 errors"):
        drift.DDM().update([0.5])
    with pytest.raises(TypeError, match="values must be numeric"):
        drift.ADWIN().update(["a"])
    assert drift.ADWIN().update(np.zeros(0)).tolist() == []


@given(
    streams(),
    st.sampled_from([2, 3, 5, 9]),
    st.sampled_from([1, 5, 40]),
    st.sampled_from([0, 10, 200]),
    st.sampled_from([1, 4, 32]),
)
def test_adwin_parameters_and_window_match_river(values, max_buckets, min_window, grace, clock):
    # The vectorised split scan must decide exactly as River's scalar loop:
    # same indices and, after every value, the same window width and mean.
    kw = dict(
        delta=0.05,
        clock=clock,
        max_buckets=max_buckets,
        min_window_length=min_window,
        grace_period=grace,
    )
    ours = drift.ADWIN(**kw)
    theirs = river_drift.ADWIN(**kw)
    want = []
    for i, v in enumerate(values.tolist()):
        theirs.update(v)
        if theirs.drift_detected:
            want.append(i)
    assert ours.update(values).tolist() == want
    assert ours.width == theirs.width
    assert ours.estimation == theirs.estimation
