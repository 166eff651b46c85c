"""GPU drift ingest: ``Profile.update`` with CUDA tensors in histogram mode (one
kernel launch for all columns of a batch: histogram + moments + counts in one
pass, kept on the device until a read folds them) vs the CPU ingest of the
same data, torch.bucketize + bincount + mean/var (what a user would write),
and a device copy of the same bytes (the share of copy bandwidth: bytes read
by the ingest per second over (read + write) bytes per second of the copy).

    python benchmarks/gpu/bench_drift.py [--quick | --smoke] [--json PATH]

--smoke runs the same code on 100,000 values (CPU tensors without a GPU).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from fastml import drift
from fastml.bench.harness import compare, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--smoke", action="store_true", help="100,000 values, CPU ok")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if args.smoke:
        args.rows = 100_000
    elif not cuda:
        raise SystemExit("bench_drift needs a CUDA device (use --smoke to check the script on CPU)")
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rng = np.random.default_rng(0)
    ncols = 16
    per_col = args.rows // ncols
    x = rng.normal(size=args.rows).astype(np.float32)
    xg = torch.as_tensor(x, device=dev)
    # 16 float32 columns of the same values: one (16, rows/16) device tensor.
    cols_g = {f"c{i}": xg[i * per_col : (i + 1) * per_col] for i in range(ncols)}
    cols_h = {f"c{i}": x[i * per_col : (i + 1) * per_col] for i in range(ncols)}
    # Histogram + moments + counts: the public histogram mode.
    ref1 = drift.Profile.from_data({"x": x[:100_000]}, bins=64, mode="histogram")
    ref16 = drift.Profile.from_data(
        {k: v[: 100_000 // ncols] for k, v in cols_h.items()}, bins=64, mode="histogram"
    )
    edges = torch.as_tensor(ref1.summary("x")["edges"], device=dev, dtype=torch.float32)
    # Steady state: one profile per candidate takes every update (GPU updates
    # stay on the device until a read folds them).
    p16, p1, p16_read = ref16.empty(), ref1.empty(), ref16.empty()
    dst = torch.empty_like(xg)

    def fastml_16():
        p16.update(cols_g)  # one launch for the 16 columns
        sync()

    def fastml_16_read():
        p16_read.update(cols_g)
        p16_read.summary("c0")  # folds every column's device totals into the profile

    def fastml_1():
        p1.update({"x": xg})
        sync()

    def fastml_cpu():
        ref16.empty().update(cols_h)

    def torch_reference():
        b = torch.bucketize(xg, edges, right=True)
        torch.bincount(b, minlength=edges.numel() + 1)
        finite = xg[torch.isfinite(xg)]
        finite.mean().item(), finite.var().item()

    def device_copy():
        dst.copy_(xg)
        sync()

    t = compare(
        {
            "fastml Profile.update, 16 CUDA columns (+ sync)": fastml_16,
            "fastml Profile.update, 16 CUDA columns + summary (fold)": fastml_16_read,
            "fastml Profile.update, 1 CUDA column (+ sync)": fastml_1,
            "torch bucketize+bincount+var": torch_reference,
            "device copy of the same bytes": device_copy,
            "fastml CPU ingest, 16 columns": fastml_cpu,
        },
        repeat=1 if args.smoke else 3 if args.quick else 7,
        work=args.rows,
        unit="values",
    )
    print(
        table(
            t,
            baseline="torch bucketize+bincount+var",
            title=f"== drift GPU ingest, {args.rows:,} float32 ({ncols} columns or one)",
        )
    )
    gpu = t["fastml Profile.update, 16 CUDA columns (+ sync)"]
    copy = t["device copy of the same bytes"]
    copy_bw = 2 * 4 * args.rows / copy.median  # read + write, as the ops benchmarks count it
    read_bw = 4 * args.rows / gpu.median
    key = {
        "cuda_ingest_16_columns_Gvalues_per_s": gpu.rate / 1e9,
        "cuda_ingest_GB_per_s_read (4 B/value)": read_bw / 1e9,
        "device_copy_GB_per_s (read + write)": copy_bw / 1e9,
        "share_of_copy_bandwidth (goal >= 0.5)": read_bw / copy_bw,
        "vs_torch_bucketize_bincount_var": t["torch bucketize+bincount+var"].median / gpu.median,
    }
    for k, v in key.items():
        print(f"  {k}: {v:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: v.to_dict() for k, v in t.items()} | {"key": key}, fh, indent=2)


if __name__ == "__main__":
    main()
