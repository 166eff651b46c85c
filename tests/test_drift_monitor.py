"""fastml.drift.Monitor and Report: defaults, windows, callbacks, exports, HTML."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import scipy.stats as ss
from hypothesis import given
from hypothesis import strategies as st

from fastml import drift


def _data(n, shift=0.0, seed=0, p=(0.5, 0.3, 0.2)):
    rng = np.random.default_rng(seed)
    return {
        "num": rng.normal(shift, 1.0, size=n),
        "other": rng.normal(size=n),
        "cat": rng.choice(["a", "b", "c"], size=n, p=list(p)),
    }


def test_defaults_follow_reference_size():
    small = drift.Monitor(drift.Profile.from_data(_data(1000)))
    assert small.tests == {"num": "ks", "other": "ks", "cat": "chi2"}
    assert small.thresholds == {"num": 0.05, "other": 0.05, "cat": 0.05}
    big = drift.Monitor(drift.Profile.from_data(_data(1001)))
    assert big.tests == {"num": "wasserstein", "other": "wasserstein", "cat": "js"}
    assert big.thresholds == {"num": 0.1, "other": 0.1, "cat": 0.1}
    custom = drift.Monitor(
        drift.Profile.from_data(_data(50)),
        tests={"num": "psi"},
        thresholds={"num": 0.3, "cat": 0.01},
    )
    assert custom.tests["num"] == "psi" and custom.thresholds == {
        "num": 0.3,
        "other": 0.05,
        "cat": 0.01,
    }


def test_report_values_match_scipy_in_exact_mode():
    ref_data, cur_data = _data(800, seed=1), _data(600, shift=0.4, seed=2, p=(0.2, 0.3, 0.5))
    mon = drift.Monitor(drift.Profile.from_data(ref_data))
    mon.update(cur_data)
    rep = mon.report()
    num = rep.features["num"]
    ks = ss.ks_2samp(ref_data["num"], cur_data["num"])
    assert (
        num.test == "ks"
        and num.statistic == ks.statistic
        and num.p_value == pytest.approx(ks.pvalue, rel=1e-10)
    )
    assert num.status == "drift" and num.bound == 0
    w = ss.wasserstein_distance(ref_data["num"], cur_data["num"])
    assert num.metrics["wasserstein"] == pytest.approx(w, rel=1e-12)
    assert num.metrics["wasserstein_norm"] == pytest.approx(w / ref_data["num"].std(), rel=1e-9)
    assert rep.features["other"].status == "ok"
    cat = rep.features["cat"]
    counts = lambda d: [np.sum(d["cat"] == k) for k in "abc"]  # noqa: E731
    stat, p, _, _ = ss.chi2_contingency([counts(ref_data), counts(cur_data)])
    assert cat.statistic == pytest.approx(stat, rel=1e-12) and cat.p_value == pytest.approx(
        p, rel=1e-9
    )
    assert cat.status == "drift"
    assert rep.drifted_features == ["num", "cat"] and rep.dataset_drift
    assert rep.drift_share == pytest.approx(2 / 3)


def test_new_categories_missing_rates_and_no_data():
    ref = drift.Profile.from_data(
        {"c": np.array(["a", "b"] * 50, dtype=object), "x": np.arange(100.0)}
    )
    mon = drift.Monitor(ref)
    rep = mon.report()
    assert {r.status for r in rep.features.values()} == {"no_data"} and not rep.dataset_drift
    x = np.arange(40.0)
    x[:10] = np.nan
    mon.update({"c": np.array(["a"] * 20 + ["z"] * 10 + [None] * 10, dtype=object), "x": x})
    c = mon.report().features["c"]
    assert c.metrics["new_category_share"] == pytest.approx(10 / 30)
    assert c.metrics["missing_rate_change"] == pytest.approx(10 / 40)
    assert mon.report().features["x"].metrics["missing_rate_change"] == pytest.approx(10 / 40)


def test_tumbling_windows_split_batches_exactly():
    ref = drift.Profile.from_data(_data(2000))
    mon = drift.Monitor(ref, window=300)
    mon.update(_data(500, seed=3))
    mon.update(_data(500, seed=4))
    assert len(mon.windows) == 3
    assert mon.current.rows == 100
    assert [w.current_rows for w in mon.windows] == [300, 300, 300]
    # The second window holds rows 300..599 of the concatenated stream.
    stream = np.r_[_data(500, seed=3)["num"], _data(500, seed=4)["num"]]
    one = ref.empty()
    one.update({k: v[300:600] for k, v in {**_data(1000), "num": stream}.items()})
    assert mon.windows[1].features["num"].metrics["current_mean"] == pytest.approx(
        stream[300:600].mean()
    )
    mon.rollover()
    assert len(mon.windows) == 4 and mon.current.rows == 0
    mon.reset()
    assert mon.windows == [] and mon.current.rows == 0


def test_decayed_window_weights_recent_rows():
    ref = drift.Profile.from_data({"x": np.zeros(10) + np.arange(10)})
    mon = drift.Monitor(ref, window=drift.Window(half_life=100))
    mon.update({"x": np.full(100, 1.0)})
    mon.update({"x": np.full(100, 9.0)})
    cur = mon.current
    assert cur.rows == pytest.approx(150.0)  # 100 * 0.5 + 100
    s = cur.summary("x")
    assert s["count"] == pytest.approx(150.0)
    assert s["hist"].sum() == pytest.approx(150.0)
    with pytest.raises(ValueError, match="half_life"):
        drift.Window(half_life=-1)
    with pytest.raises(ValueError, match="rows or half_life"):
        drift.Window(rows=3, half_life=2)


def test_on_drift_fires_once_when_a_feature_starts_to_drift():
    calls = []
    mon = drift.Monitor(
        drift.Profile.from_data(_data(500)), on_drift=lambda n, r: calls.append((n, r.status))
    )
    mon.update(_data(200, seed=5))
    assert calls == []
    mon.update(_data(400, shift=2.0, seed=6))
    assert ("num", "drift") in calls
    n = len(calls)
    mon.update(_data(400, shift=2.0, seed=7))
    assert len(calls) == n  # still drifting: no new call


def test_on_drift_with_tumbling_windows_judges_closed_windows_only():
    calls = []
    mon = drift.Monitor(
        drift.Profile.from_data(_data(500)),
        window=300,
        on_drift=lambda n, r: calls.append(n),
    )
    mon.update(_data(100, shift=3.0, seed=8))  # a partial window: no verdict yet
    assert calls == []
    mon.update(_data(200, shift=3.0, seed=9))  # closes the window of 300 drifted rows
    assert "num" in calls
    assert len(mon.windows) == 1 and mon.windows[0].features["num"].drifted


def test_bad_batches_raise_clear_errors():
    mon = drift.Monitor(drift.Profile.from_data(_data(100)))
    with pytest.raises(ValueError, match="missing \\['cat'\\]"):
        mon.update({"num": [1.0], "other": [1.0]})
    with pytest.raises(TypeError, match="column 'num' is numeric"):
        mon.update({"num": ["x"], "other": [1.0], "cat": ["a"]})
    with pytest.raises(ValueError, match="tests\\['cat'\\] must be one of"):
        drift.Monitor(drift.Profile.from_data(_data(100)), tests={"cat": "ks"})
    with pytest.raises(ValueError, match="unknown feature 'zz'"):
        drift.Monitor(drift.Profile.from_data(_data(100)), thresholds={"zz": 0.1})
    with pytest.raises(TypeError, match=r"reference must be a drift\.Profile"):
        drift.Monitor({"a": [1]})
    mon.update({"num": np.zeros(0), "other": np.zeros(0), "cat": np.array([], dtype=str)})
    assert mon.current.rows == 0


def test_to_dict_json_and_prometheus():
    prometheus_client = pytest.importorskip("prometheus_client")
    mon = drift.Monitor(drift.Profile.from_data(_data(500)))
    mon.update(_data(500, shift=1.0, seed=8))
    rep = mon.report()
    d = json.loads(rep.to_json())
    assert d == json.loads(json.dumps(rep.to_dict()))
    assert d["features"]["num"]["status"] == "drift" and d["dataset_drift"] is False
    reg = rep.to_prometheus()
    assert reg.get_sample_value("fastml_drift_detected", {"feature": "num"}) == 1.0
    assert reg.get_sample_value("fastml_drift_detected", {"feature": "other"}) == 0.0
    assert (
        reg.get_sample_value("fastml_drift_pvalue", {"feature": "num", "test": "ks"})
        == rep.features["num"].p_value
    )
    assert reg.get_sample_value("fastml_drift_share") == pytest.approx(1 / 3)
    text = prometheus_client.generate_latest(reg).decode()
    assert 'fastml_drift_statistic{feature="cat",test="chi2"}' in text


def test_html_report_is_self_contained(tmp_path):
    mon = drift.Monitor(drift.Profile.from_data(_data(500)))
    mon.update(_data(500, shift=1.0, seed=9))
    path = mon.report().to_html(tmp_path / "r.html")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert "<svg" in text and 'id="summary"' in text
    for banned in ("http://", "https://", "<script", "src="):
        assert banned not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_html_report_renders_in_headless_chromium(tmp_path):
    mon = drift.Monitor(drift.Profile.from_data(_data(500)))
    mon.update(_data(500, shift=1.0, seed=10))
    path = mon.report().to_html(tmp_path / "report.html")
    # Chromium must not inherit a sanitizer LD_PRELOAD from the test environment.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    base = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", f"file://{path}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The DOM after parsing: the summary table rows and one SVG per feature with bars.
    assert dom.stdout.count("<tr>") >= 3 and dom.stdout.count("<svg") == 3
    assert 'class="ref"' in dom.stdout and 'class="cur"' in dom.stdout
    shot = tmp_path / "shot.png"
    r = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1000,1400", f"file://{path}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# ------------------------------------------------------------------ data quality


def _frame(rng, n, missing=0.02, cats=("a", "b", "c"), new_share=0.0):
    x = rng.normal(size=n)
    x[rng.random(n) < missing] = np.nan
    c = np.array(cats)[rng.integers(0, len(cats), n)].astype(object)
    c[rng.random(n) < new_share] = "never_seen"
    return {"x": x, "c": c}


def test_missing_rate_change_is_drift():
    rng = np.random.default_rng(20)
    ref = drift.Profile.from_data(_frame(rng, 20_000), categorical=["c"])
    mon = drift.Monitor(ref)
    mon.update(_frame(rng, 5_000, missing=0.30))
    rep = mon.report()
    r = rep.features["x"]
    assert r.status == "drift" and r.reasons == ["missing_rate"], r.to_dict()
    assert r.distribution_status == "ok"
    q = r.quality[0]
    assert q.check == "missing_rate" and q.reference == pytest.approx(0.02, abs=0.005)
    assert q.current == pytest.approx(0.30, abs=0.02) and q.p_value < 1e-12
    assert "x" in rep.drifted_features
    assert rep.to_dict()["features"]["x"]["reasons"] == ["missing_rate"]
    # A tiny change in a large window is significant but below the minimum change: ok.
    mon2 = drift.Monitor(ref)
    mon2.update(_frame(rng, 200_000, missing=0.025))
    assert mon2.report().features["x"].status == "ok"


def test_all_missing_column_is_drift_not_no_data():
    rng = np.random.default_rng(21)
    ref = drift.Profile.from_data(_frame(rng, 5_000), categorical=["c"])
    mon = drift.Monitor(ref)
    batch = _frame(rng, 1_000)
    batch["x"][:] = np.nan
    mon.update(batch)
    r = mon.report().features["x"]
    assert r.distribution_status == "no_data"
    assert r.status == "drift" and set(r.reasons) == {"missing_rate", "all_missing"}


def test_new_categories_are_drift():
    rng = np.random.default_rng(22)
    ref = drift.Profile.from_data(_frame(rng, 20_000), categorical=["c"])
    for share, want in ((0.10, "drift"), (0.01, "ok")):
        mon = drift.Monitor(ref, tests={"c": "js"}, thresholds={"c": 0.5})
        mon.update(_frame(rng, 20_000, new_share=share))
        r = mon.report().features["c"]
        check = next(q for q in r.quality if q.check == "new_category")
        assert check.current == pytest.approx(share, abs=0.01) and check.status == want
        assert r.distribution_status == "ok"  # the distance alone stays under 0.5
        assert r.status == want
    with pytest.raises(ValueError, match="quality keys are"):
        drift.Monitor(ref, quality={"nope": 1.0})
    mon = drift.Monitor(
        ref, tests={"c": "js"}, thresholds={"c": 0.5}, quality={"new_category_share": 0.5}
    )
    mon.update(_frame(rng, 20_000, new_share=0.10))
    assert mon.report().features["c"].status == "ok"


def test_extra_columns_ignored_on_request_and_listed():
    rng = np.random.default_rng(23)
    ref = drift.Profile.from_data(_frame(rng, 2_000), categorical=["c"])
    batch = _frame(rng, 500) | {"request_id": np.arange(500), "score": rng.random(500)}
    with pytest.raises(ValueError, match=r"unknown \['request_id', 'score'\]"):
        drift.Monitor(ref).update(batch)
    mon = drift.Monitor(ref, extra_columns="ignore")
    mon.update(batch)
    rep = mon.report()
    assert rep.unmonitored == ["request_id", "score"] and set(rep.features) == {"x", "c"}
    assert rep.to_dict()["unmonitored"] == ["request_id", "score"]
    with pytest.raises(ValueError, match="missing"):
        mon.update({"x": batch["x"]})  # a reference column is still required
    with pytest.raises(ValueError, match="extra_columns must be"):
        drift.Monitor(ref, extra_columns="drop")


@given(
    k1=st.integers(0, 500),
    n1=st.integers(1, 500),
    k2=st.integers(0, 500),
    n2=st.integers(1, 500),
)
def test_two_proportion_pvalue_matches_the_normal_test(k1, n1, k2, n2):
    from scipy import stats

    from fastml.drift._report import two_proportion_pvalue

    k1, k2 = min(k1, n1), min(k2, n2)
    p = (k1 + k2) / (n1 + n2)
    var = p * (1 - p) * (1 / n1 + 1 / n2)
    got = two_proportion_pvalue(k1, n1, k2, n2)
    if var == 0:
        assert got == 1.0
        return
    z = (k2 / n2 - k1 / n1) / np.sqrt(var)
    assert got == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9, abs=1e-300)
