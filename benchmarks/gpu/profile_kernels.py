"""Where the GPU time of fastml's CUDA paths goes: each path once under
torch.profiler, printing the device time of every kernel and copy next to the
call's wall time (so launch and host overhead show as the difference).

    python benchmarks/gpu/profile_kernels.py [--only forest,drift,data]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile


def _profile(name: str, fn: Callable[[], object], reps: int = 5) -> None:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps * 1e6
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    print(f"== {name}: {wall:,.1f} us per call (wall)")
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if dev > 0 and e.device_type.name == "CUDA":
            rows.append((dev / reps, e.count / reps, e.key))
    for us, count, key in sorted(rows, reverse=True)[:8]:
        print(f"   {us:10.1f} us  x{count:<4.3g} {key[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="forest,drift,data")
    args = ap.parse_args()
    only = set(args.only.split(","))
    rng = np.random.default_rng(0)
    if "forest" in only:
        import xgboost as xgb

        from fastml.infer import Forest

        Xtr = rng.normal(size=(20_000, 32)).astype(np.float32)
        y = (Xtr[:, :4].sum(axis=1) > 0).astype(np.float32)
        b = xgb.train({"objective": "binary:logistic", "max_depth": 8}, xgb.DMatrix(Xtr, y), 500)
        f = Forest.from_xgboost(b)
        X = torch.from_numpy(rng.normal(size=(1_000_000, 32)).astype(np.float32)).cuda()
        for rows in (1, 1024, 16384, 1_000_000):
            xs = X[:rows]
            _profile(
                f"Forest.predict {rows} rows (torch CUDA input)",
                lambda xs=xs: f.predict(xs, device="cuda"),
            )
    if "drift" in only:
        from fastml import drift

        x = rng.normal(size=50_000_000).astype(np.float32)
        ref = drift.Profile.from_data({"x": x[:100_000]}, bins=64, mode="histogram")
        xg = torch.as_tensor(x, device="cuda")
        _profile("drift histogram ingest 50M float32", lambda: ref.empty().update({"x": xg}))
    if "data" in only:
        from fastml import data

        n = 500_000
        cols = {f"f{i}": rng.normal(size=n).astype(np.float32) for i in range(32)}
        cols["y"] = rng.integers(0, 2, n)
        ds = data.Dataset.from_numpy(cols)
        loader = data.Loader(ds, batch_size=1024, shuffle=True, seed=0, device="cuda")

        def epoch_slice() -> None:
            for i, _b in enumerate(loader):
                if i == 50:
                    break

        _profile("Loader device=cuda, 50 batches of 1024 rows", epoch_slice, reps=2)


if __name__ == "__main__":
    main()
