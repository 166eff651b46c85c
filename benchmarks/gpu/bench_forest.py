"""fastml.infer.Forest on the GPU: device="cuda" against the CPU engine and XGBoost.

Run by benchmarks/gpu/check.sh on a machine with an NVIDIA GPU. Checks that the
CUDA margins equal the CPU margins bit for bit before timing, then times
throughput at --rows rows and the latency of small batches (1, 64, 1,024 rows)
from a torch CUDA tensor.

The model is XGBoost's (binary:logistic, depth 8) when xgboost is importable
(the GPU machine has none: carry the xgboost-cpu wheel, see
benchmarks/gpu/fetch_wheels.sh), else scikit-learn's HistGradientBoosting; the
XGBoost peers are measured only when xgboost is there, its GPU predictor only
when xgboost was built with CUDA (the 126 MB CUDA wheel does not fit a carry).

    python benchmarks/gpu/bench_forest.py [--rows 1000000] [--trees 500] [--quick | --smoke]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import fastml
from fastml.bench.harness import compare, table
from fastml.infer import Forest

NF = 32


def _model(trees: int, depth: int, rng: np.random.Generator) -> tuple[Forest, Any, str]:
    """(forest, xgboost booster or None, description)."""
    Xtr = rng.normal(size=(20_000, NF)).astype(np.float32)
    y = (Xtr[:, :4].sum(axis=1) + rng.normal(0, 0.5, len(Xtr)) > 0).astype(np.float32)
    Xtr[rng.random(Xtr.shape) < 0.05] = np.nan
    try:
        import xgboost as xgb
    except ImportError:
        xgb = None
    if xgb is not None:
        params = {"objective": "binary:logistic", "max_depth": depth, "tree_method": "hist"}
        booster = xgb.train(params, xgb.DMatrix(Xtr, y), trees)
        return Forest.from_xgboost(booster), booster, f"xgboost {xgb.__version__}"
    from sklearn.ensemble import HistGradientBoostingClassifier

    print("xgboost is not installed: sklearn's model instead, no XGBoost peer (see the docstring)")
    est = HistGradientBoostingClassifier(max_iter=trees, max_depth=depth, early_stopping=False)
    est.fit(Xtr, y)
    return Forest.from_sklearn(est), None, "sklearn HistGradientBoosting"


def _latency_us(fn, reps: int) -> float:
    """Median microseconds of one call, after warm-up."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--trees", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="3 repeats, fewer latency samples")
    ap.add_argument("--smoke", action="store_true", help="20 trees, 2,000 rows, CPU ok")
    args = ap.parse_args()
    import torch

    cuda = fastml.cuda_available()
    if args.smoke:
        args.rows, args.trees = 2_000, 20
    elif not cuda:
        raise SystemExit("no usable CUDA device (or fastml built without CUDA)")
    dev = "cuda" if cuda else "cpu"
    rng = np.random.default_rng(0)
    f, booster, source = _model(args.trees, 8, rng)

    X = rng.normal(size=(args.rows, NF)).astype(np.float32)
    X[rng.random(X.shape) < 0.05] = np.nan
    Xd = torch.from_numpy(X).to(dev)
    key: dict[str, Any] = {"model": f"{f.num_trees} trees depth 8 ({source})"}
    if cuda:
        cpu_margin = f.predict(X[:100_000], output="margin")
        gpu_margin = f.predict(Xd[:100_000], output="margin", device="cuda").cpu().numpy()
        np.testing.assert_array_equal(gpu_margin, cpu_margin)
        print("CUDA margins equal CPU margins bit for bit on 100000 rows")
        key["cuda_equals_cpu_bitwise"] = True

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def fastml_gpu():
        f.predict(Xd, device=dev)
        sync()

    cands = {
        "fastml Forest device=cuda (torch input)": fastml_gpu,
        "fastml Forest device=cuda (NumPy input)": lambda: f.predict(X, device=dev),
        "fastml Forest device=cpu (all threads)": lambda: f.predict(X),
    }
    base = "fastml Forest device=cpu (all threads)"
    if booster is not None:
        import xgboost as xgb

        if cuda and bool(xgb.build_info().get("USE_CUDA")):
            booster.set_param({"device": "cuda"})
            base = "xgboost inplace_predict (cuda)"
            cands[base] = lambda: (booster.inplace_predict(Xd), sync())
        else:
            print("xgboost has no CUDA build here: its CPU predictor is the XGBoost peer")
            base = "xgboost inplace_predict (cpu, all threads)"
            cands[base] = lambda: booster.inplace_predict(X)
    t = compare(
        cands, repeat=1 if args.smoke else 3 if args.quick else 5, work=args.rows, unit="rows"
    )
    print(table(t, baseline=base, title=f"{f.num_trees} trees depth 8, {args.rows} rows"))
    gpu = t["fastml Forest device=cuda (torch input)"]
    key["cuda_Mrows_per_s"] = gpu.rate / 1e6
    key["cpu_all_threads_Mrows_per_s"] = t["fastml Forest device=cpu (all threads)"].rate / 1e6
    npy = t["fastml Forest device=cuda (NumPy input)"]
    key["cuda_numpy_input_Mrows_per_s"] = npy.rate / 1e6
    if cuda:
        # The physical bound of the NumPy path: X's host-to-device copy from pinned memory.
        pinned = torch.from_numpy(X).pin_memory()
        pinned.to(dev, non_blocking=True)
        sync()
        h2d = compare(
            {"pinned H2D": lambda: (pinned.to(dev, non_blocking=True), sync())},
            repeat=5,
            work=X.nbytes,
            unit="B",
        )["pinned H2D"]
        key["pinned_h2d_GBps"] = h2d.rate / 1e9
        key["cuda_numpy_input_fraction_of_pinned_h2d"] = (X.nbytes / npy.median) / h2d.rate
    if base.startswith("xgboost"):
        key[f"cuda_vs_{base}"] = t[base].median / gpu.median

    reps = 5 if args.smoke else 50 if args.quick else 200
    key["cuda_layout"] = f._core.cuda_layout
    for rows in (1, 64, 1024, 16384):
        xs = Xd[:rows]
        key[f"cuda_latency_us_{rows}_rows"] = _latency_us(
            lambda xs=xs: (f.predict(xs, device=dev), sync()), reps
        )
        key[f"cpu_latency_us_{rows}_rows"] = _latency_us(lambda r=rows: f.predict(X[:r]), reps)
    if cuda:
        # One row into a preallocated result (out=): no allocation per call.
        res1 = f.predict(Xd[:1], device=dev)
        key["cuda_latency_us_1_rows_out"] = _latency_us(
            lambda: (f.predict(Xd[:1], device=dev, out=res1), sync()), reps
        )
        # The kernel without Python: one row replayed from a captured CUDA graph.
        xs1 = Xd[:1].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            f.predict(xs1, device=dev, out=res1)
        torch.cuda.current_stream().wait_stream(side)
        sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            f.predict(xs1, device=dev, out=res1)
        key["cuda_graph_replay_us_1_rows"] = _latency_us(lambda: (graph.replay(), sync()), reps)
        # The floor of any call from Python: an empty torch kernel + synchronize.
        one = torch.zeros(1, device=dev)
        key["torch_empty_kernel_and_sync_us"] = _latency_us(lambda: (one.add_(0), sync()), reps)
        # The general layout (the kernel before the binned layouts) on the same
        # batches, for the comparison: latency, then throughput at --rows.
        if f._core.cuda_layout != "general":
            fastml._core.forest_cuda_general(True)
            try:
                f.predict(Xd[:1], device=dev)  # uploads the general layout
                sync()
                for rows in (1, 1024):
                    xs = Xd[:rows]
                    key[f"cuda_general_layout_latency_us_{rows}_rows"] = _latency_us(
                        lambda xs=xs: (f.predict(xs, device=dev), sync()), reps
                    )
                g = compare(
                    {"general layout": fastml_gpu},
                    repeat=3 if args.quick else 5,
                    work=args.rows,
                    unit="rows",
                )["general layout"]
                key["cuda_general_layout_Mrows_per_s"] = g.rate / 1e6
            finally:
                fastml._core.forest_cuda_general(False)
    for k, v in key.items():
        print(f"{k:<44} {v}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({k: v.to_dict() for k, v in t.items()} | {"key": key}, indent=2)
        )


if __name__ == "__main__":
    main()
