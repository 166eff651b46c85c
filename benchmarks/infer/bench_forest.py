"""fastml.infer.Forest against XGBoost's inplace_predict, LightGBM's predict and Treelite.

Model and data as in issue #6: 500 trees of depth 8 on 32 features with 5% NaN.
Every candidate runs on one thread (fastml.set_num_threads(1), nthread=1,
num_threads=1), interleaved round by round in one process. Trained models are
cached under benchmarks/infer/.cache (training costs CPU on a shared machine).

    python benchmarks/infer/bench_forest.py [--json PATH] [--trees 500] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import fastml
from fastml.bench.harness import compare, ratio, table
from fastml.infer import Forest

CACHE = Path(__file__).resolve().parent / ".cache"
NF = 32


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, NF)).astype(np.float32)
    w = rng.normal(size=NF)
    y = (np.tanh(X @ w / 4) + 0.3 * np.sin(3 * X[:, 0]) + rng.normal(0, 0.3, n) > 0).astype(
        np.int32
    )
    X[rng.random(X.shape) < 0.05] = np.nan
    return X, y


def xgb_model(trees: int):
    import xgboost as xgb

    path = CACHE / f"xgb_{trees}.ubj"
    if not path.exists():
        X, y = make_data(20_000, 0)
        params = {
            "objective": "binary:logistic",
            "max_depth": 8,
            "eta": 0.05,
            "nthread": 2,
            "tree_method": "hist",
            "min_child_weight": 0,
        }
        xgb.train(params, xgb.DMatrix(X, y), trees).save_model(str(path))
    b = xgb.Booster()
    b.load_model(str(path))
    b.set_param({"nthread": 1})
    return b, path


def lgb_model(trees: int):
    import lightgbm as lgb

    path = CACHE / f"lgb_{trees}.txt"
    if not path.exists():
        X, y = make_data(20_000, 0)
        params = {
            "objective": "binary",
            "max_depth": 8,
            "num_leaves": 255,
            "learning_rate": 0.05,
            "num_threads": 2,
            "verbose": -1,
            "min_data_in_leaf": 5,
        }
        lgb.train(params, lgb.Dataset(X, y), trees).save_model(str(path))
    return lgb.Booster(model_file=str(path)), path


def default_models(trees: int = 100):
    """XGBoost and LightGBM trained with their default tree parameters (issue #18:
    XGBoost depth 6, eta 0.3; LightGBM num_leaves=31 with no depth limit), cached."""
    import lightgbm as lgb
    import xgboost as xgb

    xpath, lpath = CACHE / f"xgb_defaults_{trees}.ubj", CACHE / f"lgb_defaults_{trees}.txt"
    if not xpath.exists() or not lpath.exists():
        X, y = make_data(20_000, 0)
        xgb.train(
            {"objective": "binary:logistic", "nthread": 2, "tree_method": "hist"},
            xgb.DMatrix(X, y),
            trees,
        ).save_model(str(xpath))
        lgb.train(
            {"objective": "binary", "num_threads": 2, "verbose": -1}, lgb.Dataset(X, y), trees
        ).save_model(str(lpath))
    xb = xgb.Booster()
    xb.load_model(str(xpath))
    xb.set_param({"nthread": 1})
    return xb, lgb.Booster(model_file=str(lpath))


def defaults_section(repeat: int) -> dict:
    """Default-parameter models, batch 1,024, one thread (the goals of issue #18)."""
    xb, lb = default_models()
    Xb, _ = make_data(1024, 1)
    Xb64 = Xb.astype(np.float64)
    fx, fl = Forest.from_xgboost(xb), Forest.from_lightgbm(lb)
    np.testing.assert_array_equal(
        fx.predict(Xb, output="margin"), xb.inplace_predict(Xb, predict_type="margin")
    )
    np.testing.assert_allclose(
        fl.predict(Xb64, output="margin"),
        lb.predict(Xb64, raw_score=True, num_threads=1),
        rtol=1e-12,
    )
    t = compare(
        {
            "fastml Forest (xgboost defaults)": lambda: fx.predict(Xb),
            "xgboost inplace_predict": lambda: xb.inplace_predict(Xb),
            "fastml Forest (lightgbm defaults)": lambda: fl.predict(Xb64),
            "lightgbm predict": lambda: lb.predict(Xb64, num_threads=1),
        },
        repeat=repeat,
        work=len(Xb),
        unit="rows",
    )
    print()
    print(
        table(
            t,
            baseline="xgboost inplace_predict",
            title=f"default-parameter models ({fx.num_trees} trees; engines {fx._core.engine} "
            f"and {fl._core.engine}), batch 1024, 1 thread",
        )
    )
    out = {k: v.to_dict() for k, v in t.items()}
    out["speedup_xgboost"] = ratio(t, "fastml Forest (xgboost defaults)", "xgboost inplace_predict")
    out["speedup_lightgbm"] = ratio(t, "fastml Forest (lightgbm defaults)", "lightgbm predict")
    print(
        f"default models: {out['speedup_xgboost']:.2f}x xgboost (goal 4x), "
        f"{out['speedup_lightgbm']:.2f}x lightgbm (goal 8x)"
    )
    return out


def treelite_predictor(xgb_path: Path):
    try:
        import treelite
    except ImportError:
        return None
    try:
        model = treelite.frontend.load_xgboost_model(str(xgb_path))
    except Exception:
        return None

    def predict(X):
        return treelite.gtil.predict(model, X, nthread=1)

    return predict


def tl2cgen_predictor(xgb_path: Path):
    """A TL2cgen-compiled shared library of the model (slow to build: opt-in)."""
    try:
        import tl2cgen
        import treelite
    except ImportError:
        return None
    model = treelite.frontend.load_xgboost_model(str(xgb_path))
    libpath = CACHE / f"tl2cgen_{xgb_path.stem}.so"
    if not libpath.exists():
        tl2cgen.export_lib(
            model, toolchain="gcc", libpath=str(libpath), nthread=1, params={"parallel_comp": 8}
        )
    predictor = tl2cgen.Predictor(str(libpath), nthread=1)

    def predict(X):
        return predictor.predict(tl2cgen.DMatrix(X, dtype="float32"))

    return predict


def scalar_walk(fn):
    """fn with the engine's AVX2 levels switched off (the scalar walk alone)."""
    from fastml import _core

    def run():
        before = _core.forest_simd()
        _core.forest_simd(False)
        try:
            return fn()
        finally:
            _core.forest_simd(before)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--trees", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--tl2cgen", action="store_true", help="also compile the model with TL2cgen")
    ap.add_argument(
        "--only-defaults", action="store_true", help="only the default-parameter models"
    )
    args = ap.parse_args()
    CACHE.mkdir(exist_ok=True)
    fastml.set_num_threads(1)
    results: dict[str, dict] = {}
    results["defaults"] = defaults_section(args.repeat)
    if args.only_defaults:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=float))
        return

    Xb, _ = make_data(1024, 1)
    X1 = Xb[:1].copy()

    booster, xgb_path = xgb_model(args.trees)
    fx = Forest.from_xgboost(booster)
    np.testing.assert_array_equal(
        fx.predict(Xb, output="margin"), booster.inplace_predict(Xb, predict_type="margin")
    )
    cands = {
        "fastml Forest (xgboost model)": lambda: fx.predict(Xb),
        "xgboost inplace_predict": lambda: booster.inplace_predict(Xb),
        "fastml Forest, scalar walk": scalar_walk(lambda: fx.predict(Xb)),
    }
    tl = treelite_predictor(xgb_path)
    if tl is not None:
        cands["treelite gtil.predict"] = lambda: tl(Xb)
    if args.tl2cgen:
        tc = tl2cgen_predictor(xgb_path)
        if tc is not None:
            cands["tl2cgen compiled"] = lambda: tc(Xb)
    t = compare(cands, repeat=args.repeat, work=len(Xb), unit="rows")
    print(
        table(
            t,
            baseline="xgboost inplace_predict",
            title=f"XGBoost binary:logistic, {fx.num_trees} trees depth 8, batch 1024, 1 thread",
        )
    )
    results["xgboost_batch"] = {k: v.to_dict() for k, v in t.items()}
    results["xgboost_batch"]["speedup"] = ratio(
        t, "fastml Forest (xgboost model)", "xgboost inplace_predict"
    )

    t = compare(
        {
            "fastml Forest, 1 row": lambda: fx.predict(X1),
            "xgboost inplace_predict, 1 row": lambda: booster.inplace_predict(X1),
        },
        repeat=args.repeat,
        number=200,
        work=1,
        unit="rows",
    )
    print()
    print(
        table(
            t, baseline="xgboost inplace_predict, 1 row", title="single row from Python (latency)"
        )
    )
    results["xgboost_row"] = {k: v.to_dict() for k, v in t.items()}

    lb, _ = lgb_model(args.trees)
    fl = Forest.from_lightgbm(lb)
    Xb64 = Xb.astype(np.float64)
    np.testing.assert_allclose(
        fl.predict(Xb64, output="margin"),
        lb.predict(Xb64, raw_score=True, num_threads=1),
        rtol=1e-12,
    )
    t = compare(
        {
            "fastml Forest (lightgbm model)": lambda: fl.predict(Xb64),
            "lightgbm predict": lambda: lb.predict(Xb64, num_threads=1),
            "fastml Forest, scalar walk": scalar_walk(lambda: fl.predict(Xb64)),
        },
        repeat=args.repeat,
        work=len(Xb),
        unit="rows",
    )
    print()
    print(
        table(
            t,
            baseline="lightgbm predict",
            title=f"LightGBM binary, {fl.num_trees} trees depth <= 8, batch 1024, 1 thread",
        )
    )
    results["lightgbm_batch"] = {k: v.to_dict() for k, v in t.items()}
    results["lightgbm_batch"]["speedup"] = ratio(
        t, "fastml Forest (lightgbm model)", "lightgbm predict"
    )

    t = compare(
        {
            "fastml Forest, 1 row": lambda: fl.predict(Xb64[:1]),
            "lightgbm predict, 1 row": lambda: lb.predict(Xb64[:1], num_threads=1),
        },
        repeat=args.repeat,
        number=100,
        work=1,
        unit="rows",
    )
    print()
    print(table(t, baseline="lightgbm predict, 1 row", title="single row from Python (latency)"))
    results["lightgbm_row"] = {k: v.to_dict() for k, v in t.items()}

    t0 = time.perf_counter()
    data = fx._core.to_bytes()
    Forest(type(fx._core).from_bytes(data))
    print(
        f"\nForest.load of the {len(data) / 1e6:.1f} MB XGBoost forest: "
        f"{(time.perf_counter() - t0) * 1e3:.1f} ms"
    )
    results["machine"] = {
        "cpus": os.cpu_count(),
        "simd": fastml.build_info()["simd"],
        "engine": fx._core.engine,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
