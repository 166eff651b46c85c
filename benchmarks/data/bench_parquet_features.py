"""A 2-D feature matrix from many Parquet columns: ``features=`` against stacking.

One epoch of batches holding a ``(rows, 20)`` float32 feature matrix and an
int64 label, three ways, epochs interleaved in one process:

* ``Dataset.from_parquet(path, features={"x": ["f0", ..., "f19"]})``: the
  gather writes the matrix from the 20 decoded columns;
* the 20 columns loaded one by one and stacked per batch with ``np.stack``
  (what a user did before);
* the same matrix as one in-memory 2-D array (``Dataset.from_numpy``): no
  decoding at all, the reference a 2-D source gives.

    python benchmarks/data/bench_parquet_features.py [--rows 2000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fastml import data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.features)).astype(np.float32)
    y = rng.integers(0, 2, args.rows)
    names = [f"f{j}" for j in range(args.features)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wide.parquet"
        cols = {n: x[:, j] for j, n in enumerate(names)}
        cols["y"] = y
        pq.write_table(pa.table(cols), path, row_group_size=65536, compression="snappy")
        feat = data.Loader(
            data.Dataset.from_parquet(path, features={"x": names}), batch_size=args.batch
        )
        sep = data.Loader(data.Dataset.from_parquet(path), batch_size=args.batch)
        mem = data.Loader(data.Dataset.from_numpy({"x": x, "y": y}), batch_size=args.batch)

        def run_feat() -> int:
            return sum(b["x"].shape[0] for b in feat)

        def run_stack() -> int:
            return sum(np.stack([b[n] for n in names], axis=1).shape[0] for b in sep)

        def run_mem() -> int:
            return sum(b["x"].shape[0] for b in mem)

        cands = {
            "features= (Parquet)": run_feat,
            "np.stack per batch (Parquet)": run_stack,
            "2-D array in memory": run_mem,
        }
        times: dict[str, list[float]] = {k: [] for k in cands}
        for r in range(args.repeat + 1):
            for k, f in cands.items():
                t0 = time.perf_counter()
                rows = f()
                if r:  # the first round maps the file and warms caches
                    times[k].append(time.perf_counter() - t0)
        for ld in (feat, sep, mem):
            ld.close()
    print(
        f"{args.rows:,} rows x {args.features} float32 features + int64 label, "
        f"batch {args.batch}, 65,536-row groups (snappy); median of {args.repeat} epochs"
    )
    base = statistics.median(times["2-D array in memory"])
    for k, t in times.items():
        med = statistics.median(t)
        print(
            f"  {k:<30} {rows / med / 1e6:6.2f} M rows/s  {med / base:5.2f}x the in-memory "
            f"epoch (spread {100 * (max(t) - min(t)) / med:.0f}%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
