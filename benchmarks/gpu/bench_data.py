"""fastml.data on a GPU: each loader mode against the copy that bounds it, at
three batch sizes, and a small bf16 MLP trained from the loader against the
same training on batches already in device memory.

    python benchmarks/gpu/bench_data.py [--rows N] [--quick | --smoke] [--json PATH]

Modes, per batch size (1,024 / 8,192 / 65,536 rows), in one run:

- ``Loader(device="cuda")`` (gather on the host into pinned buffers, copy to the
  device) against torch's pinned host-to-device copy of the same bytes
  (``non_blocking=True``): the share of the pinned copy (goal: 90% at >= 8,192
  rows, 70% at 1,024);
- ``Loader(Dataset.to("cuda"))`` (the data set in device memory, shuffled and
  gathered there) against a device-to-device copy of the same bytes (goal: 70%);
- ``Loader()`` on the host, for reference.

Training: a 2-layer MLP (features -> hidden -> 10, GELU, bf16 autocast, AdamW)
stepped on every batch of an epoch, fed by ``Loader(device="cuda")``, by the
device-resident loader, and by batches already on the device (the compute
bound); hidden 256 (the loader matters) and 8,192 (the model dominates). The
ratio to the compute bound says when the loader stops mattering.

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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--quick", action="store_true", help="250,000 rows, 3 repeats")
    ap.add_argument("--smoke", action="store_true", help="4,096 rows, one repeat, CPU ok")
    args = ap.parse_args()
    sizes = [1024, 8192, 65536]
    if args.smoke:
        args.rows, args.repeat, sizes = 4096, 1, [256, 1024, 2048]
    elif args.quick:
        args.rows, args.repeat = min(args.rows, 250_000), 3
    n, f = args.rows, args.features
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if not cuda and not args.smoke:
        raise SystemExit("bench_data needs a CUDA device (use --smoke to check the script on CPU)")
    name = torch.cuda.get_device_name() if cuda else "CPU (smoke)"
    rng = np.random.default_rng(0)
    x = rng.random((n, f), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    ds = data.Dataset.from_numpy({"x": x, "y": y})
    on_device = ds.to(dev)
    nbytes = x.nbytes + y.nbytes

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # The device copy of the same bytes (read + write, as a gather does).
    src_x, src_y = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
    dst_x, dst_y = torch.empty_like(src_x), torch.empty_like(src_y)

    def device_copy() -> None:
        dst_x.copy_(src_x)
        dst_y.copy_(src_y)
        sync()

    key: dict[str, float] = {}
    out: dict[str, object] = {"device": name, "rows": n, "features": f}
    for bs in sizes:
        loader = data.Loader(ds, batch_size=bs, shuffle=True, device=dev)
        resident = data.Loader(on_device, batch_size=bs, shuffle=True)
        cpu_loader = data.Loader(ds, batch_size=bs, shuffle=True)
        # The same bytes, batched in pinned memory, copied with non_blocking=True
        # (the ceiling for any host-to-device loader).
        px, py = torch.from_numpy(x[: bs * 16]), torch.from_numpy(y[: bs * 16])
        if cuda:
            px, py = px.pin_memory(), py.pin_memory()
        dx = torch.empty((bs, f), device=dev)
        dy = torch.empty((bs,), dtype=torch.int64, device=dev)
        batches = -(-n // bs)

        def pinned_copy(bs=bs, px=px, py=py, dx=dx, dy=dy, batches=batches) -> None:
            for k in range(batches):
                j = (k % 16) * bs
                rows = min(bs, n - k * bs)
                dx[:rows].copy_(px[j : j + rows], non_blocking=True)
                dy[:rows].copy_(py[j : j + rows], non_blocking=True)
            sync()

        def run(ld=loader) -> None:
            for _b in ld:
                pass
            sync()

        t = harness.compare(
            {
                "fastml Loader device=cuda": run,
                "pinned H2D copy (torch)": pinned_copy,
                "fastml Loader, Dataset.to(device)": lambda r=resident: run(r),
                "device copy (torch)": device_copy,
                "fastml Loader cpu": lambda c=cpu_loader: run(c),
            },
            repeat=args.repeat,
            work=nbytes,
            unit="B",
        )
        print(
            harness.table(
                t,
                baseline="pinned H2D copy (torch)",
                title=f"{n} rows x {f} float32 + int64, batch {bs}, {name}",
            )
        )
        frac = t["pinned H2D copy (torch)"].median / t["fastml Loader device=cuda"].median
        res = t["device copy (torch)"].median / t["fastml Loader, Dataset.to(device)"].median
        goal = "90%" if bs >= 8192 else "70%"
        print(f"  device=cuda: {frac:.1%} of the pinned copy (goal {goal})")
        print(f"  Dataset.to(device): {res:.1%} of the device copy (goal 70%)")
        print(f"  stats {loader.stats()}")
        key[f"loader_cuda_fraction_of_pinned (batch {bs})"] = frac
        key[f"resident_fraction_of_device_copy (batch {bs})"] = res
        key[f"loader_cuda_GB_per_s (batch {bs})"] = t["fastml Loader device=cuda"].rate / 1e9
        key[f"pinned_h2d_GB_per_s (batch {bs})"] = t["pinned H2D copy (torch)"].rate / 1e9
        out[f"batch_{bs}"] = {k: v.to_dict() for k, v in t.items()}
        for ld in (loader, resident, cpu_loader):
            ld.close()
    print()
    out["training"] = train(ds, on_device, x, y, dev, cuda, args, key)
    out["key"] = key
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


def train(
    ds: data.Dataset,
    on_device: data.Dataset,
    x: np.ndarray,
    y: np.ndarray,
    dev: str,
    cuda: bool,
    args: argparse.Namespace,
    key: dict[str, float],
) -> dict[str, object]:
    """One epoch of MLP steps per candidate, loader-fed vs device-resident batches."""
    bs = 256 if args.smoke else 8192
    n, f = x.shape
    steps = -(-n // bs)
    xs = torch.from_numpy(x).to(dev)
    ys = torch.from_numpy(y).to(dev)
    ready = [(xs[i : i + bs], ys[i : i + bs]) for i in range(0, n, bs)]
    result: dict[str, object] = {}
    for hidden in (64, 512) if args.smoke else (256, 8192):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(f, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 10)
        ).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(xb: torch.Tensor, yb: torch.Tensor, model=model, opt=opt) -> None:
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        loader = data.Loader(ds, batch_size=bs, shuffle=True, device=dev)
        resident = data.Loader(on_device, batch_size=bs, shuffle=True)

        def from_loader(ld=loader, step=step) -> None:
            for b in ld:
                step(torch.as_tensor(b["x"]), torch.as_tensor(b["y"]))  # NumPy off CUDA
            sync()

        def compute_bound(step=step) -> None:
            for xb, yb in ready:
                step(xb, yb)
            sync()

        t = harness.compare(
            {
                "train from Loader(device=cuda)": from_loader,
                "train from Loader(Dataset.to(device))": lambda r=resident: from_loader(r),
                "train on batches already on the device": compute_bound,
            },
            repeat=args.repeat,
            work=steps,
            unit="steps",
        )
        print(
            harness.table(
                t,
                baseline="train on batches already on the device",
                title=f"bf16 MLP {f}-{hidden}-10, AdamW, batch {bs}: one epoch",
            )
        )
        bound = t["train on batches already on the device"].median
        for cand in ("train from Loader(device=cuda)", "train from Loader(Dataset.to(device))"):
            share = bound / t[cand].median
            print(f"  {cand}: {share:.1%} of the compute-bound step rate")
            key[f"{cand} share of compute bound (hidden {hidden})"] = share
        result[f"hidden_{hidden}"] = {k: v.to_dict() for k, v in t.items()}
        loader.close()
        resident.close()
    return result


if __name__ == "__main__":
    main()
