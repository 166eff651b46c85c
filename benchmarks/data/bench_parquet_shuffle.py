"""Batch composition of the Parquet block shuffle on a file sorted by label.

A file sorted by its label is the hard case for a block shuffle: each row group
holds one class, so a batch drawn from few row groups holds few classes. For a
``Loader`` setting this reports, over one epoch (all batches of ``--batch`` rows):

* the share of batches holding a single class;
* the median number of row groups a batch draws from;
* the dispersion of the per-batch class count against a global shuffle: the
  mean squared deviation of the count of class 1 per batch from ``b p``,
  divided by the binomial variance ``b p (1 - p)``, averaged over ``--epochs``
  epochs; a global shuffle gives about 1 (a little less: rows are drawn
  without replacement), batches of one row group each give about ``b``; with
  windows of K of the file's G row groups, each holding one class, the
  expectation is about ``1 + (b - 1) (G - K) / (K (G - 1))`` (printed);
* epoch throughput (rows/s, median of ``--repeat`` epochs) with its spread.

    python benchmarks/data/bench_parquet_shuffle.py              # default vs shuffle_buffer=65536
    python benchmarks/data/bench_parquet_shuffle.py --rows 4000000 --groups-rows 65536
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


def write_sorted(path: Path, rows: int, group_rows: int, features: int) -> None:
    rng = np.random.default_rng(0)
    label = np.repeat(np.arange(2, dtype=np.int64), [rows // 2, rows - rows // 2])
    cols = {f"f{j}": rng.standard_normal(rows).astype(np.float32) for j in range(features)}
    cols["label"] = label
    cols["row"] = np.arange(rows, dtype=np.int64)
    pq.write_table(pa.table(cols), path, row_group_size=group_rows, compression="snappy")


def composition(ld: data.Loader, group_rows: int, epochs: int) -> dict[str, float]:
    """Batch composition over ``epochs`` epochs (the dispersion depends on which
    row groups share a window, so one epoch alone is luck)."""
    single, groups, disp, batches = 0, [], [], 0
    for _ in range(epochs):
        ones, sizes = [], []
        for b in ld:
            lab, row = b["label"], b["row"]
            k = int(lab.sum())
            single += k in (0, len(lab))
            groups.append(len(np.unique(row // group_rows)))
            ones.append(k)
            sizes.append(len(lab))
        batches += len(ones)
        bsz = max(sizes)
        full = [k for k, s in zip(ones, sizes, strict=True) if s == bsz]
        p = sum(ones) / sum(sizes)
        if len(full) > 1:
            # Spread around the file's class share (what a global shuffle has).
            disp.append(float(np.mean((np.array(full) - bsz * p) ** 2)) / (bsz * p * (1 - p)))
    return {
        "batches": batches,
        "single_class_share": single / batches,
        "median_groups_per_batch": float(np.median(groups)),
        "dispersion_vs_binomial": float(np.mean(disp)) if disp else float("nan"),
    }


def throughput(ds: data.Dataset, repeat: int, settings: list[dict]) -> list[tuple[float, float]]:
    """Rows/s (median over ``repeat`` epochs) and spread of each setting, the
    settings' epochs interleaved round by round (after one warm-up epoch each)."""
    loaders = [data.Loader(ds, **kw) for kw in settings]
    times: list[list[float]] = [[] for _ in settings]
    rows = 0
    for r in range(repeat + 1):
        for j, ld in enumerate(loaders):
            t0 = time.perf_counter()
            rows = sum(len(b["row"]) for b in ld)
            if r:  # the first round maps the file and warms the page cache
                times[j].append(time.perf_counter() - t0)
    for ld in loaders:
        ld.close()
    out = []
    for t in times:
        med = statistics.median(t)
        out.append((rows / med, (max(t) - min(t)) / med))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--groups-rows", type=int, default=65536)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=8, help="epochs the composition averages")
    ap.add_argument(
        "--buffers",
        default="default,65536",
        help="comma-separated shuffle_buffer settings ('default' = the Loader's)",
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sorted.parquet"
        write_sorted(path, args.rows, args.groups_rows, args.features)
        ds = data.Dataset.from_parquet(path)
        groups = len(ds._row_groups)
        print(
            f"{args.rows:,} rows sorted by a 2-class label, {args.features} float32 features, "
            f"{groups} row groups of {args.groups_rows:,}; batch {args.batch}"
        )
        settings = [s for s in args.buffers.split(",") if s]
        kws = []
        for s in settings:
            kw = {"batch_size": args.batch, "seed": 1}
            if s != "default":
                kw["shuffle_buffer"] = int(s)
            kws.append(kw)
        rates = throughput(ds, args.repeat, kws)  # interleaved
        for s, kw, (rate, spread) in zip(settings, kws, rates, strict=True):
            ld = data.Loader(ds, **kw)
            c = composition(ld, args.groups_rows, args.epochs)
            buf = ld._shuffle_buffer
            ld.close()
            k = min(groups, max(1, round(buf / args.groups_rows)))
            expect = 1 + (args.batch - 1) * (groups - k) / (k * (groups - 1)) if groups > 1 else 1
            print(
                f"shuffle_buffer={s} ({buf:,} rows): single-class batches "
                f"{100 * c['single_class_share']:.1f}%, row groups per batch (median) "
                f"{c['median_groups_per_batch']:.0f}, dispersion vs binomial "
                f"{c['dispersion_vs_binomial']:.1f} (expected ~{expect:.0f}), "
                f"{rate / 1e6:.2f} M rows/s (spread {100 * spread:.0f}%)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
