"""fastml.data on a GPU: loader throughput with device="cuda" vs the pinned
host-to-device copy bandwidth of the same bytes, measured in the same run.

    python benchmarks/gpu/bench_data.py [--rows N] [--quick | --smoke] [--json PATH]

--smoke runs the same code on a few thousand rows (on CPU tensors without a GPU).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from fastml import data
from fastml.bench import harness


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--quick", action="store_true", help="250,000 rows, 3 repeats")
    ap.add_argument("--smoke", action="store_true", help="4,096 rows, one repeat, CPU ok")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.batch_size, args.repeat = 4096, 256, 1
    elif args.quick:
        args.rows, args.repeat = min(args.rows, 250_000), 3
    n, f, bs = args.rows, args.features, args.batch_size
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if not cuda and not args.smoke:
        raise SystemExit("bench_data needs a CUDA device (use --smoke to check the script on CPU)")
    rng = np.random.default_rng(0)
    x = rng.random((n, f), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    ds = data.Dataset.from_numpy({"x": x, "y": y})
    nbytes = x.nbytes + y.nbytes
    loader = data.Loader(ds, batch_size=bs, shuffle=True, device=dev)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def fastml_cuda() -> None:
        for _b in loader:
            pass
        sync()

    # The reference: the same bytes, already batched in pinned memory, copied
    # with non_blocking=True (the ceiling for any host-to-device loader).
    px = torch.from_numpy(x[: bs * 64])
    py = torch.from_numpy(y[: bs * 64])
    if cuda:
        px, py = px.pin_memory(), py.pin_memory()
    dx = torch.empty((bs, f), device=dev)
    dy = torch.empty((bs,), dtype=torch.int64, device=dev)
    batches = -(-n // bs)

    def pinned_copy() -> None:
        for k in range(batches):
            j = (k % 64) * bs
            dx.copy_(px[j : j + bs], non_blocking=True)
            dy.copy_(py[j : j + bs], non_blocking=True)
        sync()

    def fastml_cpu_only() -> None:
        for _b in cpu_loader:
            pass

    cpu_loader = data.Loader(ds, batch_size=bs, shuffle=True)
    # The data set in device memory (Dataset.to): shuffled gathers on the device.
    resident = data.Loader(ds.to(dev), batch_size=bs, shuffle=True)

    def fastml_resident() -> None:
        for _b in resident:
            pass
        sync()

    # Its ceiling: a device-to-device copy of the same bytes (read + write).
    src_x = torch.from_numpy(x).to(dev)
    dst_x = torch.empty_like(src_x)

    def device_copy() -> None:
        dst_x.copy_(src_x)
        sync()

    t = harness.compare(
        {
            "fastml Loader device=cuda": fastml_cuda,
            "pinned H2D copy (torch)": pinned_copy,
            "fastml Loader cpu": fastml_cpu_only,
            "fastml Loader, Dataset.to(device)": fastml_resident,
            "device copy of x (torch)": device_copy,
        },
        repeat=args.repeat,
        work=nbytes,
        unit="B",
    )
    print(
        harness.table(
            t,
            baseline="pinned H2D copy (torch)",
            title=f"{n} rows x {f} float32 + int64, batch {bs}, "
            + (torch.cuda.get_device_name() if cuda else "CPU (smoke)"),
        )
    )
    frac = t["pinned H2D copy (torch)"].median / t["fastml Loader device=cuda"].median
    print(f"fastml device=cuda reaches {frac * 100:.1f}% of the pinned copy bandwidth (goal: 90%)")
    # Gathering reads and writes each batch byte once, as the device copy does.
    res_frac = (t["device copy of x (torch)"].median * (nbytes / x.nbytes)) / t[
        "fastml Loader, Dataset.to(device)"
    ].median
    print(
        f"Dataset.to(device) loader reaches {res_frac * 100:.1f}% of the device copy "
        "bandwidth (goal: 70% for rows of 64 bytes or more)"
    )
    print("stats", loader.stats())
    loader.close()
    resident.close()
    key = {
        f"loader_cuda_GB_per_s (batch {bs})": t["fastml Loader device=cuda"].rate / 1e9,
        "pinned_h2d_GB_per_s": t["pinned H2D copy (torch)"].rate / 1e9,
        "fraction_of_pinned_copy (goal 0.9)": frac,
        f"resident_GB_per_s (batch {bs})": t["fastml Loader, Dataset.to(device)"].rate / 1e9,
        "resident_fraction_of_device_copy (goal 0.7)": res_frac,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: v.to_dict() for k, v in t.items()} | {"key": key}, fh, indent=1)


if __name__ == "__main__":
    main()
