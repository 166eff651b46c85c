"""GPU drift ingest: the CUDA kernel (histogram + moments + counts in one pass)
on CUDA tensors vs the CPU ingest of the same data, and vs torch.histc-style
work a user would write (torch.bucketize + bincount + mean/var).

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
    rng = np.random.default_rng(0)
    x = rng.normal(size=args.rows).astype(np.float32)
    xg = torch.as_tensor(x, device=dev)
    # Histogram + moments + counts: the public histogram mode.
    ref = drift.Profile.from_data({"x": x[:100_000]}, bins=64, mode="histogram")
    hist_only = ref
    edges = torch.as_tensor(ref.summary("x")["edges"], device=dev, dtype=torch.float32)

    def fastml_gpu():
        p = hist_only.empty()
        p.update({"x": xg})

    def fastml_cpu():
        p = hist_only.empty()
        p.update({"x": x})

    def torch_reference():
        b = torch.bucketize(xg, edges, right=True)
        torch.bincount(b, minlength=edges.numel() + 1)
        finite = xg[torch.isfinite(xg)]
        finite.mean().item(), finite.var().item()

    t = compare(
        {
            "fastml CUDA ingest": fastml_gpu,
            "torch bucketize+bincount+var": torch_reference,
            "fastml CPU ingest": fastml_cpu,
        },
        repeat=1 if args.smoke else 3 if args.quick else 5,
        work=args.rows,
        unit="values",
    )
    print(
        table(
            t,
            baseline="torch bucketize+bincount+var",
            title=f"== drift GPU ingest, {args.rows:,} float32",
        )
    )
    gpu = t["fastml CUDA ingest"]
    key = {
        "cuda_ingest_Gvalues_per_s": gpu.rate / 1e9,
        "cuda_ingest_GB_per_s_read (4 B/value)": 4 * gpu.rate / 1e9,
        "vs_torch_bucketize_bincount_var": t["torch bucketize+bincount+var"].median / gpu.median,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: v.to_dict() for k, v in t.items()} | {"key": key}, fh, indent=2)


if __name__ == "__main__":
    main()
