"""End to end: a small ``fastml demo``, and ``fastml bench --quick`` with its compare step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

pytest.importorskip("torch")
pytest.importorskip("pyarrow")


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastml", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = _run(
        ["demo", "--rows", "6000", "--requests", "4000", "--out", str(out), "--no-progress"],
        tmp_path,
        600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fastml demo:" in r.stdout and "drift" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 6000
    stages = summary["stages"]
    for stage in ("generate", "train_mlp", "serve", "drift"):
        assert stage in stages
    assert stages["serve"]["requests"] == 4000
    assert stages["serve"]["latency_us_p50"] > 0
    assert 0.5 < summary["model_quality"]["mlp_auc"] <= 1.0
    # The injected drift (amount shifted, a new merchant category) is found, after it was injected.
    assert "amount" in summary["drifted_features"]
    assert "merchant_category" in summary["drifted_features"]
    assert summary["drift_detected_at_row"] >= summary["drift_injected_at_row"]
    html = (out / "drift_report.html").read_text()
    assert "<html" in html.lower() and "amount" in html
    report = json.loads((out / "drift_report.json").read_text())
    assert report["timeline"] and "final_window" in report
    assert (out / "transactions.parquet").stat().st_size > 0


def test_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    r = _run(["demo", "--rows", "10", "--out", str(tmp_path / "x"), "--no-progress"], tmp_path, 120)
    assert r.returncode == 2
    assert "rows must be an int >= 2000" in r.stderr


def test_bench_quick_and_compare(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    r = _run(["bench", "--quick", "--out", str(a)], tmp_path, 600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(a.read_text())
    assert doc["schema"] == "fastml-bench/2"
    assert doc["hardware"]["logical_cores"] >= 1 and doc["hardware"]["cpu_model"]
    # The machine's own limits, measured in the run, and the figures against them.
    assert set(doc["limits"]) >= {"cpu_copy_1t", "cpu_copy_all", "cpu_gather_all"}
    assert all(lim["value"] > 0 for lim in doc["limits"].values())
    by_name = {f["name"]: f for f in doc["figures"]}
    for name, limit in (("loader_memory_rows", "cpu_gather_all"), ("ingest_values", "cpu_copy_1t")):
        f = by_name[name]
        assert f["limit"]["name"] == limit and f["limit"]["accounting"]
        want = f["fastml"]["value"] * f["limit"]["per_unit"] / doc["limits"][limit]["value"]
        assert f["fraction_of_limit"] == pytest.approx(want)
    assert by_name["ks_exact_values"]["limit"] is None  # compute-bound: no limit applies
    assert "of limit" in r.stdout and "limits measured in this run" in r.stdout
    assert doc["software"]["fastml"]["version"]
    comps = {f["component"] for f in doc["figures"]}
    assert {"data", "drift", "infer"} <= comps
    for f in doc["figures"]:
        assert f["fastml"]["value"] > 0 and f["fastml"]["repeats"] >= 1
        assert f["peer"] is None or f["peer"]["value"] > 0
    if "ops" not in comps:
        assert "ops" in doc["skipped"]
    # compare two runs (here the same one twice) and draw the chart
    png = tmp_path / "ratios.png"
    r = _run(["bench", "compare", str(a), str(a), "--plot", str(png)], tmp_path, 120)
    assert r.returncode == 0, r.stderr
    assert "1.00x" in r.stdout and "%" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_compare_rejects_foreign_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "other/9"}))
    r = _run(["bench", "compare", str(bad)], tmp_path, 120)
    assert r.returncode == 2 and "expected schema fastml-bench/1 or fastml-bench/2" in r.stderr


def _figure(name: str, value: float, **extra: object) -> dict:
    return {
        "component": "data",
        "name": name,
        "unit": "rows/s",
        "higher_is_better": True,
        "fastml": {"name": "fastml", "value": value, "spread": 0.01, "repeats": 3},
        "peer": {"name": "numpy", "value": value / 2, "spread": 0.01, "repeats": 3},
        "ratio": 2.0,
        "goal": None,
        "note": "",
        "absolute": False,
        **extra,
    }


def _doc(schema: str, figures: list[dict], **extra: object) -> dict:
    hw = {"cpu_model": "test", "logical_cores": 2, "physical_cores": 2, "usable_cores": 2}
    hw |= {"memory_bytes": 1, "gpus": [], "cuda_version": None, "machine": "x", "platform": "x"}
    return {
        "schema": schema,
        "date": "2026-11-27T00:00:00+00:00",
        "duration_s": 1.0,
        "quick": True,
        "hardware": hw | {"hostname": "h"},
        "software": {"python": "3.11", "fastml": {"version": "0.1.0"}, "packages": {}},
        "figures": figures,
        "skipped": {},
        **extra,
    }


def test_bench_reads_schema_1_files(tmp_path: Path) -> None:
    """A file of the first schema (no limits) loads, prints and compares with a new one."""
    from fastml.bench import suite

    old = tmp_path / "old.json"
    old.write_text(json.dumps(_doc("fastml-bench/1", [_figure("loader_memory_rows", 1e7)])))
    limit = {"name": "cpu_gather_all", "value": 6e7, "unit": "lines/s", "what": "w"}
    new_fig = _figure(
        "loader_memory_rows",
        1.5e7,
        limit=dict(limit, per_unit=3.0, accounting="3 lines per row"),
        fraction_of_limit=0.75,
    )
    new = tmp_path / "new.json"
    new.write_text(json.dumps(_doc("fastml-bench/2", [new_fig], limits={"cpu_gather_all": limit})))
    a, b = suite.load(old), suite.load(new)
    assert a["schema"] == "fastml-bench/2" and a["upgraded_from"] == "fastml-bench/1"
    assert a["limits"] == {} and a["figures"][0]["fraction_of_limit"] is None
    assert "loader_memory_rows" in suite.format_run(a)
    text, rows = suite.compare([a, b], ["old", "new"])
    assert rows[0]["ratios"] == [1.0, 1.5] and rows[0]["fractions"] == [None, 0.75]
    assert "(1.50x) 75%" in text
    r = _run(["bench", "compare", str(old), str(new)], tmp_path, 120)
    assert r.returncode == 0 and "(1.50x) 75%" in r.stdout, r.stderr


def test_bench_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from fastml.bench import suite

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(RuntimeError, match=r'pip install "fastml\[bench\]"'):
        suite.plot_compare([], ["a"], "x.png")


def test_bench_only_rejects_unknown_component(tmp_path: Path) -> None:
    r = _run(["bench", "--only", "nope"], tmp_path, 120)
    assert r.returncode == 2 and "unknown component 'nope'" in r.stderr


def test_bench_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import mlflow
    except ImportError:
        from fastml.bench import suite

        with pytest.raises(RuntimeError, match="needs mlflow"):
            suite.log_mlflow({"date": "x", "hardware": {}, "figures": []})
        return
    import os

    uri = f"file://{tmp_path / 'mlruns'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true"}
    r = subprocess.run(
        [sys.executable, "-m", "fastml", "bench", "--quick", "--only", "drift", "--mlflow"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = r.stdout.strip().splitlines()[-1].split()[-1]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    run = mlflow.get_run(run_id)
    assert "drift.ks_exact_values" in run.data.metrics
    assert run.data.params["cpu_model"]


@given(
    values=st.lists(st.sampled_from([0.0, 0.5, 1.0, -2.0, np.nan]) | st.floats(-5, 5), max_size=40)
)
@example(values=[])
@example(values=[1.0, 1.0, 1.0])
def test_demo_auc_ranks_match_scipy(values: list[float]) -> None:
    """The demo's AUC uses average ranks without SciPy (a light demo install)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    from fastml.demo.pipeline import _average_ranks

    x = np.array(values, dtype=np.float64)
    x = x[~np.isnan(x)]  # scores are finite
    np.testing.assert_array_equal(_average_ranks(x), scipy_stats.rankdata(x))
