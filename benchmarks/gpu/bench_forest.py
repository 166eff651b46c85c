"""fastml.infer.Forest on the GPU: device="cuda" against the CPU path and XGBoost's GPU predictor.

Run by benchmarks/gpu/check.sh on a machine with an NVIDIA GPU. Checks that the
CUDA margins equal the CPU margins bit for bit before timing.

    python benchmarks/gpu/bench_forest.py [--json PATH] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import fastml
from fastml.bench.harness import compare, table
from fastml.infer import Forest

NF = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--trees", type=int, default=500)
    args = ap.parse_args()
    import torch
    import xgboost as xgb

    if not fastml.cuda_available():
        raise SystemExit("no usable CUDA device (or fastml built without CUDA)")
    rng = np.random.default_rng(0)
    Xtr = rng.normal(size=(20_000, NF)).astype(np.float32)
    y = (Xtr[:, :4].sum(axis=1) + rng.normal(0, 0.5, len(Xtr)) > 0).astype(np.float32)
    Xtr[rng.random(Xtr.shape) < 0.05] = np.nan
    params = {
        "objective": "binary:logistic",
        "max_depth": 8,
        "device": "cuda",
        "tree_method": "hist",
    }
    booster = xgb.train(params, xgb.DMatrix(Xtr, y), args.trees)
    f = Forest.from_xgboost(booster)

    X = rng.normal(size=(args.rows, NF)).astype(np.float32)
    X[rng.random(X.shape) < 0.05] = np.nan
    Xd = torch.from_numpy(X).cuda()
    cpu_margin = f.predict(X[:100_000], output="margin")
    gpu_margin = f.predict(Xd[:100_000], output="margin", device="cuda").cpu().numpy()
    np.testing.assert_array_equal(gpu_margin, cpu_margin)
    print("CUDA margins equal CPU margins bit for bit on 100000 rows")

    def fastml_gpu():
        f.predict(Xd, device="cuda")
        torch.cuda.synchronize()

    def xgb_gpu():
        booster.inplace_predict(Xd)
        torch.cuda.synchronize()

    fastml.set_num_threads(max(1, fastml.get_num_threads()))
    t = compare(
        {
            "fastml Forest device=cuda (torch input)": fastml_gpu,
            "xgboost inplace_predict (cuda)": xgb_gpu,
            "fastml Forest device=cpu (all threads)": lambda: f.predict(X),
        },
        repeat=5,
        work=args.rows,
        unit="rows",
    )
    print(
        table(
            t,
            baseline="xgboost inplace_predict (cuda)",
            title=f"{f.num_trees} trees depth 8, {args.rows} rows",
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps({k: v.to_dict() for k, v in t.items()}, indent=2))


if __name__ == "__main__":
    main()
